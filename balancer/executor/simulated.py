"""The simulated backend: an in-memory cluster that live-migrates in simulated time.

Description
    Implements the same ``Backend`` protocol as the real backends, so the dry run, the what-if
    simulator and the tests run the executor's real code path. A migration's duration comes
    from the pre-copy model (``balancer.migration_model.estimate``) at the request's bandwidth;
    the clock only moves in ``wait`` (no sleeping unless ``time_scale`` > 0). Migrations finish
    when the clock passes their end, whether or not anyone polls them, as real ones do.

    Faults are drawn per migration from a generator seeded by ``(seed, vm, source, target,
    n-th start of that VM)``, so a run is deterministic whatever the order of calls: a failure
    part-way (the VM stays on its source), a slow link (bandwidth x ``slow_link_factor``), the
    destination dying mid-migration (fails like QEMU's "Broken pipe"), and non-convergence
    (stays ``active`` until cancelled). ``kill_executor_at_call`` kills the calling process with
    SIGKILL at its N-th backend call, before or after the call takes effect (crash tests).

    With ``state_path`` the cluster (VMs, migrations in flight, the clock and the log of every
    start) lives in a SQLite file and each change is one transaction, so a restarted executor
    sees where the VMs really are and migrations in flight carry on from where they were.
    Compatibility (``compat``, the snapshot, set by ``from_snapshot``): ``check`` and ``start``
    refuse a move the snapshot says the destination cannot take
    (``ClusterSnapshot.unmet_requirements``: CPU model/features, networks, datastores; and a VM
    on local storage) with ``IncompatibleHost`` and the same kind of reason a real backend
    gives (``destination b lacks network prod used by x``). ``refusals`` records every start the
    backend refused that way, next to ``starts``, so tests can count starts against refusals.
Requirements
    Host memory capacities and the VMs with their hosts (``from_snapshot``).
Limitations
    A start that would put the destination over its memory capacity (counting incoming
    migrations) is refused with ``IncompatibleHost``; CPU, network and storage are only what the
    snapshot says of them (nothing is probed). Concurrent migrations do not share bandwidth.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import os
import random
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

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
from balancer.executor.compat import refusal
from balancer.executor.config import ExecutorConfig, FaultsConfig
from balancer.migration_model import ModelParams, estimate
from balancer.model import ClusterSnapshot


@dataclass
class _Migration:
    token: str
    vm: str
    source: str
    target: str
    mem_mb: int
    start: float
    end: float  # when it completes or fails (inf: never converges)
    outcome: str  # completed | failed (what happens at ``end``)
    error: str
    total_mb: float
    rate_mbps: float
    downtime_ms: float
    status: MigrationStatus = MigrationStatus.ACTIVE
    ended: float | None = None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS hosts (name TEXT PRIMARY KEY, mem_mb REAL NOT NULL);
CREATE TABLE IF NOT EXISTS vms (name TEXT PRIMARY KEY, host TEXT NOT NULL, vcpus INTEGER,
                                mem_mb INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS migrations (token TEXT PRIMARY KEY, vm TEXT, source TEXT,
    target TEXT, mem_mb INTEGER, start REAL, "end" REAL, outcome TEXT, error TEXT,
    total_mb REAL, rate_mbps REAL, downtime_ms REAL, status TEXT, ended REAL);
CREATE TABLE IF NOT EXISTS starts (seq INTEGER PRIMARY KEY AUTOINCREMENT, token TEXT, vm TEXT,
    source TEXT, target TEXT, clock REAL);
"""


class SimulatedBackend:
    name = "simulated"

    def __init__(self, hosts: dict[str, float], vms: list[VMInfo], *, seed: int = 0,
                 bandwidth_mbps: float = 10000.0, downtime_ms: float = 300.0,
                 dirty_rate_mbps: float = 0.0, faults: FaultsConfig | None = None,
                 time_scale: float = 0.0, state_path: str | None = None,
                 params: ModelParams | None = None,
                 compat: ClusterSnapshot | None = None, shared: bool = False) -> None:
        self.seed = seed
        # shared: several processes use the state file in turn (daemons failing over); each
        # call re-reads the state in its transaction. fence_token: the caller's leader term,
        # refused once a higher one was seen (fence_to), as a fencing-aware backend would.
        self.shared = shared and bool(state_path)
        self.fence_token: int | None = None
        self.fence_seen = 0
        self._mutex = threading.RLock()
        self.compat = compat
        self.refusals: list[tuple[str, str, str, str]] = []  # (vm, source, target, reason)
        self.bandwidth_mbps = bandwidth_mbps
        self.downtime_ms = downtime_ms
        self.dirty_rate_mbps = dirty_rate_mbps
        self.faults = faults or FaultsConfig()
        self.time_scale = time_scale
        self.params = params
        self.calls = 0
        self.clock = 0.0
        self.hosts: dict[str, float] = dict(hosts)
        self.vms: dict[str, list[Any]] = {v.name: [v.host, v.vcpus, v.mem_mb] for v in vms}
        self.migrations: dict[str, _Migration] = {}
        self.active_by_vm: dict[str, str] = {}
        self.starts: list[tuple[str, str, str, str, float]] = []
        self.db: sqlite3.Connection | None = None
        self._used: dict[str, float] | None = None  # _committed per host, kept up to date
        self.start_counts: dict[str, int] = {}
        self._ends: list[tuple[float, str]] = []  # (end, token) of migrations in flight
        if state_path:
            self._open(state_path)

    @classmethod
    def from_snapshot(cls, snapshot: ClusterSnapshot, config: ExecutorConfig | None = None, *,
                      persist: bool = True, **overrides: Any) -> SimulatedBackend:
        cfg = config or ExecutorConfig()
        sim = cfg.simulated
        kw: dict[str, Any] = {
            "seed": sim.seed, "bandwidth_mbps": cfg.migration.bandwidth_mbps,
            "downtime_ms": cfg.migration.downtime_ms, "dirty_rate_mbps": sim.dirty_rate_mbps,
            "faults": sim.faults, "time_scale": sim.time_scale,
            "state_path": sim.state_path if persist and sim.state_path else None,
            "compat": snapshot,
        }
        kw.update(overrides)
        hosts = {h.name: h.mem_capacity * cfg.limits.mem_overcommit for h in snapshot.hosts}
        vms = [VMInfo(v.name, v.host, v.vcpus, v.mem) for v in snapshot.vms]
        return cls(hosts, vms, **kw)

    # -- persistence ---------------------------------------------------------------------
    def _open(self, path: str) -> None:
        # check_same_thread off: the daemon calls it from its loop and its executor thread;
        # _Tx serialises the calls with a lock
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30.0,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(starts)")}
        for col, decl in (("wall", "REAL"), ("fence", "INTEGER")):
            if col not in cols:
                self.db.execute(f"ALTER TABLE starts ADD COLUMN {col} {decl}")
        if self.db.execute("SELECT 1 FROM meta WHERE key='clock'").fetchone():
            self._load()
        else:
            with self._tx() as db:
                db.execute("INSERT INTO meta VALUES ('clock', ?)", (repr(self.clock),))
                db.executemany("INSERT INTO hosts VALUES (?,?)", list(self.hosts.items()))
                db.executemany("INSERT INTO vms VALUES (?,?,?,?)",
                               [(n, h, c, m) for n, (h, c, m) in self.vms.items()])

    def _load(self) -> None:
        assert self.db is not None
        db = self.db
        self._ends = []
        self.clock = float(db.execute("SELECT value FROM meta WHERE key='clock'").fetchone()[0])
        self.hosts = dict(db.execute("SELECT name, mem_mb FROM hosts"))
        self.vms = {n: [h, c, m] for n, h, c, m in db.execute("SELECT * FROM vms")}
        self.migrations = {}
        self.active_by_vm = {}
        for r in db.execute("SELECT * FROM migrations"):
            m = _Migration(*r[:12], status=MigrationStatus(r[12]), ended=r[13])
            self.migrations[m.token] = m
            if m.status is MigrationStatus.ACTIVE:
                self.active_by_vm[m.vm] = m.token
                heapq.heappush(self._ends, (m.end, m.token))
        self.starts = [tuple(r) for r in db.execute(  # type: ignore[misc]
            "SELECT token, vm, source, target, clock FROM starts ORDER BY seq")]
        row = db.execute("SELECT value FROM meta WHERE key='fence'").fetchone()
        self.fence_seen = int(row[0]) if row else 0
        self.start_counts = {}
        for st in self.starts:
            self.start_counts[st[1]] = self.start_counts.get(st[1], 0) + 1
        self._used = None

    class _Tx:
        def __init__(self, db: sqlite3.Connection | None, mutex: threading.RLock) -> None:
            self.db = db
            self.mutex = mutex

        def __enter__(self) -> sqlite3.Connection:
            assert self.db is not None
            self.mutex.acquire()
            self.outer = not self.db.in_transaction  # nested: join the outer transaction
            if self.outer:
                self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
            assert self.db is not None
            try:
                if self.outer:
                    self.db.execute("COMMIT" if et is None else "ROLLBACK")
            finally:
                self.mutex.release()

    def _tx(self) -> SimulatedBackend._Tx:
        return SimulatedBackend._Tx(self.db, self._mutex)

    def _save_migration(self, db: sqlite3.Connection, m: _Migration) -> None:
        db.execute("INSERT OR REPLACE INTO migrations VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                   (m.token, m.vm, m.source, m.target, m.mem_mb, m.start, m.end, m.outcome,
                    m.error, m.total_mb, m.rate_mbps, m.downtime_ms, m.status.value, m.ended))

    # -- fault: kill the executor ----------------------------------------------------------
    def _call(self, phase: str) -> None:
        f = self.faults
        if f.kill_executor_at_call and self.calls == f.kill_executor_at_call \
                and f.kill_phase == phase:
            if self.db is not None:
                self.db.close()  # nothing pending: every change is already committed
            os.kill(os.getpid(), signal.SIGKILL)

    def _enter(self) -> None:
        self.calls += 1
        self._call("before")

    # -- protocol ------------------------------------------------------------------------
    def _sync(self) -> Any:
        """Shared state: the call runs in one transaction on freshly loaded state."""
        if not self.shared or self.db is None:
            return contextlib.nullcontext()
        tx = self._tx()

        class _Synced:
            def __enter__(s2) -> None:  # noqa: N805
                tx.__enter__()
                try:
                    self._load()
                except BaseException:
                    tx.__exit__(*sys.exc_info())
                    raise

            def __exit__(s2, et: Any, ev: Any, tb: Any) -> None:  # noqa: N805
                tx.__exit__(et, ev, tb)

        return _Synced()

    def inventory(self) -> list[VMInfo]:
        with self._sync():
            return self._inventory()

    def _inventory(self) -> list[VMInfo]:
        self._enter()
        out = [VMInfo(n, h, c, m) for n, (h, c, m) in sorted(self.vms.items())]
        self._call("after")
        return out

    def locate(self, vm: str) -> str | None:
        with self._sync():
            self._enter()
            rec = self.vms.get(vm)
            self._call("after")
            return rec[0] if rec else None

    def _committed(self, host: str) -> float:
        """Configured memory on ``host``: its VMs plus the VMs migrating to it."""
        if self._used is None:
            used = dict.fromkeys(self.hosts, 0.0)
            for h, _, m in self.vms.values():
                used[h] = used.get(h, 0.0) + m
            for mg in self.migrations.values():
                if mg.status is MigrationStatus.ACTIVE:
                    used[mg.target] = used.get(mg.target, 0.0) + mg.mem_mb
            self._used = used
        return self._used.get(host, 0.0)

    def _validate(self, r: MigrationRequest) -> None:
        rec = self.vms.get(r.vm)
        if rec is None:
            raise VMNotFound(f"VM {r.vm} is on no host", vm=r.vm)
        for h in (r.source, r.target):
            if h not in self.hosts:
                raise HostUnreachable(f"host {h} is unknown to the simulated cluster", host=h)
        if rec[0] != r.source:
            raise MigrationFailed(f"VM {r.vm} runs on {rec[0]}, not on {r.source}", vm=r.vm)
        if r.vm in self.active_by_vm:
            raise MigrationFailed(f"VM {r.vm} is already migrating", vm=r.vm)
        lacks = self._lacks(r.vm, r.target)
        if lacks:
            raise IncompatibleHost(refusal(r.vm, r.target, lacks), vm=r.vm, host=r.target)
        need = self._committed(r.target) + rec[2]
        if need > self.hosts[r.target]:
            raise IncompatibleHost(
                f"host {r.target} lacks memory for VM {r.vm}: {need:.0f} MiB needed with "
                f"incoming migrations, {self.hosts[r.target]:.0f} MiB there", vm=r.vm,
                host=r.target)

    def _lacks(self, vm: str, target: str) -> list[str]:
        """What the snapshot says ``target`` lacks to run ``vm`` (empty: compatible)."""
        s = self.compat
        if s is None or vm not in s.vm_index or target not in s.host_index:
            return []
        v, h = s.vms[s.vm_index[vm]], s.hosts[s.host_index[target]]
        lacks = ["its local disks (local storage)"] if v.local_storage else []
        return lacks + s.unmet_requirements(v, h)

    def check(self, request: MigrationRequest) -> None:
        with self._sync():
            self._enter()
            self._validate(request)
            self._call("after")

    def fence_to(self, token: int) -> None:
        """A new leader's term: starts carrying a lower one are refused from now on."""
        self.fence_token = token
        if self.db is not None:
            with self._tx() as db:
                db.execute("INSERT INTO meta (key, value) VALUES ('fence', ?) ON CONFLICT (key) "
                           "DO UPDATE SET value = max(CAST(value AS INTEGER), "
                           "CAST(excluded.value AS INTEGER))", (str(token),))

    def start(self, request: MigrationRequest) -> Handle:
        with self._sync():
            return self._start(request)

    def _start(self, request: MigrationRequest) -> Handle:
        self._enter()
        if self.shared and self.fence_token is not None and self.fence_token < self.fence_seen:
            raise BackendError(f"stale fencing token {self.fence_token}: term "
                               f"{self.fence_seen} leads now", vm=request.vm)
        try:
            self._validate(request)
        except IncompatibleHost as exc:
            self.refusals.append((request.vm, request.source, request.target, str(exc)))
            raise
        r = request
        mem = int(self.vms[r.vm][2])
        nth = self.start_counts.get(r.vm, 0)
        rng = random.Random(f"{self.seed}:{r.vm}:{r.source}:{r.target}:{nth}")
        f = self.faults
        bw = r.bandwidth_mbps or self.bandwidth_mbps
        if rng.random() < f.slow_link_rate:
            bw *= f.slow_link_factor
        downtime = r.downtime_ms or self.downtime_ms
        est = estimate(mem, bw, dirty_rate_mbps=self.dirty_rate_mbps, downtime_ms=downtime,
                       params=self.params)
        u = rng.random()
        frac = 0.05 + 0.9 * rng.random()
        outcome, error, end = "completed", "", self.clock + est.seconds
        if u < f.failure_rate:
            outcome, error = "failed", "migration failed: connection reset by peer"
        elif u < f.failure_rate + f.dest_death_rate:
            outcome, error = "failed", (f"destination QEMU on {r.target} exited mid-migration: "
                                        "Unable to write to socket: Broken pipe")
        elif u < f.failure_rate + f.dest_death_rate + f.nonconvergence_rate or not est.converges:
            outcome, end = "never", math.inf
        if outcome == "failed":
            end = self.clock + frac * (est.seconds if est.converges else 60.0)
        rate = bw * (self.params or ModelParams()).efficiency
        total = est.transferred_mb if est.converges else float(mem)
        token = f"sim-{len(self.starts) + 1:06d}"
        m = _Migration(token, r.vm, r.source, r.target, mem, self.clock, end, outcome, error,
                       total, rate, est.downtime_ms if est.converges else 0.0)
        self.migrations[token] = m
        self.active_by_vm[r.vm] = token
        heapq.heappush(self._ends, (m.end, token))
        self.starts.append((token, r.vm, r.source, r.target, self.clock))
        self.start_counts[r.vm] = nth + 1
        self._committed(r.target)
        assert self._used is not None
        self._used[r.target] += mem
        if self.db is not None:
            with self._tx() as db:
                self._save_migration(db, m)
                db.execute("INSERT INTO starts (token, vm, source, target, clock, wall, fence) "
                           "VALUES (?,?,?,?,?,?,?)", (token, r.vm, r.source, r.target,
                                                      self.clock, time.time(),
                                                      self.fence_token))
        self._call("after")
        return Handle(request=request, token=token)

    def _progress(self, m: _Migration) -> Progress:
        if m.status is MigrationStatus.COMPLETED:
            return Progress(m.status, m.total_mb, m.total_mb, 0.0, m.downtime_ms)
        elapsed = max(0.0, (m.ended if m.ended is not None else self.clock) - m.start)
        sent = elapsed * m.rate_mbps / 8.0
        total = max(m.total_mb, sent) if m.end == math.inf else m.total_mb
        sent = min(sent, total)
        if m.status is MigrationStatus.ACTIVE:
            return Progress(m.status, sent, total, m.rate_mbps)
        err = m.error or ("cancelled" if m.status is MigrationStatus.CANCELLED else "")
        return Progress(m.status, sent, total, 0.0, error=err)

    def poll(self, handle: Handle) -> Progress:
        with self._sync():
            return self._poll(handle)

    def _poll(self, handle: Handle) -> Progress:
        self._enter()
        m = self.migrations.get(handle.token)
        if m is None:
            raise BackendError(f"unknown migration {handle.token!r}", vm=handle.request.vm)
        p = self._progress(m)
        self._call("after")
        return p

    def cancel(self, handle: Handle) -> None:
        with self._sync():
            self._cancel(handle)

    def _cancel(self, handle: Handle) -> None:
        self._enter()
        m = self.migrations.get(handle.token)
        if m is None:
            raise BackendError(f"unknown migration {handle.token!r}", vm=handle.request.vm)
        if m.status is MigrationStatus.ACTIVE:
            m.status = MigrationStatus.CANCELLED
            m.ended = self.clock
            if self._used is not None:
                self._used[m.target] -= m.mem_mb
            self.active_by_vm.pop(m.vm, None)
            if self.db is not None:
                with self._tx() as db:
                    self._save_migration(db, m)
        self._call("after")

    def find_migration(self, vm: str) -> Handle | None:
        """The migration of ``vm`` in flight, if any (used by crash recovery)."""
        with self._sync():
            return self._find_migration(vm)

    def _find_migration(self, vm: str) -> Handle | None:
        self._enter()
        token = self.active_by_vm.get(vm)
        out = None
        if token is not None:
            m = self.migrations[token]
            out = Handle(MigrationRequest(m.vm, m.source, m.target, m.mem_mb), token)
        self._call("after")
        return out

    def now(self) -> float:
        return self.clock

    def wait(self, seconds: float) -> None:
        if self.time_scale > 0 and seconds > 0 and self.shared:
            time.sleep(seconds * self.time_scale)  # not holding the shared state meanwhile
            with self._sync():
                self._advance(seconds, sleep=False)
        else:
            self._advance(seconds)

    def _advance(self, seconds: float, sleep: bool = True) -> None:
        self._enter()
        if self.time_scale > 0 and seconds > 0 and sleep:
            time.sleep(seconds * self.time_scale)
        self.clock += max(0.0, seconds)
        due = []
        while self._ends and self._ends[0][0] <= self.clock:
            _, token = heapq.heappop(self._ends)
            m = self.migrations[token]
            if m.status is MigrationStatus.ACTIVE:
                due.append(m)
        for m in due:
            m.ended = m.end
            if m.outcome == "completed":
                m.status = MigrationStatus.COMPLETED
                self.vms[m.vm][0] = m.target
                if self._used is not None:
                    self._used[m.source] -= m.mem_mb
            else:
                m.status = MigrationStatus.FAILED
                if self._used is not None:
                    self._used[m.target] -= m.mem_mb
            self.active_by_vm.pop(m.vm, None)
        if self.db is not None:
            with self._tx() as db:
                db.execute("UPDATE meta SET value=? WHERE key='clock'", (repr(self.clock),))
                for m in due:
                    self._save_migration(db, m)
                    if m.status is MigrationStatus.COMPLETED:
                        db.execute("UPDATE vms SET host=? WHERE name=?", (m.target, m.vm))
        self._call("after")

    def next_event(self) -> float | None:
        """Clock time of the next migration end (lets callers skip idle simulated time)."""
        ends = [m.end for m in self.migrations.values()
                if m.status is MigrationStatus.ACTIVE and m.end != math.inf]
        return min(ends) if ends else None

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
