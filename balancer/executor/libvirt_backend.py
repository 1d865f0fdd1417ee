"""Live migration through libvirt (``libvirt-python``): the path a production KVM cluster uses.

Description
    Each host is a libvirtd the balancer reaches at ``uri`` (``qemu+tcp://``, ``qemu+ssh://``,
    or a local unix socket) and that its peers reach at ``migration_uri`` (normally
    ``qemu+tcp://HOST/system``). A migration is a live, peer-to-peer ``migrateToURI3``
    (``VIR_MIGRATE_LIVE | VIR_MIGRATE_PEER2PEER``, plus ``PERSIST_DEST | UNDEFINE_SOURCE`` for a
    persistent domain): the source daemon talks to the destination daemon itself, as
    ``virsh migrate --live --p2p`` does. The call blocks, so it runs in a worker thread on its
    own connection; ``poll`` reads the source domain's ``jobStats()`` (data processed, total,
    bandwidth, downtime) while it runs and the thread's outcome when it ends. ``cancel`` is
    ``abortJob()``: the source keeps running. Bandwidth goes in the migration parameters
    (``VIR_MIGRATE_PARAM_BANDWIDTH``, MiB/s) and the downtime limit through
    ``migrateSetMaxDowntime``. The inventory (domains per host, memory, vCPUs) is read from
    libvirt; a destination's incoming copy (job ``migration in``) is not counted as a VM.
    libvirt errors are mapped into the BackendError tree in one place, ``map_libvirt_errors``.
Requirements
    libvirt >= 6 on every host with the QEMU driver, TCP (or TLS/SSH) between the daemons,
    shared or no guest storage; ``libvirt-python`` (optional extra ``balancer[libvirt]``).
Limitations
    Peer-to-peer pre-copy only (no post-copy, no storage migration). After an executor
    restart a migration still running in libvirt is adopted by ``find_migration``/``poll``,
    but its final error message is unknown (only where the domain ended up).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import libvirt
from pydantic import BaseModel, ConfigDict, Field

from balancer.executor.base import (
    BackendError,
    Handle,
    HostUnreachable,
    IncompatibleHost,
    MigrationFailed,
    MigrationRequest,
    MigrationStatus,
    Progress,
    VMInfo,
    VMNotFound,
)
from balancer.executor.compat import is_local_uri, libvirt_lacks, parse_domain_xml, refuse_if
from balancer.executor.config import ExecutorConfig, backend_section
from balancer.model import ClusterSnapshot

MIB = 1024 * 1024
_UNREACHABLE = {libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_RPC,
                libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_OPERATION_TIMEOUT}
_INCOMPATIBLE = {libvirt.VIR_ERR_CPU_INCOMPATIBLE, libvirt.VIR_ERR_MIGRATE_UNSAFE,
                 libvirt.VIR_ERR_CONFIG_UNSUPPORTED, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
                 libvirt.VIR_ERR_NO_SUPPORT}


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error on stderr by default; we report them ourselves."""


@contextlib.contextmanager
def map_libvirt_errors(*, vm: str | None = None, host: str | None = None,
                       migrating: bool = False) -> Iterator[None]:
    """Map ``libvirtError`` (and socket errors) into the BackendError tree."""
    try:
        yield
    except BackendError:
        raise
    except libvirt.libvirtError as exc:
        code = exc.get_error_code()
        msg = f"libvirt on {host or '?'} for {vm or '?'}: {exc.get_error_message() or exc}"
        if code == libvirt.VIR_ERR_NO_DOMAIN:
            raise VMNotFound(msg, vm=vm, host=host) from exc
        if code in _UNREACHABLE or "client socket is closed" in str(exc):
            raise HostUnreachable(msg, vm=vm, host=host) from exc
        if code in _INCOMPATIBLE:
            raise IncompatibleHost(msg, vm=vm, host=host) from exc
        if migrating:
            raise MigrationFailed(msg, vm=vm, host=host) from exc
        raise BackendError(msg, vm=vm, host=host) from exc
    except OSError as exc:
        raise HostUnreachable(f"libvirt on {host or '?'} unreachable: {exc}", vm=vm,
                              host=host) from exc


@dataclass(frozen=True)
class LibvirtHost:
    name: str
    uri: str  # how the balancer connects to this host's libvirtd
    migration_uri: str  # how the other daemons reach it (peer-to-peer destination)


@dataclass
class _Flight:
    handle: Handle
    thread: threading.Thread | None
    started: float
    done: threading.Event = field(default_factory=threading.Event)
    error: BackendError | None = None
    aborted: bool = False
    last: Progress = field(default_factory=lambda: Progress(MigrationStatus.ACTIVE))


class LibvirtBackend:
    """Backend over libvirt. See the module docstring."""

    name = "libvirt"

    def __init__(self, hosts: list[LibvirtHost], *, default_bandwidth_mbps: float | None = None,
                 default_downtime_ms: int | None = None,
                 rewrite_xml: Callable[[str, str], str] | None = None,
                 switchover_timeout: float = 10.0) -> None:
        if not hosts:
            raise ValueError("LibvirtBackend needs at least one host")
        names = [h.name for h in hosts]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate host names: {names}")
        self.hosts = {h.name: h for h in hosts}
        self.default_bandwidth_mbps = default_bandwidth_mbps
        self.default_downtime_ms = default_downtime_ms
        self.rewrite_xml = rewrite_xml  # (domain XML, target host) -> XML for the destination
        self.switchover_timeout = switchover_timeout
        self._conns: dict[str, libvirt.virConnect] = {}
        self._flights: dict[str, _Flight] = {}
        self._lock = threading.Lock()
        libvirt.registerErrorHandler(_quiet, None)

    # ------------------------------------------------------------------ connections
    def _host(self, name: str, vm: str | None = None) -> LibvirtHost:
        try:
            return self.hosts[name]
        except KeyError:
            raise IncompatibleHost(f"unknown host {name!r} (known: {sorted(self.hosts)})",
                                   vm=vm, host=name) from None

    def conn(self, host: str) -> libvirt.virConnect:
        """The (cached) connection to ``host``'s daemon; reopened when it has died."""
        h = self._host(host)
        with self._lock:
            c = self._conns.get(host)
            if c is not None:
                try:
                    if c.isAlive():
                        return c
                except libvirt.libvirtError:
                    pass
                with contextlib.suppress(libvirt.libvirtError):
                    c.close()
            with map_libvirt_errors(host=host):
                c = libvirt.open(h.uri)
            self._conns[host] = c
            return c

    def _domain(self, host: str, vm: str) -> libvirt.virDomain | None:
        """The active domain ``vm`` on ``host`` (None if it has none, or it just vanished:
        a migration's source domain is removed the moment the destination takes over)."""
        with map_libvirt_errors(vm=vm, host=host):
            try:
                dom = self.conn(host).lookupByName(vm)
                return dom if dom.isActive() else None
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise

    @staticmethod
    def _operation(dom: libvirt.virDomain) -> int:
        """The domain's current job operation (0 when it has no job)."""
        try:
            stats = dom.jobStats()
        except libvirt.libvirtError:
            return 0
        if stats.get("type", 0) == libvirt.VIR_DOMAIN_JOB_NONE:
            return 0
        return int(stats.get("operation", 0))

    def _incoming(self, dom: libvirt.virDomain) -> bool:
        """A destination's copy waiting for its state (job "migration in"), not a VM yet."""
        state, reason = dom.state()
        if state != libvirt.VIR_DOMAIN_PAUSED:
            return False
        op = self._operation(dom)
        if op == libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT:
            return False  # a source in its stop-and-copy phase
        return op == libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN or \
            reason == libvirt.VIR_DOMAIN_PAUSED_MIGRATION

    # ------------------------------------------------------------------ Backend protocol
    def inventory(self) -> list[VMInfo]:
        out: list[VMInfo] = []
        for host in self.hosts:
            with map_libvirt_errors(host=host):
                doms = self.conn(host).listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
                for dom in doms:
                    try:
                        if self._incoming(dom):
                            continue
                        state, _max_kib, mem_kib, vcpus, _cpu = dom.info()
                    except libvirt.libvirtError as exc:
                        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                            continue  # left the host since the listing (migrated away)
                        raise
                    out.append(VMInfo(dom.name(), host, int(vcpus), int(mem_kib) // 1024,
                                      state == libvirt.VIR_DOMAIN_RUNNING))
        return sorted(out, key=lambda v: (v.name, v.host))

    def _where(self, vm: str) -> tuple[list[str], list[str]]:
        """Hosts where ``vm`` is on (running or paused), hosts where an incoming copy waits."""
        on, incoming = [], []
        for host in self.hosts:
            dom = self._domain(host, vm)
            if dom is None:
                continue
            with map_libvirt_errors(vm=vm, host=host):
                try:
                    (incoming if self._incoming(dom) else on).append(host)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise  # else: gone since the lookup (switch-over)
        return on, incoming

    def locate(self, vm: str) -> str | None:
        deadline = time.monotonic() + self.switchover_timeout
        while True:
            on, incoming = self._where(vm)
            if len(on) > 1:
                raise BackendError(f"VM {vm} is active on several hosts: {sorted(on)}", vm=vm)
            if on:
                return on[0]
            if not incoming or time.monotonic() > deadline:
                return None
            time.sleep(0.05)  # switch-over instant: wait for the destination to resume

    def check(self, request: MigrationRequest) -> None:
        vm = request.vm
        self._host(request.source, vm)
        target = self._host(request.target, vm)
        if request.source == request.target:
            raise IncompatibleHost(f"{vm}: source and target are both {target.name}", vm=vm,
                                   host=target.name)
        where = self.locate(vm)
        if where is None:
            raise VMNotFound(f"VM {vm} runs on no host", vm=vm, host=request.source)
        if where != request.source:
            raise VMNotFound(f"VM {vm} runs on {where}, not on {request.source}", vm=vm,
                             host=where)
        if any(f.handle.request.vm == vm and f.last.status is MigrationStatus.ACTIVE
               for f in self._flights.values()):
            raise BackendError(f"VM {vm} is already migrating", vm=vm, host=request.source)
        with map_libvirt_errors(vm=vm, host=target.name):
            free_mb = self.conn(target.name).getFreeMemory() / MIB
        if request.mem_mb > free_mb:
            raise IncompatibleHost(f"{target.name} has {free_mb:.0f} MiB free, {vm} needs "
                                   f"{request.mem_mb} MiB", vm=vm, host=target.name)
        # Compatibility (balancer.executor.compat): the destination daemon is asked about the
        # CPU, machine type, networks and disks of the XML it would receive.
        dom = self._domain(request.source, vm)
        if dom is None:
            raise VMNotFound(f"VM {vm} is not active on {request.source}", vm=vm,
                             host=request.source)
        with map_libvirt_errors(vm=vm, host=request.source):
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
        if self.rewrite_xml is not None:
            xml = self.rewrite_xml(xml, target.name)
        with map_libvirt_errors(vm=vm, host=target.name):
            lacks = libvirt_lacks(self.conn(target.name), parse_domain_xml(xml),
                                  local=is_local_uri(target.uri))
        refuse_if(lacks, vm=vm, host=target.name)

    def start(self, request: MigrationRequest) -> Handle:
        self.check(request)
        vm, src = request.vm, request.source
        target = self.hosts[request.target]
        dom = self._domain(src, vm)
        if dom is None:
            raise VMNotFound(f"VM {vm} is not active on {src}", vm=vm, host=src)
        params: dict[str, Any] = {}
        bw = request.bandwidth_mbps or self.default_bandwidth_mbps
        if bw:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = max(1, int(bw * 1e6 / 8 / MIB))
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
        with map_libvirt_errors(vm=vm, host=src):
            if dom.isPersistent():
                flags |= libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
            if self.rewrite_xml is not None:
                xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
                params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = self.rewrite_xml(xml, target.name)
            downtime = request.downtime_ms or self.default_downtime_ms
            if downtime:
                dom.migrateSetMaxDowntime(int(downtime))
        handle = Handle(request, uuid.uuid4().hex)
        flight = _Flight(handle, None, time.monotonic())

        def work() -> None:
            try:
                with map_libvirt_errors(vm=vm, host=src, migrating=True):
                    own = libvirt.open(self.hosts[src].uri)  # its own connection
                    try:
                        own.lookupByName(vm).migrateToURI3(target.migration_uri, params, flags)
                    finally:
                        with contextlib.suppress(libvirt.libvirtError):
                            own.close()
            except BackendError as exc:
                flight.error = exc
            finally:
                flight.done.set()

        flight.thread = threading.Thread(target=work, name=f"migrate-{vm}", daemon=True)
        self._flights[handle.token] = flight
        flight.thread.start()
        return handle

    def _flight(self, handle: Handle) -> _Flight:
        f = self._flights.get(handle.token)
        if f is None:  # a handle from before a restart: watch the domain instead of a thread
            self._host(handle.request.source, handle.request.vm)
            self._host(handle.request.target, handle.request.vm)
            f = _Flight(handle, None, time.monotonic())
            self._flights[handle.token] = f
        return f

    def poll(self, handle: Handle) -> Progress:
        f = self._flight(handle)
        if f.last.status is not MigrationStatus.ACTIVE:
            return f.last
        req = handle.request
        if f.thread is None:
            return self._poll_adopted(f)
        if not f.done.is_set():
            prog = self._job_progress(req)
            f.last = prog
            return prog
        if f.error is None:
            final = self._completed_stats(req)
            f.last = final
            return final
        status = MigrationStatus.CANCELLED if f.aborted else MigrationStatus.FAILED
        f.last = Progress(status, total_mb=float(req.mem_mb), error=str(f.error))
        return f.last

    def _job_progress(self, req: MigrationRequest) -> Progress:
        prog = Progress(MigrationStatus.ACTIVE, total_mb=float(req.mem_mb))
        dom = self._domain(req.source, req.vm)
        if dom is None:
            return prog
        try:
            s = dom.jobStats()
        except libvirt.libvirtError:
            return prog
        if s.get("type", 0) != libvirt.VIR_DOMAIN_JOB_NONE:
            prog.transferred_mb = s.get("memory_processed", s.get("data_processed", 0)) / MIB
            prog.total_mb = s.get("memory_total", 0) / MIB or prog.total_mb
            prog.rate_mbps = s.get("memory_bps", 0) * 8 / 1e6
            if "downtime" in s:
                prog.downtime_ms = float(s["downtime"])
        return prog

    def _completed_stats(self, req: MigrationRequest) -> Progress:
        prog = Progress(MigrationStatus.COMPLETED, total_mb=float(req.mem_mb))
        dom = self._domain(req.target, req.vm)
        if dom is not None:
            with contextlib.suppress(libvirt.libvirtError):
                s = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
                prog.transferred_mb = s.get("memory_processed", 0) / MIB
                prog.total_mb = s.get("memory_total", 0) / MIB or prog.total_mb
                prog.rate_mbps = s.get("memory_bps", 0) * 8 / 1e6
                if "downtime" in s:
                    prog.downtime_ms = float(s["downtime"])
        if self.locate(req.vm) != req.target:
            prog.status = MigrationStatus.FAILED
            prog.error = f"libvirt reported success but {req.vm} is not running on {req.target}"
        return prog

    def _poll_adopted(self, f: _Flight) -> Progress:
        req = f.handle.request
        dom = self._domain(req.source, req.vm)
        if dom is not None and self._operation(dom) == \
                libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT:
            return self._job_progress(req)
        where = self.locate(req.vm)
        if where == req.target:
            f.last = Progress(MigrationStatus.COMPLETED, float(req.mem_mb), float(req.mem_mb))
        elif where == req.source:
            f.last = Progress(MigrationStatus.FAILED, total_mb=float(req.mem_mb),
                              error="no migration in flight; the VM is on its source")
        else:
            raise VMNotFound(f"VM {req.vm} is on {where or 'no host'}, neither {req.source} "
                             f"nor {req.target}", vm=req.vm)
        return f.last

    def find_migration(self, vm: str) -> Handle | None:
        """The live migration of ``vm`` libvirt is running (from any client), or None."""
        on, incoming = self._where(vm)
        if len(on) != 1 or len(incoming) != 1:
            return None
        dom = self._domain(on[0], vm)
        if dom is None or self._operation(dom) != libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT:
            return None
        with map_libvirt_errors(vm=vm, host=on[0]):
            mem = int(dom.info()[1]) // 1024
        handle = Handle(MigrationRequest(vm, on[0], incoming[0], mem), uuid.uuid4().hex,
                        {"adopted": "1"})
        self._flights[handle.token] = _Flight(handle, None, time.monotonic())
        return handle

    def set_bandwidth(self, handle: Handle, mbps: float) -> None:
        """Change the bandwidth cap of a migration in flight (``migrateSetMaxSpeed``)."""
        if mbps <= 0:
            raise ValueError(f"field 'mbps' must be > 0, got {mbps!r}")
        req = handle.request
        dom = self._domain(req.source, req.vm)
        if dom is None:
            raise VMNotFound(f"VM {req.vm} is not active on {req.source}", vm=req.vm,
                             host=req.source)
        with map_libvirt_errors(vm=req.vm, host=req.source):
            dom.migrateSetMaxSpeed(max(1, int(mbps * 1e6 / 8 / MIB)))

    def cancel(self, handle: Handle) -> None:
        f = self._flight(handle)
        if f.last.status is not MigrationStatus.ACTIVE:
            return
        req = handle.request
        dom = self._domain(req.source, req.vm)
        if dom is None:
            return
        f.aborted = True
        with map_libvirt_errors(vm=req.vm, host=req.source):
            try:
                dom.abortJob()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # no job left
                    raise

    def now(self) -> float:
        return time.monotonic()

    def wait(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def close(self) -> None:
        """Close the connections; migrations in flight go on inside libvirt."""
        for f in self._flights.values():
            if f.thread is not None and f.thread.is_alive():
                f.done.wait(0.1)
        with self._lock:
            for c in self._conns.values():
                with contextlib.suppress(libvirt.libvirtError):
                    c.close()
            self._conns.clear()


# ---------------------------------------------------------------------------- configuration


class _HostConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    uri: str = Field(min_length=1)
    migration_uri: str = Field(min_length=1)


class LibvirtConfig(BaseModel):
    """``[backend.libvirt]`` of the executor config."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    hosts: list[_HostConfig] = Field(min_length=1)
    default_bandwidth_mbps: float | None = Field(None, gt=0)
    default_downtime_ms: int | None = Field(None, ge=1)
    switchover_timeout_s: float = Field(10.0, gt=0)


def create_backend(config: ExecutorConfig, snapshot: ClusterSnapshot) -> LibvirtBackend:
    """The backend ``balancer execute --backend libvirt`` uses, from ``[backend.libvirt]``."""
    lc = backend_section(config, "libvirt", LibvirtConfig, {h.name for h in snapshot.hosts},
                         "name, uri, migration_uri")
    return LibvirtBackend([LibvirtHost(h.name, h.uri, h.migration_uri) for h in lc.hosts],
                          default_bandwidth_mbps=lc.default_bandwidth_mbps,
                          default_downtime_ms=lc.default_downtime_ms,
                          switchover_timeout=lc.switchover_timeout_s)
