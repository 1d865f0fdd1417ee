#!/usr/bin/env bash
# System packages the tests need on a fresh Debian 12 machine (run as root): Python's venv, then
# every .ci/install.d/*.sh in name order (QEMU and libvirt for the real-migration tests,
# Prometheus and wrk for the service tests). Idempotent: installed packages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
if ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends python3-venv
fi
for script in .ci/install.d/*.sh; do
    [ -e "$script" ] || continue
    echo "== $script"
    bash "$script"
done
