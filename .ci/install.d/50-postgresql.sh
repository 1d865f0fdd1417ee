#!/usr/bin/env bash
# A PostgreSQL server on 127.0.0.1:5432 with trust auth for user postgres, for the shared-store
# and leader-election tests (each test creates and drops its own database). Installs Debian's
# postgresql when absent, starts the cluster when stopped. Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    apt-get -o DPkg::Lock::Timeout=600 update
    apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends postgresql
fi
version="$(ls /etc/postgresql | sort -V | tail -1)"
conf="/etc/postgresql/$version/main"
# trust for local TCP connections (the tests connect as postgres without a password)
if ! grep -q '^host all all 127.0.0.1/32 trust' "$conf/pg_hba.conf"; then
    sed -i '/^host/d' "$conf/pg_hba.conf"
    printf 'host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n' >> "$conf/pg_hba.conf"
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload 2>/dev/null || true
fi
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $4}' | grep -q online; then
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
fi
for _ in $(seq 1 30); do
    if pg_isready -h 127.0.0.1 -p 5432 -q; then exit 0; fi
    sleep 1
done
echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2
exit 1
