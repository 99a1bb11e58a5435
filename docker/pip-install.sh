#!/bin/sh
# pip as the image build runs it (bind-mounted by docker/Dockerfile, never copied into a layer):
# wheels in docker/wheelhouse/ (mounted at /wheels) are found first, and the CA bundle passed
# with `--secret id=ca,src=...` verifies TLS behind an inspecting proxy. PIP_NO_INDEX,
# PIP_INDEX_URL and PIP_EXTRA_INDEX_URL come from build arguments when given.
set -eu
if [ -s /run/secrets/ca ]; then
  export PIP_CERT=/run/secrets/ca
fi
command=$1
shift
exec /opt/venv/bin/pip "$command" --find-links /wheels "$@"
