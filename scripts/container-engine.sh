#!/usr/bin/env bash
# A Docker engine and local base images for the container test (tests/test_container.py), on a
# Debian host without registry access. Idempotent: installs, starts and builds only what is
# missing. Run as root. Prints nothing but progress; exits non-zero when the engine cannot run.
#
#   bash scripts/container-engine.sh
#
# - Debian's docker.io (engine + a CLI with BuildKit built in) and debootstrap.
# - dockerd started in the background when nothing answers on its socket, with
#   --iptables=false (these machines allow no iptables; containers still reach each other on
#   compose's bridge network and published ports go through docker-proxy). Log: $DOCKERD_LOG.
# - local/debian:bookworm: a Debian 12 minbase made with debootstrap and `docker import`, the base
#   of the CPU image and of the PostgreSQL test image (no registry image can be pulled here).
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-local/debian:bookworm}
SUITE=${SUITE:-bookworm}
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd-container-test.log}
# Debian's CLI (20.10) builds with BuildKit by itself; a newer `docker` first on PATH may need a
# buildx plugin that is not installed.
DOCKER=${DOCKER:-/usr/bin/docker}

apt_install() {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
[ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ] || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt_install "${missing[@]}"
fi

if ! "$DOCKER" info >/dev/null 2>&1; then
  echo "starting dockerd (log: $DOCKERD_LOG)"
  nohup /usr/sbin/dockerd --iptables=false >"$DOCKERD_LOG" 2>&1 &
  for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
  "$DOCKER" info >/dev/null 2>&1 || { echo "dockerd did not start:"; tail -20 "$DOCKERD_LOG"; exit 1; }
fi

if ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "bootstrapping $BASE_IMAGE (debootstrap --variant=minbase $SUITE)"
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase "$SUITE" "$root" >/dev/null
  # Security updates too, like the official image (debootstrap writes the main suite only).
  if [ "$SUITE" = bookworm ]; then
    echo "deb http://deb.debian.org/debian-security bookworm-security main" >>"$root/etc/apt/sources.list"
    echo "deb http://deb.debian.org/debian bookworm-updates main" >>"$root/etc/apt/sources.list"
  fi
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | "$DOCKER" import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
fi
echo "engine ready: $("$DOCKER" version --format '{{.Server.Version}}'), base image $BASE_IMAGE"
