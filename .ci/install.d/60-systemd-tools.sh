#!/usr/bin/env bash
# systemd-analyze for tests/test_packaging_systemd.py (`systemd-analyze verify` on
# packaging/systemd/balancer.service). Debian ships it in the `systemd` package; installing it
# in a container does not start systemd. Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if command -v systemd-analyze >/dev/null 2>&1; then
    exit 0
fi
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends systemd
