#!/usr/bin/env bash
# openssl: tests/test_api_exposure.py makes a throwaway self-signed certificate to test
# `balancer serve` over TLS ([server] tls_cert / tls_key). Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if command -v openssl >/dev/null 2>&1; then
    exit 0
fi
apt-get -o DPkg::Lock::Timeout=600 update
apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends openssl
