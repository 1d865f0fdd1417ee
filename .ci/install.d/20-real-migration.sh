#!/usr/bin/env bash
# System packages for the real live-migration backends and their tests (tests/real/):
# QEMU (TCG guests), libvirt daemon + client + headers (libvirt-python builds against them),
# iproute2 (netns, veth, tc), a C toolchain for the tiny test guest, and the libvirt-qemu
# user/group that libvirtd insists on even when qemu.conf says user = "root". Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=(qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
      pkg-config iproute2 binutils gcc libc6-dev python3-dev)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}"
fi
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
id -u libvirt-qemu >/dev/null 2>&1 || useradd --system -g libvirt-qemu -d /var/lib/libvirt \
    -s /usr/sbin/nologin libvirt-qemu
# Python packages come from pyproject: qemu.qmp is a dependency, libvirt-python is the extra
# [libvirt] (.ci/run installs '.[dev,libvirt]' in a venv; it compiles against libvirt-dev,
# pkg-config and python3-dev above).
