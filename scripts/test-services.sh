#!/usr/bin/env bash
# What the test suite needs outside Python: the Fashion-MNIST Debian package (real-data tests)
# and a reachable PostgreSQL on 127.0.0.1:5432. Idempotent; installs/starts only what is missing.
set -euo pipefail

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  echo "installing dataset-fashion-mnist (Debian package)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist
fi

if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql
  fi
  version=$(ls /etc/postgresql | sort -V | tail -1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
fi
pg_isready -h 127.0.0.1 -p 5432 || { echo "PostgreSQL is not reachable on 127.0.0.1:5432"; exit 1; }

# The container test (tests/test_container.py): Debian's Docker engine, running, and a local
# Debian base image (the test builds its images on it). A failure here is reported by that test
# (it fails under CI without an engine) rather than stopping the rest of the suite.
if ! bash "$(dirname "$0")/container-engine.sh"; then
  echo "WARNING: no Docker engine could be started; tests/test_container.py needs one"
fi
