#!/usr/bin/env bash
# Headless Chromium for tests/test_console*.py (driven by Playwright for Python through
# executable_path=/usr/bin/chromium; no browser download) and fonts to render the console.
# Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if command -v chromium >/dev/null 2>&1 && dpkg -s fonts-dejavu-core >/dev/null 2>&1; then
    exit 0
fi
apt-get -o DPkg::Lock::Timeout=600 update
apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends chromium fonts-dejavu-core
