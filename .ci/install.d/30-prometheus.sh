#!/usr/bin/env bash
# Real Prometheus server for tests/test_prometheus*.py (the tests start and stop it themselves),
# and wrk for bench/service.py. Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if command -v prometheus >/dev/null 2>&1 && command -v wrk >/dev/null 2>&1; then
    exit 0
fi
apt-get -o DPkg::Lock::Timeout=600 update
apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends prometheus wrk
