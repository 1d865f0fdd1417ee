"""Live migration of plain QEMU guests over QMP (no libvirt).

Description
    Each host is a place where this backend can start ``qemu-system-x86_64`` (a command prefix
    such as ``ip netns exec NS`` or ``ssh HOST``) and a run directory that holds, per VM, its
    spec (``VM.json``), QMP socket (``VM.qmp``), pid file and serial log. State lives in those
    files and in the daemonized QEMU processes, not in this object, so a new backend instance
    (an executor restarted after a crash) finds every VM again.

    A migration follows QEMU's documented flow: the destination is started with the same
    arguments plus ``-incoming defer``; ``migrate-incoming`` to ``tcp:ADDR:0`` picks a free port
    (read back with ``query-migrate``); the source gets ``migrate-set-parameters``
    (``max-bandwidth``, ``downtime-limit``) and ``migrate``; ``poll`` reads ``query-migrate``
    (status, RAM transferred, rate, downtime). After ``completed`` the source is left paused
    (``postmigrate``) and is quit here once the destination runs. ``cancel`` is
    ``migrate_cancel``: the source keeps running and the destination QEMU exits by itself (it
    is also quit here). A destination that dies mid-migration shows as ``failed`` on the source,
    which keeps running; the destination's leftovers are removed.
Requirements
    QEMU >= 7 on every host, reachable QMP unix sockets (the run directories are on this
    machine or a shared file system), migration TCP between hosts, guest storage shared or none.
Limitations
    Pre-copy only (no post-copy, no auto-converge); one migration per VM at a time; the
    guest's command line must be the same on every host (no per-host device rewriting).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError

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
from balancer.executor.compat import QemuProber, qemu_lacks, qemu_running, refuse_if
from balancer.executor.config import ExecutorConfig, backend_section
from balancer.model import ClusterSnapshot

log = logging.getLogger("balancer.executor.qemu")

MIB = 1024 * 1024
# QEMU run states in which the VM is "on" a host (the others: inmigrate = a destination still
# waiting for its state, postmigrate = a source whose VM has moved away).
_ON_HOST = {"running", "paused", "finish-migrate", "prelaunch", "suspended", "save-vm",
            "restore-vm", "debug", "io-error", "watchdog", "guest-panicked", "colo"}
_ACTIVE = {"setup", "active", "device", "pre-switchover", "cancelling", "wait-unplug",
           "postcopy-active", "postcopy-paused", "postcopy-recover"}


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not reaped by its parent, counts as gone).

    Daemonized QEMUs are re-parented to PID 1, which on some machines never reaps them."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@dataclass(frozen=True)
class QemuHost:
    """Where QEMU runs: ``address`` for incoming migrations, ``run_dir`` for its state."""

    name: str
    address: str
    run_dir: Path
    exec_prefix: tuple[str, ...] = ()


@dataclass(frozen=True)
class GuestSpec:
    """What is needed to start the same guest on any host."""

    name: str
    mem_mb: int
    vcpus: int = 1
    kernel: str | None = None
    append: str = ""
    args: tuple[str, ...] = ()  # further QEMU arguments (disks on shared storage, NICs...)
    accel: str = "tcg"
    machine: str = "pc"

    def to_json(self) -> str:
        d = asdict(self)
        d["args"] = list(self.args)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GuestSpec:
        d = json.loads(text)
        d["args"] = tuple(d.get("args", ()))
        return cls(**d)


@contextlib.contextmanager
def map_qemu_errors(*, vm: str | None = None, host: str | None = None) -> Iterator[None]:
    """Map QMP, socket and process errors into the BackendError tree (the backend boundary)."""
    try:
        yield
    except BackendError:
        raise
    except (ConnectError, FileNotFoundError, ConnectionError, TimeoutError) as exc:
        raise HostUnreachable(f"QEMU of {vm or '?'} on {host or '?'} unreachable: {exc}",
                              vm=vm, host=host) from exc
    except ExecuteError as exc:
        raise MigrationFailed(f"QMP refused on {host or '?'} for {vm or '?'}: {exc}",
                              vm=vm, host=host) from exc
    except (QMPError, ExecInterruptedError, OSError, subprocess.SubprocessError) as exc:
        raise BackendError(f"QEMU error for {vm or '?'} on {host or '?'}: {exc}",
                           vm=vm, host=host) from exc


async def _qmp_session(path: Path, commands: list[tuple[str, Mapping[str, object] | None]],
                       timeout: float) -> list[Any]:
    client = QMPClient()
    out: list[Any] = []
    try:
        try:
            await asyncio.wait_for(client.connect(str(path)), timeout)
        except AssertionError as exc:
            # The library's state machine trips when the peer vanishes mid-handshake (a QEMU
            # exiting at the switch-over): that is a failed connection, not a bug of ours.
            raise ConnectError("QMP handshake interrupted", exc) from exc
        for cmd, args in commands:
            if cmd == "quit":
                with contextlib.suppress(QMPError, ExecInterruptedError, ConnectionError,
                                         EOFError):
                    await asyncio.wait_for(client.execute(cmd, args), timeout)
                out.append(None)
            else:
                out.append(await asyncio.wait_for(client.execute(cmd, args), timeout))
    finally:
        # Every path closes the socket, a failed connect included (a leaked socket would
        # surface later as a ResourceWarning in whatever runs next).
        with contextlib.suppress(Exception):
            await client.disconnect()
    return out


def qmp(path: Path, *commands: str | tuple[str, Mapping[str, object]],
        timeout: float = 5.0) -> list[Any]:
    """Run QMP commands on one monitor socket (connect, execute in order, disconnect)."""
    cmds = [(c, None) if isinstance(c, str) else c for c in commands]
    for attempt in range(3):
        try:
            return asyncio.run(_qmp_session(path, cmds, timeout))
        except ConnectError:
            # A QEMU that is switching over (or exiting) can drop the greeting or the
            # capabilities negotiation; ask again shortly before calling it unreachable.
            if attempt == 2 or not path.exists():
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


@dataclass
class _Flight:
    handle: Handle
    src: QemuHost
    dst: QemuHost
    started: float
    last: Progress = field(default_factory=lambda: Progress(MigrationStatus.ACTIVE))
    lock: threading.Lock = field(default_factory=threading.Lock)  # serialises the hand-over
    stop: threading.Event = field(default_factory=threading.Event)


class QemuBackend:
    """Backend over plain QEMU + QMP. See the module docstring."""

    name = "qemu"

    def __init__(self, hosts: list[QemuHost], *, qemu_binary: str = "qemu-system-x86_64",
                 default_bandwidth_mbps: float | None = None,
                 default_downtime_ms: int | None = None, switchover_timeout: float = 10.0,
                 qmp_timeout: float = 5.0, prober: QemuProber | None = None) -> None:
        if not hosts:
            raise ValueError("QemuBackend needs at least one host")
        names = [h.name for h in hosts]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate host names: {names}")
        self.hosts = {h.name: h for h in hosts}
        self.qemu_binary = qemu_binary
        self.default_bandwidth_mbps = default_bandwidth_mbps
        self.default_downtime_ms = default_downtime_ms
        self.switchover_timeout = switchover_timeout
        self.qmp_timeout = qmp_timeout
        self._flights: dict[str, _Flight] = {}
        # The compatibility pre-check asks each host's QEMU what it offers (cached).
        self.prober = prober or QemuProber(binary=qemu_binary)
        for h in hosts:
            Path(h.run_dir).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ files and processes
    def _host(self, name: str, vm: str | None = None) -> QemuHost:
        try:
            return self.hosts[name]
        except KeyError:
            raise IncompatibleHost(f"unknown host {name!r} (known: {sorted(self.hosts)})",
                                   vm=vm, host=name) from None

    @staticmethod
    def _file(h: QemuHost, vm: str, ext: str) -> Path:
        return Path(h.run_dir) / f"{vm}.{ext}"

    def serial_log(self, vm: str, host: str) -> Path:
        """The guest's serial console log on ``host`` (appended across migrations)."""
        return self._file(self._host(host), vm, "serial")

    def _qmp(self, h: QemuHost, vm: str, *commands: str | tuple[str, Mapping[str, object]]
             ) -> list[Any]:
        with map_qemu_errors(vm=vm, host=h.name):
            return qmp(self._file(h, vm, "qmp"), *commands, timeout=self.qmp_timeout)

    def _status(self, h: QemuHost, vm: str) -> str | None:
        """The QEMU run state of ``vm`` on ``h``; None if no live QEMU has it there."""
        if not self._file(h, vm, "json").exists():
            return None
        if self._pid(h, vm) is None and self._file(h, vm, "pid").exists():
            self._forget(h, vm)  # QEMU exited (e.g. a cancelled destination)
            return None
        try:
            status = str(self._qmp(h, vm, "query-status")[0]["status"])
            if status == "paused" and self._file(h, vm, "incoming").exists():
                return "incoming-done"  # all state arrived; the guest waits for _hand_over
            return status
        except HostUnreachable:
            # A QEMU that is exiting (killed, or a cancelled destination) refuses connections
            # for a moment before its process is gone: give it a second to go.
            deadline = time.monotonic() + 1.0
            while self._pid(h, vm) is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._pid(h, vm) is None:  # QEMU gone: forget its files
                self._forget(h, vm)
                return None
            raise

    def _pid(self, h: QemuHost, vm: str) -> int | None:
        try:
            pid = int(self._file(h, vm, "pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if process_alive(pid) else None

    def _forget(self, h: QemuHost, vm: str) -> None:
        for ext in ("json", "qmp", "pid", "incoming", "handover"):
            with contextlib.suppress(FileNotFoundError):
                self._file(h, vm, ext).unlink()

    def _spec(self, vm: str) -> GuestSpec | None:
        for h in self.hosts.values():
            with contextlib.suppress(FileNotFoundError):
                return GuestSpec.from_json(self._file(h, vm, "json").read_text())
        return None

    def _vm_names(self, h: QemuHost) -> list[str]:
        return sorted(p.stem for p in Path(h.run_dir).glob("*.json"))

    def _argv(self, h: QemuHost, spec: GuestSpec, incoming: bool) -> list[str]:
        serial = self._file(h, spec.name, "serial")
        argv = [*h.exec_prefix, self.qemu_binary, "-name", spec.name, "-accel", spec.accel,
                "-machine", spec.machine, "-m", str(spec.mem_mb), "-smp", str(spec.vcpus),
                "-nodefaults", "-display", "none", "-no-reboot",
                "-chardev", f"file,id=serial0,path={serial},append=on", "-serial",
                "chardev:serial0",
                "-qmp", f"unix:{self._file(h, spec.name, 'qmp')},server=on,wait=off",
                "-pidfile", str(self._file(h, spec.name, "pid")), "-daemonize"]
        if spec.kernel:
            argv += ["-kernel", spec.kernel, "-append", spec.append]
        argv += list(spec.args)
        if incoming:  # -S: the guest resumes only when we say so (see _hand_over)
            argv += ["-S", "-incoming", "defer"]
        return argv

    def _spawn(self, h: QemuHost, spec: GuestSpec, incoming: bool) -> None:
        self._file(h, spec.name, "json").write_text(spec.to_json())
        if incoming:
            self._file(h, spec.name, "incoming").touch()
        try:
            proc = subprocess.run(self._argv(h, spec, incoming), capture_output=True, text=True,
                                  timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            self._forget(h, spec.name)
            raise IncompatibleHost(f"cannot start QEMU for {spec.name} on {h.name}: {exc}",
                                   vm=spec.name, host=h.name) from exc
        if proc.returncode != 0:
            self._forget(h, spec.name)
            msg = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise IncompatibleHost(f"QEMU for {spec.name} did not start on {h.name}: {msg}",
                                   vm=spec.name, host=h.name)

    def _quit(self, h: QemuHost, vm: str) -> None:
        """Stop ``vm``'s QEMU on ``h`` (QMP quit, then SIGKILL) and remove its files."""
        pid = self._pid(h, vm)
        with contextlib.suppress(BackendError):
            self._qmp(h, vm, "quit")
        deadline = time.monotonic() + 3
        while pid is not None and time.monotonic() < deadline:
            if not process_alive(pid):
                break
            time.sleep(0.02)
        else:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._forget(h, vm)

    # ------------------------------------------------------------------ VM lifecycle (extra)
    def launch(self, spec: GuestSpec, host: str) -> VMInfo:
        """Start ``spec`` on ``host`` (not part of the Backend protocol: provisioning)."""
        h = self._host(host, spec.name)
        where = self.locate(spec.name)
        if where is not None:
            raise BackendError(f"VM {spec.name} already runs on {where}", vm=spec.name,
                               host=where)
        self._spawn(h, spec, incoming=False)
        return VMInfo(spec.name, host, spec.vcpus, spec.mem_mb, True)

    def destroy(self, vm: str) -> None:
        """Stop every QEMU process of ``vm`` on every host."""
        for h in self.hosts.values():
            if self._file(h, vm, "json").exists():
                self._quit(h, vm)

    # ------------------------------------------------------------------ Backend protocol
    def inventory(self) -> list[VMInfo]:
        self._reconcile()
        out: list[VMInfo] = []
        for h in self.hosts.values():
            for vm in self._vm_names(h):
                status = self._status(h, vm)
                spec = self._spec_on(h, vm)
                if status in _ON_HOST and spec is not None:
                    out.append(VMInfo(vm, h.name, spec.vcpus, spec.mem_mb, status == "running"))
        return out

    def _spec_on(self, h: QemuHost, vm: str) -> GuestSpec | None:
        try:
            return GuestSpec.from_json(self._file(h, vm, "json").read_text())
        except FileNotFoundError:
            return None

    def locate(self, vm: str) -> str | None:
        deadline = time.monotonic() + self.switchover_timeout
        while True:
            states = {h.name: self._status(h, vm) for h in self.hosts.values()}
            on = [name for name, s in states.items() if s in _ON_HOST]
            if len(on) > 1:
                raise BackendError(f"VM {vm} runs on several hosts: {sorted(on)}", vm=vm)
            if on:
                self._reconcile_vm(vm)
                return on[0]
            if not any(s in ("postmigrate", "inmigrate", "incoming-done")
                       for s in states.values()) or time.monotonic() > deadline:
                return None
            # Switch-over: the source finished, the destination has not resumed yet. Drive it
            # (our own migration through poll, anyone else's through _reconcile_vm), then look
            # again.
            mine = [f for f in self._flights.values()
                    if f.handle.request.vm == vm and f.last.status is MigrationStatus.ACTIVE]
            if mine:
                self.poll(mine[0].handle)
            else:
                self._reconcile_vm(vm)
            time.sleep(0.02)

    def check(self, request: MigrationRequest) -> None:
        vm = request.vm
        src = self._host(request.source, vm)
        dst = self._host(request.target, vm)
        if src.name == dst.name:
            raise IncompatibleHost(f"{vm}: source and target are both {src.name}", vm=vm,
                                   host=dst.name)
        where = self.locate(vm)
        if where is None:
            raise VMNotFound(f"VM {vm} runs on no host", vm=vm, host=src.name)
        if where != src.name:
            raise VMNotFound(f"VM {vm} runs on {where}, not on {src.name}", vm=vm, host=where)
        if any(f.handle.request.vm == vm and f.last.status is MigrationStatus.ACTIVE
               for f in self._flights.values()):
            raise BackendError(f"VM {vm} is already migrating", vm=vm, host=src.name)
        if not os.access(dst.run_dir, os.W_OK):
            raise IncompatibleHost(f"run directory {dst.run_dir} of {dst.name} not writable",
                                   vm=vm, host=dst.name)
        # Compatibility (balancer.executor.compat): the machine type and CPU the guest runs
        # with on its source, and the accelerator, must be offered by the destination's QEMU.
        spec = self._spec_on(src, vm)
        accel = spec.accel if spec else "tcg"
        with map_qemu_errors(vm=vm, host=src.name):
            running = qemu_running(lambda *cmds: self._qmp(src, vm, *cmds))
            src_offer = self.prober.offer(src.exec_prefix, src.run_dir, accel)
        with map_qemu_errors(vm=vm, host=dst.name):
            dst_offer = self.prober.offer(dst.exec_prefix, dst.run_dir, accel)
        refuse_if(qemu_lacks(running, src_offer, dst_offer), vm=vm, host=dst.name)

    def start(self, request: MigrationRequest) -> Handle:
        self.check(request)
        vm = request.vm
        src, dst = self.hosts[request.source], self.hosts[request.target]
        spec = self._spec_on(src, vm)
        if spec is None:
            raise VMNotFound(f"no spec of VM {vm} on {src.name}", vm=vm, host=src.name)
        if self._file(dst, vm, "json").exists():  # leftover of an earlier attempt
            self._quit(dst, vm)
        self._spawn(dst, spec, incoming=True)
        try:
            self._qmp(dst, vm, ("migrate-incoming", {"uri": f"tcp:{dst.address}:0"}))
            info = self._qmp(dst, vm, "query-migrate")[0]
            port = int(info["socket-address"][0]["port"])
            params: dict[str, object] = {}
            bw = request.bandwidth_mbps or self.default_bandwidth_mbps
            if bw:
                params["max-bandwidth"] = int(bw * 1e6 / 8)
            downtime = request.downtime_ms or self.default_downtime_ms
            if downtime:
                params["downtime-limit"] = int(downtime)
            cmds: list[tuple[str, Mapping[str, object]]] = []
            if params:
                cmds.append(("migrate-set-parameters", params))
            cmds.append(("migrate", {"uri": f"tcp:{dst.address}:{port}"}))
            self._qmp(src, vm, *cmds)
        except BaseException:
            self._quit(dst, vm)
            raise
        handle = Handle(request, uuid.uuid4().hex, {"port": str(port)})
        flight = _Flight(handle, src, dst, time.monotonic())
        self._flights[handle.token] = flight
        threading.Thread(target=self._watch_switchover, args=(flight,), daemon=True,
                         name=f"switchover-{vm}").start()
        return handle

    def _watch_switchover(self, f: _Flight) -> None:
        """Resume the guest on the destination as soon as all its state has arrived.

        The runner polls every ``poll_interval_s``; waiting for its next poll would add that
        much to the guest's downtime. This watcher asks the destination every 30 ms instead
        (and ends with the migration)."""
        try:
            self._watch(f)
        except Exception:  # never out of the thread: the runner's poll drives the hand-over
            log.warning("switch-over watcher of %s stopped; the next poll takes over",
                        f.handle.request.vm, exc_info=True)

    def _watch(self, f: _Flight) -> None:
        vm = f.handle.request.vm
        while f.last.status is MigrationStatus.ACTIVE and not f.stop.is_set():
            try:
                state = self._status(f.dst, vm)
            except BackendError:
                state = "unknown"
            if state is None or state == "running":
                return
            if state == "incoming-done":
                with f.lock, contextlib.suppress(BackendError):
                    # not once the backend is closed (close() waits for this lock)
                    if not f.stop.is_set() and self._status(f.dst, vm) == "incoming-done":
                        self._hand_over(f.src, f.dst, vm)
                return
            f.stop.wait(0.03)

    def _flight(self, handle: Handle) -> _Flight:
        """The flight of ``handle``; a handle from an earlier instance (an executor restarted
        after a crash) is adopted: its request names the source and target to ask."""
        f = self._flights.get(handle.token)
        if f is None:
            req = handle.request
            f = _Flight(handle, self._host(req.source, req.vm), self._host(req.target, req.vm),
                        time.monotonic())
            self._flights[handle.token] = f
        return f

    def find_migration(self, vm: str) -> Handle | None:
        """The migration of ``vm`` in flight (from any executor), or None.

        Used by the runner after a restart when the token of a migration it started was never
        recorded: the source QEMU is still migrating and a destination waits for it."""
        states = {h.name: self._status(h, vm) for h in self.hosts.values()}
        for name, state in states.items():
            if state not in _ON_HOST:
                continue
            src = self.hosts[name]
            info = self._qmp(src, vm, "query-migrate")[0]
            if info.get("status") not in _ACTIVE:
                return None
            targets = [n for n, s in states.items() if s == "inmigrate"]
            if len(targets) != 1:
                return None
            spec = self._spec_on(src, vm)
            req = MigrationRequest(vm, name, targets[0], spec.mem_mb if spec else 0)
            handle = Handle(req, uuid.uuid4().hex, {"adopted": "1"})
            self._flights[handle.token] = _Flight(handle, src, self.hosts[targets[0]],
                                                  time.monotonic())
            return handle
        return None

    def poll(self, handle: Handle) -> Progress:
        f = self._flight(handle)
        vm = handle.request.vm
        if f.last.status is not MigrationStatus.ACTIVE:
            return f.last
        try:
            info = self._qmp(f.src, vm, "query-migrate")[0]
        except HostUnreachable:
            # The source QEMU is gone. If the destination runs the VM, the move happened.
            dst_state = self._status(f.dst, vm)
            if dst_state == "running":
                return self._finish(f, Progress(MigrationStatus.COMPLETED))
            raise
        status = info.get("status", "none")
        ram = info.get("ram", {})
        prog = Progress(
            MigrationStatus.ACTIVE,
            transferred_mb=ram.get("transferred", 0) / MIB,
            total_mb=(ram.get("total", 0) / MIB) or float(handle.request.mem_mb),
            rate_mbps=float(ram.get("mbps", 0.0)),
            downtime_ms=info.get("downtime", info.get("expected-downtime")),
        )
        if status in _ACTIVE:
            f.last = prog
            return prog
        if status == "completed":
            prog.status = MigrationStatus.COMPLETED
            return self._finish(f, prog)
        if status == "cancelled":
            prog.status = MigrationStatus.CANCELLED
        else:  # failed (or none: the source lost track of it)
            prog.status = MigrationStatus.FAILED
            prog.error = info.get("error-desc", f"migration status {status}")
        self._quit(f.dst, vm)
        f.last = prog  # repeated polls return the final answer
        return prog

    def _finish(self, f: _Flight, prog: Progress) -> Progress:
        """After ``completed``: resume the guest on the destination, then stop the source.

        The destination was started with ``-S``, so the guest runs there only once we resume
        it (as libvirt does). If the destination is gone or stuck before that, it never ran
        the guest, and the paused source is resumed instead: FAILED, the VM on its source."""
        vm = f.handle.request.vm
        deadline = time.monotonic() + self.switchover_timeout
        while True:
            state = self._status(f.dst, vm)
            if state == "running":
                break
            if state == "incoming-done":
                with f.lock, contextlib.suppress(BackendError):
                    if self._status(f.dst, vm) == "incoming-done":
                        self._hand_over(f.src, f.dst, vm)
                continue
            if state is None or time.monotonic() > deadline:
                if state is not None:
                    self._quit(f.dst, vm)
                self._resume_source(f.src, vm)
                prog.status = MigrationStatus.FAILED
                prog.error = f"destination of {vm} on {f.dst.name} was {state or 'gone'} at " \
                             f"the switch-over; the guest was resumed on {f.src.name}"
                f.last = prog
                return prog
            time.sleep(0.02)
        self._quit(f.src, vm)
        f.last = prog
        return prog

    def _hand_over(self, src: QemuHost, dst: QemuHost, vm: str) -> None:
        """Resume the guest on the destination; the source is marked so it is never resumed
        after this point (two copies of a guest must never both have run)."""
        self._file(src, vm, "handover").touch()
        self._qmp(dst, vm, "cont")
        with contextlib.suppress(FileNotFoundError):
            self._file(dst, vm, "incoming").unlink()

    def _resume_source(self, src: QemuHost, vm: str) -> None:
        if self._file(src, vm, "handover").exists():
            raise BackendError(f"VM {vm}: the destination was told to resume it and is gone; "
                               f"the source copy on {src.name} is stale and stays paused",
                               vm=vm, host=src.name)
        if self._status(src, vm) == "postmigrate":
            self._qmp(src, vm, "cont")

    def set_bandwidth(self, handle: Handle, mbps: float) -> None:
        """Change the bandwidth cap of a migration in flight (``max-bandwidth``): the lever
        that lets a migration whose guest dirties memory faster than the cap converge."""
        if mbps <= 0:
            raise ValueError(f"field 'mbps' must be > 0, got {mbps!r}")
        f = self._flight(handle)
        self._qmp(f.src, handle.request.vm,
                  ("migrate-set-parameters", {"max-bandwidth": int(mbps * 1e6 / 8)}))

    def cancel(self, handle: Handle) -> None:
        f = self._flight(handle)
        if f.last.status is MigrationStatus.ACTIVE:
            self._qmp(f.src, handle.request.vm, "migrate_cancel")

    def now(self) -> float:
        return time.monotonic()

    def wait(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def close(self) -> None:
        """Forget in-flight handles (QEMU migrations go on; ``inventory`` reconciles later).

        Once it returns, no switch-over watcher acts: a hand-over in progress is waited for."""
        flights = list(self._flights.values())
        for f in flights:
            f.stop.set()
        for f in flights:
            with f.lock:
                pass
        self._flights.clear()

    # ------------------------------------------------------------------ crash recovery
    def _reconcile(self) -> None:
        names = {vm for h in self.hosts.values() for vm in self._vm_names(h)}
        for vm in sorted(names):
            self._reconcile_vm(vm)

    def _reconcile_vm(self, vm: str) -> None:
        """Finish or clear what migrations that ended while no executor watched left behind.

        - source ``postmigrate`` and destination ``incoming-done`` (all state arrived, guest
          not resumed): resume the destination, stop the source (the move completed);
        - the VM runs on one host: stop ``postmigrate`` copies elsewhere; stop destinations
          (``inmigrate``/``incoming-done``) when that host reports its migration ``failed``,
          ``cancelled`` or never started;
        - source ``postmigrate`` and no destination at all (it died before resuming the
          guest): resume the source.
        Copies this instance is migrating are left to ``poll``.
        """
        if any(f.handle.request.vm == vm and f.last.status is MigrationStatus.ACTIVE
               for f in self._flights.values()):
            return
        states = {h.name: self._status(h, vm) for h in self.hosts.values()}
        post = [n for n, s in states.items() if s == "postmigrate"]
        done = [n for n, s in states.items() if s == "incoming-done"]
        loading = [n for n, s in states.items() if s == "inmigrate"]
        running = [n for n, s in states.items() if s in _ON_HOST]
        if len(post) == 1 and len(done) == 1 and not running:
            src, dst = self.hosts[post[0]], self.hosts[done[0]]
            self._hand_over(src, dst, vm)
            self._quit(src, vm)
            return
        if len(running) == 1:
            home = self.hosts[running[0]]
            status = "unknown"
            with contextlib.suppress(BackendError):
                status = str(self._qmp(home, vm, "query-migrate")[0].get("status", "none"))
            for name in post:
                self._quit(self.hosts[name], vm)
            # Only a migration known to have ended without moving the VM leaves a dead
            # destination; "completed" or a status read too late must never stop the copy
            # that may just have become the VM.
            if status in ("failed", "cancelled", "none"):
                for name in done + loading:
                    h = self.hosts[name]
                    if self._status(h, vm) in ("inmigrate", "incoming-done"):
                        self._quit(h, vm)
            return
        if len(post) == 1 and not done and not loading and not running:
            self._resume_source(self.hosts[post[0]], vm)


# ---------------------------------------------------------------------------- configuration


class _HostConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    address: str = Field(min_length=1)  # where this host accepts incoming migrations
    run_dir: str = Field(min_length=1)
    exec_prefix: list[str] = Field(default_factory=list)


class QemuConfig(BaseModel):
    """``[backend.qemu]`` of the executor config."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    hosts: list[_HostConfig] = Field(min_length=1)
    qemu_binary: str = "qemu-system-x86_64"
    default_bandwidth_mbps: float | None = Field(None, gt=0)
    default_downtime_ms: int | None = Field(None, ge=1)
    switchover_timeout_s: float = Field(10.0, gt=0)
    qmp_timeout_s: float = Field(5.0, gt=0)


def create_backend(config: ExecutorConfig, snapshot: ClusterSnapshot) -> QemuBackend:
    """The backend ``balancer execute --backend qemu`` uses, from ``[backend.qemu]``.

    Every host of the snapshot must be configured; errors name the field (``InputError``)."""
    qc = backend_section(config, "qemu", QemuConfig, {h.name for h in snapshot.hosts},
                         "name, address, run_dir")
    return QemuBackend(
        [QemuHost(h.name, h.address, Path(h.run_dir), tuple(h.exec_prefix)) for h in qc.hosts],
        qemu_binary=qc.qemu_binary, default_bandwidth_mbps=qc.default_bandwidth_mbps,
        default_downtime_ms=qc.default_downtime_ms, switchover_timeout=qc.switchover_timeout_s,
        qmp_timeout=qc.qmp_timeout_s)
