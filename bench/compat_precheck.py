"""What the compatibility pre-check costs per migration, on real libvirt and QEMU hosts.

One command (root; QEMU, libvirt, iproute2 and gcc from .ci/install.d/20-real-migration.sh)::

    python3 bench/compat_precheck.py [--repeat N]

Two network namespaces (tests/real/lab.py), one libvirtd in each. libvirt: a running TCG domain
with a ``qemu64`` CPU, a bridged libvirt network and a disk in a storage pool (defined on both
hosts); the destination's answers (``libvirt_lacks``: capabilities, ``compareHypervisorCPU``,
network, pool lookup) are timed cold (the first call after the destination daemon started,
which probes its QEMU) and warm, and so is the backend's whole ``check`` (locate, free memory,
the domain's XML, the compatibility part). QEMU: the probe of a host's QEMU (start it with
``-machine none``, ``query-machines`` + ``query-cpu-definitions``) and a whole ``check`` with
the probes cached. Prints one table (median and max over ``--repeat`` calls, milliseconds).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402
from tqdm import tqdm  # noqa: E402

from balancer.executor.base import MigrationRequest  # noqa: E402
from balancer.executor.compat import (  # noqa: E402
    QemuProber,
    is_local_uri,
    libvirt_lacks,
    parse_domain_xml,
    qemu_running,
)
from balancer.executor.libvirt_backend import LibvirtBackend, LibvirtHost  # noqa: E402
from balancer.executor.qemu import GuestSpec, QemuBackend, QemuHost  # noqa: E402
from tests.real import lab as labmod  # noqa: E402


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000.0


def row(name: str, samples: list[float]) -> tuple[str, int, float, float]:
    return name, len(samples), statistics.median(samples), max(samples)


def libvirt_part(lab: labmod.Lab, kernel: Path, repeat: int,
                 bar: tqdm) -> list[tuple[str, int, float, float]]:  # type: ignore[type-arg]
    uris = {h.name: labmod.start_libvirtd(lab, h) for h in lab.hosts}
    (lab.root / "disks").mkdir(exist_ok=True)  # shared by both hosts, a pool on each
    for h in lab.hosts:
        h.sh("ip", "link", "add", "brbench", "type", "bridge")
        h.sh("ip", "link", "set", "brbench", "up")
        conn = libvirt.open(uris[h.name])
        try:
            conn.networkDefineXML("<network><name>bench</name><forward mode='bridge'/>"
                                  "<bridge name='brbench'/></network>").create()
            conn.storagePoolDefineXML(
                f"<pool type='dir'><name>disks</name><target><path>{lab.root / 'disks'}"
                "</path></target></pool>").create()
        finally:
            conn.close()
    disk = lab.root / "disks" / "b1.img"
    disk.write_bytes(b"\0" * 65536)
    for h in lab.hosts:  # the pools see the shared folder's disk
        conn = libvirt.open(uris[h.name])
        try:
            conn.storagePoolLookupByName("disks").refresh(0)
        finally:
            conn.close()
    xml = f"""<domain type='qemu'><name>b1</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{kernel}</kernel>
    <cmdline>fill=24</cmdline></os>
  <cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model></cpu>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{disk}'/>
      <target dev='hda' bus='ide'/></disk>
    <interface type='network'><source network='bench'/><model type='e1000'/></interface>
    <memballoon model='none'/></devices></domain>"""
    src = libvirt.open(uris["host-a"])
    dst = libvirt.open(uris["host-b"])
    backend = LibvirtBackend([LibvirtHost(h.name, uris[h.name], f"qemu+tcp://{h.address}/system")
                              for h in lab.hosts])
    try:
        dom = src.createXML(xml, 0)
        needs = parse_domain_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))
        local = is_local_uri(uris["host-b"])
        cold = [timed(lambda: libvirt_lacks(dst, needs, local=local))]
        bar.update()
        warm, parse, whole = [], [], []
        lacks: list[str] = []
        for _ in range(repeat):
            warm.append(timed(lambda: lacks.extend(libvirt_lacks(dst, needs, local=local))))
            parse.append(timed(lambda: parse_domain_xml(
                dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))))
            whole.append(timed(lambda: backend.check(MigrationRequest("b1", "host-a",
                                                                      "host-b", 32))))
            bar.update()
        assert lacks == [], lacks  # a compatible destination: nothing lacking
        dom.destroy()
    finally:
        backend.close()
        src.close()
        dst.close()
    return [row("libvirt: destination answers, first call (cold daemon)", cold),
            row("libvirt: destination answers (libvirt_lacks)", warm),
            row("libvirt: domain XML read + parsed", parse),
            row("libvirt: whole check()", whole)]


def qemu_part(lab: labmod.Lab, kernel: Path, repeat: int,
              bar: tqdm) -> list[tuple[str, int, float, float]]:  # type: ignore[type-arg]
    hosts = [QemuHost(h.name, h.address, h.root / "run", h.exec_prefix()) for h in lab.hosts]
    backend = QemuBackend(hosts)
    try:
        backend.launch(GuestSpec("q1", 32, kernel=str(kernel), append="fill=24"), "host-a")
        b = hosts[1]
        probes = []
        for _ in range(max(3, repeat // 10)):
            probes.append(timed(lambda: QemuProber().offer(b.exec_prefix, b.run_dir, "tcg")))
            bar.update()
        running, whole = [], []
        for _ in range(repeat):
            running.append(timed(lambda: qemu_running(
                lambda *c: backend._qmp(hosts[0], "q1", *c))))
            whole.append(timed(lambda: backend.check(MigrationRequest("q1", "host-a", "host-b",
                                                                      32))))
            bar.update()
        backend.destroy("q1")
    finally:
        backend.close()
    return [row("qemu: probe of a host's QEMU (uncached)", probes),
            row("qemu: source machine + CPU over QMP", running),
            row("qemu: whole check() (probes cached)", whole)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="compat-bench-"))
    labmod.sweep_leftovers()
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    rows = []
    try:
        kernel = labmod.build_guest(tmp / "guest")
        bar = tqdm(total=2 * args.repeat + 1 + max(3, args.repeat // 10), desc="pre-checks",
                   file=sys.stderr)
        lab = labmod.Lab.create(tmp / "lv")
        try:
            rows += libvirt_part(lab, kernel, args.repeat, bar)
        finally:
            lab.close()
        lab = labmod.Lab.create(tmp / "qemu")
        try:
            rows += qemu_part(lab, kernel, args.repeat, bar)
        finally:
            lab.close()
        bar.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    w = max(len(r[0]) for r in rows)
    print(f"{'what':<{w}}  {'calls':>5}  {'median ms':>9}  {'max ms':>8}")
    for name, n, med, mx in rows:
        print(f"{name:<{w}}  {n:>5}  {med:>9.2f}  {mx:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
