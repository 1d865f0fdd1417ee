"""The compatibility pre-check: ask the real destination whether it can run the VM.

Description
    Before the runner starts a migration, the backend's ``check`` asks the *destination* what
    it offers and compares it with what the VM, as it runs on its source, needs. The snapshot's
    compatibility fields (``balancer.model``: CPU model/features, networks, datastores) guide
    the planner; this module checks the real hosts, because a snapshot can be stale or
    incomplete, and a migration the hypervisor refuses half-way (or one that strands a VM off
    its network) is worse than no migration.

    **libvirt** (``libvirt_lacks``): the domain's migratable XML (after the backend's
    ``rewrite_xml`` hook, i.e. what the destination will receive) is parsed for its virt type,
    arch, machine type, ``<cpu>`` definition, interfaces and disks (``parse_domain_xml``). On the
    destination daemon:

    * CPU: ``virConnectCompareHypervisorCPU(emulator, arch, machine, virttype, cpu_xml,
      VIR_CONNECT_COMPARE_CPU_FAIL_INCOMPATIBLE)``, the hypervisor-CPU comparison (what that
      QEMU can give a guest on that host, not the bare host CPU); an incompatible CPU comes back
      as ``VIR_ERR_CPU_INCOMPATIBLE`` with the missing features, which go into the reason.
    * machine type: listed for the domain's arch in the destination's ``getCapabilities()``
      (names and canonical names, e.g. ``pc`` and ``pc-i440fx-7.2``).
    * networks: ``<interface type='network'>`` -> ``networkLookupByName`` and active;
      ``type='bridge'`` / ``type='direct'`` -> the host interface (``interfaceLookupByName``)
      exists and is up.
    * disks: ``type='volume'`` -> the pool and volume exist; ``type='file'``/``'block'`` -> the
      path is a volume of a storage pool of the destination (``storageVolLookupByPath``, after a
      refresh of the pool whose directory holds it), or, for a daemon on this machine (a local
      URI), the path exists.

    **QEMU** (``QemuProber``, ``qemu_running``, ``qemu_lacks``): what the source runs is read over
    its QMP (``qom-get /machine type`` -> the resolved machine type such as ``pc-i440fx-7.2``,
    not the alias ``pc``; the first vCPU's QOM type -> the CPU model). What a host offers is
    asked of a QEMU started there exactly as the backend would start one (its exec prefix and
    binary) with ``-machine none -accel ACCEL``: ``query-machines`` and
    ``query-cpu-definitions`` (with each model's unavailable features under that accelerator).
    An accelerator the host's QEMU cannot use is itself a lack (probed again with ``qtest`` to
    list what it has). Answers are cached per host for ``ttl_s``.

    Every lack is one short phrase (``network prod-vlan42``, ``machine type pc-i440fx-7.2``);
    ``refusal`` turns them into the reason the runner journals: ``destination host-b lacks
    network prod-vlan42 used by vm1``.
Requirements
    libvirt: ``libvirt-python`` (imported only by the libvirt functions), libvirt >= 4.4 for
    the hypervisor-CPU comparison. QEMU: the ``qemu.qmp`` client, QEMU >= 7.
Limitations
    A ``host-passthrough`` / ``maximum`` CPU is not compared (libvirt has nothing to compare;
    such guests need identical hosts). A disk on a remote destination outside every storage
    pool cannot be seen through libvirt and is not refused (define shared storage as a pool on
    each host so the check can see it); network disks (``type='network'``) are not checked. A
    bridge is checked only where libvirt's interface driver answers. For QEMU, only the machine
    type, the CPU model and the accelerator are checked (the guest's other arguments must be
    valid on every host, as the backend requires anyway).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from balancer.executor.base import BackendError, HostUnreachable, IncompatibleHost


def refusal(vm: str, host: str, lacks: Sequence[str]) -> str:
    """The reason a move is refused: ``destination host-b lacks network x used by vm1``."""
    return f"destination {host} lacks {', '.join(lacks)} used by {vm}"


def refuse_if(lacks: Sequence[str], *, vm: str, host: str) -> None:
    """Raise ``IncompatibleHost`` with the readable reason when anything is lacking."""
    if lacks:
        raise IncompatibleHost(refusal(vm, host, lacks), vm=vm, host=host)


# ------------------------------------------------------------------------------------ libvirt


@dataclass(frozen=True)
class DomainNeeds:
    """What a libvirt domain needs from the host it runs on (from its domain XML)."""

    name: str
    virt_type: str | None = None  # <domain type=...>: kvm, qemu
    arch: str | None = None
    machine: str | None = None
    emulator: str | None = None
    cpu_xml: str | None = None  # the <cpu> element, when there is something to compare
    cpu_label: str = "CPU"  # e.g. "CPU model Skylake-Server", for the reason
    networks: tuple[str, ...] = ()  # libvirt networks (<interface type='network'>)
    host_interfaces: tuple[str, ...] = ()  # bridges and direct (macvtap) devices
    disk_paths: tuple[str, ...] = ()  # file and block sources
    volumes: tuple[tuple[str, str], ...] = ()  # (pool, volume) sources


def _uniq(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i for i in items if i))


def parse_domain_xml(xml: str) -> DomainNeeds:
    """What the domain described by ``xml`` needs (``BackendError`` if it is not domain XML)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise BackendError(f"unreadable domain XML: {exc}") from None
    if root.tag != "domain":
        raise BackendError(f"not a domain XML: root element <{root.tag}>")
    name = root.findtext("name") or "?"
    ostype = root.find("os/type")
    cpu = root.find("cpu")
    cpu_xml, label = None, "CPU"
    if cpu is not None and cpu.get("mode", "custom") == "custom" \
            and (cpu.find("model") is not None or cpu.find("feature") is not None):
        cpu_xml = ET.tostring(cpu, encoding="unicode")
        model = cpu.findtext("model")
        label = f"CPU model {model.strip()}" if model and model.strip() else "CPU"
    networks: list[str] = []
    host_ifs: list[str] = []
    for iface in root.iterfind("devices/interface"):
        src = iface.find("source")
        if src is None:
            continue
        kind = iface.get("type")
        if kind == "network":
            networks.append(src.get("network", ""))
        elif kind == "bridge":
            host_ifs.append(src.get("bridge", ""))
        elif kind == "direct":
            host_ifs.append(src.get("dev", ""))
    paths: list[str] = []
    volumes: list[tuple[str, str]] = []
    for disk in root.iterfind("devices/disk"):
        src = disk.find("source")
        if src is None:
            continue  # an empty CD-ROM drive
        kind = disk.get("type")
        if kind == "file":
            paths.append(src.get("file", ""))
        elif kind == "block":
            paths.append(src.get("dev", ""))
        elif kind == "volume" and src.get("pool") and src.get("volume"):
            volumes.append((src.get("pool", ""), src.get("volume", "")))
    return DomainNeeds(
        name=name, virt_type=root.get("type"),
        arch=ostype.get("arch") if ostype is not None else None,
        machine=ostype.get("machine") if ostype is not None else None,
        emulator=(root.findtext("devices/emulator") or "").strip() or None,
        cpu_xml=cpu_xml, cpu_label=label, networks=_uniq(networks),
        host_interfaces=_uniq(host_ifs), disk_paths=_uniq(paths),
        volumes=tuple(dict.fromkeys(volumes)))


def is_local_uri(uri: str) -> bool:
    """True for a libvirt URI of a daemon on this machine (no host part: ``qemu:///system``,
    ``qemu+unix:///system?socket=...``), whose file system is this machine's."""
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    return not parts.hostname and transport in ("", "unix")


def _machines(caps_xml: str, arch: str | None) -> set[str]:
    root = ET.fromstring(caps_xml)
    out: set[str] = set()
    for guest in root.iterfind("guest"):
        a = guest.find("arch")
        if a is None or (arch and a.get("name") != arch):
            continue
        for m in a.iter("machine"):
            if m.text:
                out.add(m.text.strip())
            if m.get("canonical"):
                out.add(m.get("canonical", ""))
    return out


def _message(exc: Any) -> str:
    msg = exc.get_error_message() or str(exc)
    return msg.split(": ", 1)[1] if msg.startswith("the CPU is incompatible") and ": " in msg \
        else msg


def _pool_holding(conn: Any, path: str) -> Any | None:
    """The active storage pool of ``conn`` whose target directory holds ``path``, if any."""
    import libvirt

    d = os.path.dirname(os.path.normpath(path))
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        target = ET.fromstring(pool.XMLDesc()).findtext("target/path")
        if target and os.path.normpath(target) == d:
            return pool
    return None


def libvirt_lacks(conn: Any, needs: DomainNeeds, *, local: bool) -> list[str]:
    """What the destination daemon behind ``conn`` lacks to run the domain ``needs`` describes.

    ``local``: the daemon shares this machine's file system (``is_local_uri``), so a disk path
    outside every storage pool can be checked with ``os.path.exists``. libvirt errors other
    than "not found" propagate (the backend maps them at its boundary).
    """
    import libvirt

    lacks: list[str] = []
    machine = needs.machine
    if machine and machine not in _machines(conn.getCapabilities(), needs.arch):
        lacks.append(f"machine type {machine}")
        machine = None  # compare the CPU with the hypervisor's default machine instead
    if needs.cpu_xml is not None:
        try:
            conn.compareHypervisorCPU(needs.emulator, needs.arch, machine,
                                      needs.virt_type, needs.cpu_xml,
                                      libvirt.VIR_CONNECT_COMPARE_CPU_FAIL_INCOMPATIBLE)
        except libvirt.libvirtError as exc:
            code = exc.get_error_code()
            if code == libvirt.VIR_ERR_CPU_INCOMPATIBLE:
                lacks.append(f"{needs.cpu_label} ({_message(exc)})")
            elif code not in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_UNSUPPORTED):
                lacks.append(f"what the {needs.cpu_label} needs ({_message(exc)})")
    for net in needs.networks:
        try:
            active = conn.networkLookupByName(net).isActive()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
                raise
            lacks.append(f"network {net}")
            continue
        if not active:
            lacks.append(f"network {net} (defined, not active)")
    for dev in needs.host_interfaces:
        try:
            up = conn.interfaceLookupByName(dev).isActive()
        except libvirt.libvirtError as exc:
            code = exc.get_error_code()
            if code == libvirt.VIR_ERR_NO_INTERFACE:
                lacks.append(f"host interface {dev}")
            elif code not in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_UNSUPPORTED):
                raise
            continue
        if not up:
            lacks.append(f"host interface {dev} (down)")
    for pool_name, vol in needs.volumes:
        try:
            conn.storagePoolLookupByName(pool_name).storageVolLookupByName(vol)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in (libvirt.VIR_ERR_NO_STORAGE_POOL,
                                            libvirt.VIR_ERR_NO_STORAGE_VOL):
                raise
            lacks.append(f"storage volume {pool_name}/{vol}")
    for path in needs.disk_paths:
        if not _disk_present(conn, path, local=local):
            lacks.append(f"disk {path}")
    return lacks


def _disk_present(conn: Any, path: str, *, local: bool) -> bool:
    import libvirt

    def lookup() -> bool:
        try:
            conn.storageVolLookupByPath(path)
            return True
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in (libvirt.VIR_ERR_NO_STORAGE_VOL,
                                            libvirt.VIR_ERR_NO_SUPPORT):
                raise
            return False

    if lookup():
        return True
    try:
        pool = _pool_holding(conn, path)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise
        pool = None
    if pool is not None:  # its directory is a pool there: the pool knows whether it holds it
        pool.refresh(0)
        return lookup()
    if local:
        return os.path.exists(path)
    return True  # on a remote host, outside every pool: cannot be seen (see Limitations)


# --------------------------------------------------------------------------------------- QEMU


@dataclass(frozen=True)
class QemuOffer:
    """What one host's QEMU offers: machine types and CPU models under an accelerator."""

    machines: frozenset[str]  # names and aliases
    cpus: dict[str, tuple[str, ...]]  # CPU QOM type name (qemu64-x86_64-cpu) -> unavailable
    cpu_names: dict[str, str]  # CPU QOM type name -> model name (qemu64)
    accel: str
    accel_error: str = ""  # why the accelerator cannot be used there ("" when it can)


@dataclass(frozen=True)
class RunningGuest:
    """What a guest runs with on its source: resolved machine type, CPU QOM type."""

    machine: str  # e.g. pc-i440fx-7.2 (never an alias)
    cpu_type: str | None  # e.g. qemu64-x86_64-cpu


QmpCall = Callable[..., list[Any]]


def qemu_running(qmp_call: QmpCall) -> RunningGuest:
    """Ask a running QEMU (``qmp_call(*commands) -> results``) its machine type and CPU."""
    mtype, cpus = qmp_call(("qom-get", {"path": "/machine", "property": "type"}),
                           "query-cpus-fast")
    cpu_type = None
    if cpus:
        cpu_type = str(qmp_call(("qom-get", {"path": cpus[0]["qom-path"],
                                             "property": "type"}))[0])
    machine = str(mtype)
    return RunningGuest(machine.removesuffix("-machine"), cpu_type)


@dataclass
class QemuProber:
    """Asks each host's QEMU what it offers; answers cached per host for ``ttl_s`` seconds."""

    binary: str = "qemu-system-x86_64"
    timeout: float = 10.0
    ttl_s: float = 300.0
    _cache: dict[tuple[Any, ...], tuple[float, QemuOffer]] = field(default_factory=dict)
    probes: int = 0  # QEMU processes started so far (tests, diagnostics)

    def offer(self, exec_prefix: Sequence[str], run_dir: Path, accel: str) -> QemuOffer:
        key = (tuple(exec_prefix), str(run_dir), self.binary, accel)
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        try:
            offer = self._probe(exec_prefix, run_dir, accel, accel)
        except _AccelUnusable as exc:  # list what it has all the same
            offer = self._probe(exec_prefix, run_dir, "qtest", accel, str(exc))
        self._cache[key] = (time.monotonic(), offer)
        return offer

    def _probe(self, exec_prefix: Sequence[str], run_dir: Path, use: str, wanted: str,
               accel_error: str = "") -> QemuOffer:
        from balancer.executor.qemu import qmp

        sock = Path(run_dir) / f".probe-{uuid.uuid4().hex[:8]}.qmp"
        argv = [*exec_prefix, self.binary, "-machine", "none", "-accel", use, "-nodefaults",
                "-display", "none", "-qmp", f"unix:{sock},server=on,wait=off"]
        self.probes += 1
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
        except OSError as exc:
            raise HostUnreachable(f"cannot run {self.binary} there: {exc}") from exc

        def exited() -> None:
            """Raise why QEMU exited (it may bind its socket before it fails)."""
            err = (proc.stderr.read() if proc.stderr else "").strip()
            last = (err.splitlines() or [f"exit status {proc.returncode}"])[-1]
            if "accelerator" in last and use != "qtest":
                raise _AccelUnusable(last)
            raise BackendError(f"{self.binary} did not start there: {last}")

        try:
            deadline = time.monotonic() + self.timeout
            while not sock.exists():
                if proc.poll() is not None:
                    exited()
                if time.monotonic() > deadline:
                    raise HostUnreachable(f"{self.binary} gave no QMP socket in "
                                          f"{self.timeout:g} s")
                time.sleep(0.02)
            try:
                machines, cpus = qmp(sock, "query-machines", "query-cpu-definitions", "quit",
                                     timeout=self.timeout)[:2]
            except Exception:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(2)
                if proc.poll() is not None and proc.returncode != 0:
                    exited()
                raise
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        names = {m["name"] for m in machines} | {m["alias"] for m in machines if "alias" in m}
        return QemuOffer(
            machines=frozenset(names),
            cpus={c["typename"]: tuple(c.get("unavailable-features", [])) for c in cpus
                  if "typename" in c},
            cpu_names={c["typename"]: c["name"] for c in cpus if "typename" in c},
            accel=wanted, accel_error=accel_error)


class _AccelUnusable(Exception):
    pass


def qemu_lacks(running: RunningGuest, source: QemuOffer, dest: QemuOffer) -> list[str]:
    """What ``dest`` lacks to take over a guest running as ``running`` on ``source``."""
    lacks: list[str] = []
    if dest.accel_error:
        lacks.append(f"accelerator {dest.accel} ({dest.accel_error})")
    if running.machine not in dest.machines:
        lacks.append(f"machine type {running.machine}")
    cpu = running.cpu_type
    if cpu is not None:
        name = source.cpu_names.get(cpu) or cpu.removesuffix("-cpu")
        if cpu not in dest.cpus:
            lacks.append(f"CPU model {name}")
        elif not dest.accel_error:
            missing = sorted(set(dest.cpus[cpu]) - set(source.cpus.get(cpu, ())))
            if missing:
                lacks.append(f"CPU model {name} with {', '.join(missing)}")
    return lacks
