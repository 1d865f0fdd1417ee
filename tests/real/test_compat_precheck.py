"""Issue 6 on real hosts: the pre-migration check asks the destination itself.

libvirt: two libvirtds in network namespaces (the executor's lab). A domain on host-a uses the
libvirt network ``prod-vlan42``, which host-b does not define: the runner refuses the move
before any migration starts (the backend's ``start`` is never called, the journal says
``skipped`` with the reason), the other move of the plan still runs, and libvirt itself would
indeed have refused that migration. Once host-b defines the network the move goes through.
The CPU (``compareHypervisorCPU``), machine-type and disk checks run against the real daemon.

QEMU: host-b's QEMU is swapped for Debian's reduced microvm build (no TCG, no ``pc`` machine):
the move is refused before a destination QEMU is started, naming what host-b lacks.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from balancer.executor.base import IncompatibleHost, MigrationRequest, MigrationStatus
from balancer.executor.compat import libvirt_lacks, parse_domain_xml
from balancer.executor.config import parse_config
from balancer.executor.journal import Journal, State
from balancer.executor.libvirt_backend import LibvirtBackend, LibvirtHost
from balancer.executor.qemu import GuestSpec, QemuBackend, QemuHost
from balancer.executor.runner import Runner
from balancer.model import Move
from balancer.planner import make_waves
from balancer.snapshot import parse_snapshot

from . import lab as labmod
from .conftest import poll_until_done, qemu_hosts, wait_beats

NET = "prod-vlan42"
MICROVM = Path("/usr/bin/qemu-system-x86_64-microvm")


class Counting(LibvirtBackend):
    """The libvirt backend, counting the migrations it is asked to start."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.started: list[tuple[str, str]] = []

    def start(self, request: MigrationRequest):  # type: ignore[no-untyped-def]
        self.started.append((request.vm, request.target))
        return super().start(request)


class LvLab:
    def __init__(self, the_lab: labmod.Lab, uris: dict[str, str], kernel: Path) -> None:
        self.lab, self.uris, self.kernel = the_lab, uris, kernel
        self.hosts = {h.name: h for h in the_lab.hosts}

    def backend(self) -> Counting:
        def rewrite(xml: str, target: str) -> str:  # per-host folders: disks, logs
            return re.sub(r"/host-[ab]/", f"/{target}/", xml)

        return Counting([LibvirtHost(h.name, self.uris[h.name],
                                     f"qemu+tcp://{h.address}/system") for h in self.lab.hosts],
                        rewrite_xml=rewrite)

    def define_network(self, host: str) -> None:
        """A bridged libvirt network ``prod-vlan42`` on ``host`` (its bridge in the netns)."""
        h = self.hosts[host]
        h.sh("ip", "link", "add", "brvlan42", "type", "bridge")
        h.sh("ip", "link", "set", "brvlan42", "up")
        conn = libvirt.open(self.uris[host])
        try:
            net = conn.networkDefineXML(f"<network><name>{NET}</name><forward mode='bridge'/>"
                                        "<bridge name='brvlan42'/></network>")
            net.create()
        finally:
            conn.close()

    def create(self, vm: str, host: str, *, network: str | None = None, disk: Path | None = None,
               mem: int = 32) -> None:
        devices = ""
        if network:
            devices += (f"<interface type='network'><source network='{network}'/>"
                        "<model type='e1000'/></interface>")
        if disk:
            devices += (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                        f"<source file='{disk}'/><target dev='hda' bus='ide'/></disk>")
        xml = f"""<domain type='qemu'><name>{vm}</name>
  <memory unit='MiB'>{mem}</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{self.kernel}</kernel>
    <cmdline>fill={mem - 8}</cmdline></os>
  <cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{devices}
    <memballoon model='none'/></devices></domain>"""
        conn = libvirt.open(self.uris[host])
        try:
            conn.createXML(xml, 0)
        finally:
            conn.close()

    def destroy_all(self) -> None:
        for uri in self.uris.values():
            conn = libvirt.open(uri)
            try:
                for dom in conn.listAllDomains():
                    if dom.isActive():
                        dom.destroy()
            finally:
                conn.close()


@pytest.fixture(scope="module")
def lvlab(tmp_path_factory: pytest.TempPathFactory, guest_kernel: Path) -> Iterator[LvLab]:
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    the_lab = labmod.Lab.create(tmp_path_factory.mktemp("compat-lab"))
    try:
        uris = {h.name: labmod.start_libvirtd(the_lab, h) for h in the_lab.hosts}
        c = LvLab(the_lab, uris, guest_kernel)
        the_lab.cleanups.append(c.destroy_all)  # guests before daemons before namespaces
        yield c
    finally:
        the_lab.close()


def two_moves(vms: dict[str, int]) -> tuple[object, list[Move]]:
    hosts = [{"name": n, "cpu_capacity": 4, "mem_capacity_mb": 1024} for n in ("host-a",
                                                                                 "host-b")]
    snap = parse_snapshot({"version": 1, "hosts": hosts, "vms": [
        {"name": vm, "host": "host-a", "vcpus": 1, "mem_mb": mem, "cpu_demand": 0.1,
         "mem_demand_mb": mem} for vm, mem in vms.items()]})
    return snap, [Move(vm, "host-a", "host-b", "", mem) for vm, mem in vms.items()]


def test_a_network_missing_on_the_destination_is_refused_before_any_migration_starts(
        lvlab: LvLab, tmp_path: Path) -> None:
    lvlab.define_network("host-a")
    lvlab.create("net1", "host-a", network=NET)
    lvlab.create("plain1", "host-a")
    snap, moves = two_moves({"net1": 32, "plain1": 32})
    backend = lvlab.backend()
    journal = Journal(tmp_path / "journal.sqlite")
    cfg = parse_config({"migration": {"poll_interval_s": 0.1}})
    try:
        summary = Runner(backend, journal, cfg, {"host-a": 1024, "host-b": 1024}).run(
            make_waves(snap, moves))
        by_vm = {e.vm: e for e in summary.entries}
        assert by_vm["net1"].state is State.SKIPPED
        assert by_vm["net1"].reason == \
            f"incompatible: destination host-b lacks network {NET} used by net1"
        assert by_vm["plain1"].state is State.SUCCEEDED  # the plan went on
        assert backend.started == [("plain1", "host-b")]  # net1 was never started
        events = journal.events(summary.plan_id, by_vm["net1"].id)
        assert [ev[2] for ev in events] == ["planned", "skipped"]
        assert f"lacks network {NET}" in events[-1][5]
        assert backend.locate("net1") == "host-a" and backend.locate("plain1") == "host-b"

        # libvirt itself would have refused that migration (so the pre-check saved a failed
        # start, not a good move): the destination daemon rejects the domain's network.
        conn = libvirt.open(lvlab.uris["host-a"])
        try:
            with pytest.raises(libvirt.libvirtError, match=NET):
                conn.lookupByName("net1").migrateToURI3(
                    f"qemu+tcp://{lvlab.hosts['host-b'].address}/system", {},
                    libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER)
        finally:
            conn.close()
        assert backend.locate("net1") == "host-a"

        # host-b gets the network: the same move now passes the check and the VM moves,
        # still on its network
        lvlab.define_network("host-b")
        backend.check(MigrationRequest("net1", "host-a", "host-b", 32))
        h = backend.start(MigrationRequest("net1", "host-a", "host-b", 32))
        assert poll_until_done(backend, h, timeout=60).status is MigrationStatus.COMPLETED
        assert backend.locate("net1") == "host-b"
    finally:
        journal.close()
        backend.close()
        lvlab.destroy_all()


def test_cpu_machine_and_disks_are_checked_on_the_destination_daemon(lvlab: LvLab) -> None:
    a, b = lvlab.hosts["host-a"], lvlab.hosts["host-b"]
    (a.root / "disks").mkdir(exist_ok=True)
    (b.root / "disks").mkdir(exist_ok=True)
    disk = a.root / "disks" / "d1.img"
    disk.write_bytes(b"\0" * 65536)
    conn_b = libvirt.open(lvlab.uris["host-b"])
    pool = conn_b.storagePoolDefineXML(
        f"<pool type='dir'><name>disks</name><target><path>{b.root / 'disks'}</path></target>"
        "</pool>")
    pool.create()
    lvlab.create("disk1", "host-a", disk=disk)
    backend = lvlab.backend()
    try:
        # the destination's copy of the disk (host-b/disks/d1.img after rewrite_xml) is not in
        # host-b's pool yet
        want = b.root / "disks" / "d1.img"
        with pytest.raises(IncompatibleHost) as err:
            backend.check(MigrationRequest("disk1", "host-a", "host-b", 32))
        assert str(err.value) == f"destination host-b lacks disk {want} used by disk1"
        want.write_bytes(b"\0" * 65536)  # the pool is refreshed by the check
        backend.check(MigrationRequest("disk1", "host-a", "host-b", 32))

        # CPU and machine type against the destination's hypervisor (what its QEMU offers)
        conn_a = libvirt.open(lvlab.uris["host-a"])
        try:
            xml = conn_a.lookupByName("disk1").XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
        finally:
            conn_a.close()
        needs = parse_domain_xml(xml.replace("/host-a/", "/host-b/"))
        assert needs.machine and needs.machine.startswith("pc-i440fx-")  # resolved, not "pc"
        assert needs.cpu_label == "CPU model qemu64"
        assert libvirt_lacks(conn_b, needs, local=True) == []
        bad = parse_domain_xml(xml.replace(">qemu64<", ">Icelake-Server<")
                               .replace(needs.machine, "pc-i440fx-99.0")
                               .replace("/host-a/", "/host-b/"))
        lacks = libvirt_lacks(conn_b, bad, local=True)
        assert lacks[0] == "machine type pc-i440fx-99.0"
        assert lacks[1].startswith("CPU model Icelake-Server (")
        assert "avx512f" in lacks[1]  # libvirt names the features TCG cannot give
        assert libvirt_lacks(conn_b, parse_domain_xml(xml), local=True) == []  # a's disk path
        gone = parse_domain_xml(xml.replace(str(disk), "/nonexistent/d1.img"))
        assert libvirt_lacks(conn_b, gone, local=True) == ["disk /nonexistent/d1.img"]
    finally:
        backend.close()
        lvlab.destroy_all()
        pool.destroy()
        pool.undefine()
        conn_b.close()


# --------------------------------------------------------------------------------------- QEMU


@pytest.mark.skipif(not MICROVM.exists(), reason="Debian's qemu-system-x86 ships it")
def test_qemu_destination_without_the_guests_machine_and_accelerator_is_refused(
        lab: labmod.Lab, qemu: QemuBackend, guest_kernel: Path, tmp_path: Path) -> None:
    spec = GuestSpec("q1", 32, kernel=str(guest_kernel), append="fill=24")
    qemu.launch(spec, "host-a")
    wait_beats(qemu.serial_log("q1", "host-a"), 1)
    qemu.check(MigrationRequest("q1", "host-a", "host-b", 32))  # same QEMU: compatible

    # host-b runs another QEMU build: Debian's reduced microvm binary (no TCG, no pc machine)
    wrapper = tmp_path / "microvm-qemu"
    wrapper.write_text(f"#!/bin/sh\nshift\nexec {MICROVM} \"$@\"\n")
    wrapper.chmod(0o755)
    hosts = qemu_hosts(lab)
    b = hosts[1]
    hosts[1] = QemuHost(b.name, b.address, b.run_dir, (*b.exec_prefix, str(wrapper)))
    backend = QemuBackend(hosts)
    snap, moves = two_moves({"q1": 32})
    journal = Journal(tmp_path / "journal.sqlite")
    try:
        summary = Runner(backend, journal, parse_config({}),
                         {"host-a": 1024, "host-b": 1024}).run(make_waves(snap, moves))
        (e,) = summary.entries
        assert e.state is State.SKIPPED and e.attempts == 0
        assert e.reason.startswith("incompatible: destination host-b lacks accelerator tcg (")
        assert re.search(r"\), machine type pc-i440fx-[\d.]+ used by q1$", e.reason), e.reason
        assert not (b.run_dir / "q1.json").exists()  # no destination QEMU was started
        out = subprocess.run(["ip", "netns", "pids", lab.b.ns], capture_output=True, text=True)
        assert out.stdout.split() == []  # the probes are gone too
        assert backend.locate("q1") == "host-a"
        before = len(qemu.serial_log("q1", "host-a").read_text().splitlines())
        time.sleep(1.2)
        assert len(qemu.serial_log("q1", "host-a").read_text().splitlines()) > before
    finally:
        journal.close()
        backend.close()
