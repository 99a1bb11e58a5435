#!/usr/bin/env bash
# Headless Chromium for the dashboard's browser tests (tests/test_dashboard.py): Debian's
# chromium package, driven by Python Playwright with executable_path=/usr/bin/chromium.
# Idempotent: does nothing when the browser is already there. Never runs `playwright install`
# (that downloads browser builds from a CDN; installs here only reach package registries).
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: /usr/bin/chromium is missing and apt-get is not available" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium
test -x /usr/bin/chromium
