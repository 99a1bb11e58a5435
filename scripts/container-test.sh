#!/usr/bin/env bash
# The real container test: build the CPU image and a PostgreSQL image on a local Debian base,
# then run tests/test_container.py (docker compose up api + 2 workers + postgres, a fit on real
# Fashion-MNIST images, a worker killed mid-job, down/up persistence). Run as root from anywhere:
#
#   bash scripts/container-test.sh               # engine + images + the test
#   bash scripts/container-test.sh --build-only  # engine + images (what the test itself calls)
#
# Needs no registry: the engine and base come from scripts/container-engine.sh, the wheels from a
# wheelhouse that `pip download` fills from this machine's pip configuration (with a pip cache or
# local index that costs seconds; otherwise it downloads about 4 GB once), and the image is then
# built with --build-arg PIP_NO_INDEX=1. Docker's build cache makes a rerun take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
DOCKER=${DOCKER:-/usr/bin/docker}
BASE_IMAGE=${BASE_IMAGE:-local/debian:bookworm}
IMAGE=${DIFFICULTY_TEST_IMAGE:-sample-difficulty:cpu-test}
POSTGRES_IMAGE=${DIFFICULTY_TEST_POSTGRES_IMAGE:-sample-difficulty-postgres:test}
WHEELHOUSE=docker/wheelhouse
export DOCKER_BUILDKIT=1

BASE_IMAGE=$BASE_IMAGE DOCKER=$DOCKER bash scripts/container-engine.sh

seconds() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(seconds)"; }

# The wheels for the image's Python (Debian 12: 3.11). One download per requirement set: the
# stamp holds the requirement lists it was made from.
python_version=3.11
stamp=$WHEELHOUSE/.requirements-$python_version
requirements=$(mktemp)
{
  "$VENV/bin/python" docker/requirements.py pyproject.toml --extra cpu --extra ray
  echo 'setuptools>=77'
  echo wheel
} >"$requirements"
if ! cmp -s "$requirements" "$stamp"; then
  t=$(seconds)
  find "$WHEELHOUSE" -mindepth 1 ! -name README.md -delete
  # (pip's warnings about index pages it cannot read are noise here: filtered out.)
  "$VENV/bin/pip" download -q --only-binary :all: --python-version "$python_version" \
    -d "$WHEELHOUSE" -r "$requirements" 2> >(grep -v 'is ignored: it is neither' >&2)
  cp "$requirements" "$stamp"
  echo "wheelhouse: $(ls "$WHEELHOUSE" | wc -l) files, $(du -sh "$WHEELHOUSE" | cut -f1), $(elapsed "$t") s"
fi
rm -f "$requirements"

secret=()
[ -s /etc/ssl/certs/ca-certificates.crt ] && secret=(--secret id=ca,src=/etc/ssl/certs/ca-certificates.crt)

t=$(seconds)
"$DOCKER" build --network host -q -f docker/postgres/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  -t "$POSTGRES_IMAGE" docker/postgres >/dev/null
echo "built $POSTGRES_IMAGE in $(elapsed "$t") s"

t=$(seconds)
"$DOCKER" build --network host -f docker/Dockerfile \
  --build-arg VARIANT=cpu --build-arg "CPU_IMAGE=$BASE_IMAGE" --build-arg PIP_NO_INDEX=1 \
  "${secret[@]}" -t "$IMAGE" .
echo "built $IMAGE in $(elapsed "$t") s ($("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}'))"

if [ "${1:-}" = --build-only ]; then
  exit 0
fi
CI=${CI:-} DIFFICULTY_TEST_IMAGE=$IMAGE DIFFICULTY_TEST_POSTGRES_IMAGE=$POSTGRES_IMAGE HF_HUB_OFFLINE=1 \
  DIFFICULTY_CONTAINER_PREBUILT=1 "$VENV/bin/pytest" -q -m container tests/test_container.py
