"""The balancer service: the control loop and the HTTP API (uvicorn) in one process.

``Controller`` holds the service state (inventory, samples, recommendations via the store) and
does the work the API and the loop ask for: one control cycle (ingest -> estimate -> solve ->
store -> execute by automation level), apply/dismiss, host maintenance, initial placement and
what-if plans. ``Daemon`` runs ``Controller.run_cycle`` every interval on a thread and the API
with uvicorn on the main thread; SIGTERM/SIGINT stop both cleanly: no new migration starts, the
one in flight is followed to its end and journalled, then the process exits.

Automation levels (DRS terms), per cluster with per-VM overrides:

- ``manual``: recommendations only;
- ``partially``: recommendations; initial placement is applied (the VM is recorded on the host);
- ``fully``: recommendations are executed through the executor at once;
- ``disabled`` (per VM only): the VM is never moved.

Anti-flapping: balancing moves are recommended only once the plan has wanted them for
``imbalance_cycles`` consecutive cycles, and a VM moved (or whose recommendation was dismissed)
within ``cooldown_s`` is held for balance. Evacuation and fixes of broken mandatory rules are
never delayed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from balancer.config import ServiceConfig
from balancer.errors import BalancerError, InfeasibleError, InputError
from balancer.executor.base import (
    Backend,
    BackendError,
    Handle,
    MigrationRequest,
    MigrationStatus,
    Progress,
    VMInfo,
)
from balancer.ingest.demand import Freshness, apply_estimates, estimate
from balancer.ingest.samples import SampleBuffer, Source
from balancer.model import ClusterSnapshot, HostState, RuleType, util_stats
from balancer.service import PlanOptions, PlanResult, plan
from balancer.snapshot import parse_snapshot, to_dict
from balancer.store import NewRecommendation, Store
from balancer.telemetry import Telemetry

log = logging.getLogger("balancer.daemon")


class NotFound(InputError):
    """The named item (recommendation, host) does not exist."""

    def __init__(self, message: str, loc: Sequence[str | int] = ()) -> None:
        super().__init__(message)
        self.loc = list(loc)


class Conflict(InputError):
    """The request is well formed but cannot be done in the current state."""


class Unavailable(BalancerError):
    """The service cannot answer yet (no inventory, backend down)."""


# -- a simulated backend (used until the executor's own simulated backend is wired in) --------
class DemoBackend:
    """In-memory backend on the ``Backend`` protocol with a simulated clock.

    A migration of M MiB takes ``M * 8 / bandwidth_mbps`` simulated seconds; ``wait`` advances
    the clock. ``fail`` names VMs whose next migration fails (tests inject faults with it).
    """

    name = "demo-sim"

    def __init__(self, vms: Sequence[VMInfo], bandwidth_mbps: float = 10000.0) -> None:
        self._vms = {v.name: v for v in vms}
        self._clock = 0.0
        self._bw = bandwidth_mbps
        self._flight: dict[str, tuple[MigrationRequest, float, float]] = {}
        self._n = 0
        self.fail: set[str] = set()
        self._lock = threading.Lock()

    def inventory(self) -> list[VMInfo]:
        with self._lock:
            return sorted(self._vms.values(), key=lambda v: v.name)

    def locate(self, vm: str) -> str | None:
        with self._lock:
            info = self._vms.get(vm)
            return None if info is None else info.host

    def set_vm(self, info: VMInfo) -> None:
        with self._lock:
            self._vms[info.name] = info

    def check(self, request: MigrationRequest) -> None:
        from balancer.executor.base import VMNotFound
        if self.locate(request.vm) != request.source:
            raise VMNotFound(f"VM {request.vm} is not on {request.source}", vm=request.vm)

    def start(self, request: MigrationRequest) -> Handle:
        self.check(request)
        with self._lock:
            self._n += 1
            token = f"sim-{self._n}"
            seconds = request.mem_mb * 8 / (request.bandwidth_mbps or self._bw)
            self._flight[token] = (request, self._clock, self._clock + seconds)
        return Handle(request=request, token=token)

    def poll(self, handle: Handle) -> Progress:
        with self._lock:
            req, t0, t1 = self._flight[handle.token]
            total = float(req.mem_mb)
            if self._clock < t1:
                done = total * (self._clock - t0) / max(t1 - t0, 1e-9)
                return Progress(MigrationStatus.ACTIVE, done, total, self._bw)
            if req.vm in self.fail:
                self.fail.discard(req.vm)
                return Progress(MigrationStatus.FAILED, total, total, error="injected failure")
            info = self._vms[req.vm]
            self._vms[req.vm] = dataclasses.replace(info, host=req.target)
            return Progress(MigrationStatus.COMPLETED, total, total, self._bw, downtime_ms=50.0)

    def cancel(self, handle: Handle) -> None:
        with self._lock:
            req, t0, _ = self._flight[handle.token]
            self._flight[handle.token] = (req, t0, float("inf"))

    def now(self) -> float:
        return self._clock

    def wait(self, seconds: float) -> None:
        with self._lock:
            self._clock += seconds

    def close(self) -> None:
        pass


def backend_for_snapshot(snapshot: ClusterSnapshot) -> DemoBackend:
    return DemoBackend([VMInfo(v.name, v.host, v.vcpus, v.mem) for v in snapshot.vms])


# -- executing one move through a backend -------------------------------------------------
class MoveExecutor:
    """Runs single migrations through a ``Backend`` with a journal row written before start.

    Description
        Thin adapter used by the service for "apply" and fully automated execution: check,
        start, poll until the backend reports an end state or the timeout passes (then cancel
        and follow the cancel to its end). Every migration has a journal row in the store
        (``started`` before the backend is called, final state after); ``recover`` resolves rows
        left ``started`` by a crash against the backend's view of where the VM runs.
    Requirements
        A backend on the ``balancer.executor.base.Backend`` protocol.
    Limitations
        One migration at a time (the executor's runner, with its per-host limits and waves,
        takes over when wired in).
    """

    def __init__(self, backend: Backend, store: Store, telemetry: Telemetry, *,
                 timeout_s: float = 600.0, poll_s: float = 0.5) -> None:
        self.backend = backend
        self.store = store
        self.telemetry = telemetry
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self.in_flight: str | None = None

    def migrate(self, *, vm: str, source: str, target: str, mem_mb: int, trigger: str,
                rec_id: int | None) -> dict[str, Any]:
        with self._lock:
            req = MigrationRequest(vm=vm, source=source, target=target, mem_mb=mem_mb)
            try:
                self.backend.check(req)
            except BackendError as exc:
                self.telemetry.migrations.labels(outcome="refused").inc()
                raise Conflict(f"migration of {vm} to {target} refused: {exc}") from None
            mig = self.store.migration_started(vm=vm, source=source, target=target,
                                               mem_mb=mem_mb, trigger=trigger, rec_id=rec_id)
            self.in_flight = vm
            try:
                state, error = self._follow(req)
            except BackendError as exc:
                state, error = self._settle(req, str(exc))
            except BaseException as exc:  # journal an end state even on a bug
                state, error = self._settle(req, f"internal error: {exc}")
                self.store.migration_finished(mig, state, error)
                self.in_flight = None
                raise
            self.store.migration_finished(mig, state, error)
            self.in_flight = None
            self.telemetry.migrations.labels(outcome=state).inc()
            return self.store.migrations(limit=1, vm=vm)[0]

    def _follow(self, req: MigrationRequest) -> tuple[str, str | None]:
        handle = self.backend.start(req)
        t0 = self.backend.now()
        cancelled = False
        while True:
            p = self.backend.poll(handle)
            if p.status is MigrationStatus.COMPLETED:
                return "completed", None
            if p.status is MigrationStatus.FAILED:
                return "failed", p.error or "migration failed"
            if p.status is MigrationStatus.CANCELLED:
                return "cancelled", "timed out" if cancelled else p.error
            if not cancelled and self.backend.now() - t0 > self.timeout_s:
                self.backend.cancel(handle)
                cancelled = True
            if cancelled and self.backend.now() - t0 > 2 * self.timeout_s:
                return self._settle(req, "migration neither finished nor cancelled in time")
            self.backend.wait(self.poll_s)

    def _settle(self, req: MigrationRequest, error: str) -> tuple[str, str | None]:
        """Decide the end state of a migration whose backend talk broke off."""
        try:
            where = self.backend.locate(req.vm)
        except BackendError as exc:
            return "failed", f"{error}; location unknown: {exc}"
        if where == req.target:
            return "completed", None
        return "failed", f"{error}; VM on {where}"

    def recover(self) -> list[dict[str, Any]]:
        """Resolve journal rows a crash left ``started``; returns the rows resolved."""
        out = []
        for row in self.store.unfinished_migrations():
            req = MigrationRequest(vm=row["vm"], source=row["source"], target=row["target"],
                                   mem_mb=row["mem_mb"])
            state, error = self._settle(req, "interrupted by a restart")
            self.store.migration_finished(row["id"], state, error)
            out.append({**row, "state": state, "error": error})
        return out


# -- the controller ------------------------------------------------------------------------
@dataclass
class ClusterView:
    """The last estimate of the cluster, as the API shows it."""

    snapshot: ClusterSnapshot
    freshness: Freshness
    built: float
    samples_seen: int


@dataclass
class CycleReport:
    cycle: int
    duration_s: float
    solve_s: float | None
    recommendations: list[dict[str, Any]] = field(default_factory=list)
    executed: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    imbalance_before: float | None = None
    imbalance_after: float | None = None
    streak: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _level_executes(level: str) -> bool:
    return level == "fully"


def move_kind(reason: str) -> str:
    if reason.startswith("evacuates"):
        return "evacuation"
    if reason.startswith("balance:"):
        return "balance"
    return "mandatory"


class Controller:
    def __init__(self, cfg: ServiceConfig, store: Store, telemetry: Telemetry, *,
                 sources: Sequence[Source] = (), backend: Backend | None = None,
                 inventory: ClusterSnapshot | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.store = store
        self.telemetry = telemetry
        self.clock = clock
        self.push = SampleBuffer(cfg.ingest.retention_s)
        self.sources: list[Source] = [self.push, *sources]
        self._lock = threading.RLock()  # inventory, view, cycle state
        self._cycle_lock = threading.Lock()  # one cycle (or maintenance plan) at a time
        saved = store.get("inventory")
        if inventory is None and saved is not None:
            inventory = parse_snapshot(saved)
        self.inventory: ClusterSnapshot | None = inventory
        if inventory is not None:
            store.put("inventory", to_dict(inventory))
        if backend is None and inventory is not None and cfg.executor.backend == "simulated":
            backend = backend_for_snapshot(inventory)
        self.backend = backend
        self.executor = None if backend is None else MoveExecutor(
            backend, store, telemetry, timeout_s=cfg.executor.migration_timeout_s)
        self.view: ClusterView | None = None
        self.cycle_no = int(store.get("cycle_no", 0))
        self.streak = 0
        self.last_cycle: CycleReport | None = None
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.telemetry.pending.set(len(store.recommendations("pending")))

    # -- inventory and samples -------------------------------------------------------------
    def set_inventory(self, doc: Any) -> ClusterSnapshot:
        snap = parse_snapshot(doc, mem_overcommit=self.cfg.cluster.mem_overcommit)
        with self._lock:
            self.inventory = snap
            self.store.put("inventory", to_dict(snap))
            if self.cfg.executor.backend == "simulated":
                if isinstance(self.backend, DemoBackend) or self.backend is None:
                    self.backend = backend_for_snapshot(snap)
                    self.executor = MoveExecutor(self.backend, self.store, self.telemetry,
                                                 timeout_s=self.cfg.executor.migration_timeout_s)
            self.view = None
        return snap

    def ingest(self, ts: Sequence[float], kind: Sequence[str], name: Sequence[str],
               cpu: Sequence[float], mem: Sequence[float]) -> int:
        n = self.push.add(ts, kind, name, cpu, mem)
        self.telemetry.samples.inc(n)
        return n

    def _move_vm(self, vm: str, host: str) -> None:
        with self._lock:
            inv = self.inventory
            if inv is None:
                return
            vms = tuple(dataclasses.replace(v, host=host) if v.name == vm else v
                        for v in inv.vms)
            self.inventory = ClusterSnapshot(hosts=inv.hosts, vms=vms, rules=inv.rules)
            self.store.put("inventory", to_dict(self.inventory))
            self.view = None

    def refresh_from_backend(self) -> None:
        """Take VM placement (and new or gone VMs) from the backend's inventory."""
        if self.backend is None or self.inventory is None:
            return
        infos = {i.name: i for i in self.backend.inventory()}
        with self._lock:
            inv = self.inventory
            hosts = {h.name for h in inv.hosts}
            doc = to_dict(inv)
            kept = []
            for raw in doc["vms"]:
                info = infos.pop(raw["name"], None)
                if info is None:
                    continue
                if info.host in hosts:
                    raw["host"] = info.host
                kept.append(raw)
            for info in infos.values():
                if info.host in hosts:
                    kept.append({"name": info.name, "host": info.host, "vcpus": info.vcpus,
                                 "mem_mb": info.mem_mb, "cpu_demand": 0, "mem_demand_mb": 0})
            names = {v["name"] for v in kept}
            doc["vms"] = kept
            doc["rules"] = [r for r in doc["rules"] if all(v in names for v in r["vms"])]
            self.inventory = parse_snapshot(doc, mem_overcommit=self.cfg.cluster.mem_overcommit)
            self.store.put("inventory", to_dict(self.inventory))
            self.view = None

    # -- estimation ----------------------------------------------------------------------------
    def _frame(self, now: float) -> pd.DataFrame:
        frames = []
        for src in self.sources:
            f = src.frame(now)
            if len(f):
                frames.append(f)
        if not frames:
            return self.push.frame(now)
        return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)

    def _violated_rule_members(self, snap: ClusterSnapshot) -> set[str]:
        host = {v.name: v.host for v in snap.vms}
        out: set[str] = set()
        for r in snap.rules:
            if not r.mandatory:
                continue
            hosts = [host[v] for v in r.vms]
            bad = (r.type is RuleType.AFFINITY and len(set(hosts)) > 1) or \
                  (r.type is RuleType.ANTI_AFFINITY and len(set(hosts)) < len(hosts)) or \
                  (r.type is RuleType.VM_HOST and any(h not in r.hosts for h in hosts))
            if bad:
                out.update(r.vms)
        return out

    def _pins(self, inv: ClusterSnapshot, now: float) -> dict[str, str]:
        pins: dict[str, str] = {}
        for v in inv.vms:
            if self.cfg.cluster.vm_level(v.name) == "disabled":
                pins[v.name] = "automation disabled for this VM"
        cd = self.cfg.loop.cooldown_s
        if cd > 0:
            exempt = self._violated_rule_members(inv) | {
                v.name for v in inv.vms if not inv.hosts[inv.host_index[v.host]].active}
            since = now - cd
            for vm in self.store.moved_since(since):
                if vm not in exempt:
                    pins.setdefault(vm, f"cool-down: moved within the last {cd:g} s")
            for vm in self.store.dismissed_since(since):
                if vm not in exempt:
                    pins.setdefault(vm, f"cool-down: recommendation dismissed within {cd:g} s")
        return pins

    def estimate(self, now: float | None = None) -> ClusterView:
        """Estimate demand from the samples and build the snapshot the engine sees."""
        now = self.clock() if now is None else now
        with self._lock:
            inv = self.inventory
        if inv is None:
            raise Unavailable("no inventory yet: POST /v1/inventory or set [cluster] inventory")
        ic = self.cfg.ingest
        frame = self._frame(now)
        est = estimate(frame, now, window_s=ic.window_s, method=ic.estimator,
                       percentile=ic.percentile)
        snap, fresh = apply_estimates(inv, est, now, stale_after_s=ic.stale_after_s,
                                      pins=self._pins(inv, now))
        view = ClusterView(snapshot=snap, freshness=fresh, built=now,
                           samples_seen=self.push.total)
        with self._lock:
            if self.inventory is inv:
                self.view = view
        self._export(view)
        return view

    def _export(self, view: ClusterView) -> None:
        snap = view.snapshot
        stats = util_stats(snap, snap.placement())
        self.telemetry.imbalance.labels(resource="cpu").set(stats.cpu_std)
        self.telemetry.imbalance.labels(resource="mem").set(stats.mem_std)
        cpu = [0] * len(snap.hosts)
        mem = [0] * len(snap.hosts)
        for v in snap.vms:
            h = snap.host_index[v.host]
            cpu[h] += v.cpu_demand
            mem[h] += v.mem_demand
        self.telemetry.set_hosts({
            h.name: (cpu[i] / h.cpu_capacity, mem[i] / h.mem_capacity)
            for i, h in enumerate(snap.hosts)})
        age = view.freshness.age
        self.telemetry.ingestion_age.set(float("nan") if age is None else age)
        self.telemetry.stale_vms.set(len(view.freshness.stale_vms))

    def current_view(self) -> ClusterView:
        with self._lock:
            view = self.view
        now = self.clock()
        if view is not None and (view.samples_seen == self.push.total or now - view.built < 2.0):
            return view
        return self.estimate(now)

    # -- planning --------------------------------------------------------------------------------
    def options(self, threshold: int | None = None) -> PlanOptions:
        c = self.cfg.cluster
        return PlanOptions(threshold=c.threshold if threshold is None else threshold,
                           max_migrations=c.max_migrations, max_moved_mem_gb=c.max_moved_mem_gb,
                           mem_overcommit=c.mem_overcommit, cpu_headroom=c.cpu_headroom,
                           time_limit=c.time_limit_s, seed=c.seed)

    @staticmethod
    def gains(result: PlanResult) -> list[float]:
        """Per move: how much worse (CPU std + memory std) the plan would be without it."""
        snap = result.snapshot
        base = result.after.imbalance
        out = []
        for m in result.moves:
            pl = list(result.placement)
            pl[snap.vm_index[m.vm]] = snap.host_index[m.source]
            out.append(round(util_stats(snap, tuple(pl)).imbalance - base, 6))
        return out

    def _recs_from(self, result: PlanResult) -> list[NewRecommendation]:
        return [NewRecommendation(kind=move_kind(m.reason), vm=m.vm, source=m.source,
                                  target=m.target, reason=m.reason, mem_mb=m.mem, gain=g)
                for m, g in zip(result.moves, self.gains(result), strict=True)]

    def run_cycle(self) -> CycleReport:
        """One control cycle: ingest, estimate, solve, store, execute by automation level."""
        with self._cycle_lock:
            return self._run_cycle()

    def _run_cycle(self) -> CycleReport:
        t0 = time.monotonic()
        self.cycle_no += 1
        self.store.put("cycle_no", self.cycle_no)
        report = CycleReport(cycle=self.cycle_no, duration_s=0.0, solve_s=None)
        try:
            if self.cfg.ingest.source == "libvirt":
                self.refresh_from_backend()
            view = self.estimate()
            for vm, why in list(view.freshness.pinned.items())[:5]:
                report.notes.append(f"{vm} held: {why}")
            if len(view.freshness.pinned) > 5:
                report.notes.append(f"... {len(view.freshness.pinned) - 5} more VMs held")
            ts = time.monotonic()
            result = plan(view.snapshot, self.options())
            report.solve_s = time.monotonic() - ts
            self.telemetry.solve.observe(report.solve_s)
            report.imbalance_before = result.before.imbalance
            report.imbalance_after = result.after.imbalance
            kinds = [move_kind(m.reason) for m in result.moves]
            if "balance" in kinds:
                self.streak += 1
                need = self.cfg.loop.imbalance_cycles
                if self.streak < need:
                    report.notes.append(f"imbalance seen {self.streak} of {need} cycles; "
                                        "balancing moves held")
                    if any(k != "balance" for k in kinds):
                        ts = time.monotonic()
                        result = plan(view.snapshot, self.options(threshold=1))
                        self.telemetry.solve.observe(time.monotonic() - ts)
                        report.solve_s += time.monotonic() - ts
                    else:
                        result = dataclasses.replace(result, moves=[],
                                                     placement=view.snapshot.placement(),
                                                     after=result.before)
                    report.imbalance_after = result.after.imbalance
            else:
                self.streak = 0
            report.streak = self.streak
            report.notes.extend(result.notes)
            recs = self.store.replace_pending(self._recs_from(result), cycle=self.cycle_no)
            report.recommendations = recs
            if recs:
                report.executed = self._execute_auto(recs, trigger="auto")
            self.telemetry.pending.set(len(self.store.recommendations("pending")))
            self.telemetry.cycles.labels(result="ok").inc()
        except (BalancerError, ValueError) as exc:
            report.notes.append(f"cycle failed: {exc}")
            self.telemetry.cycles.labels(result="error").inc()
            log.warning("cycle %d failed: %s", self.cycle_no, exc)
        report.duration_s = time.monotonic() - t0
        self.telemetry.cycle.observe(report.duration_s)
        self.store.record_cycle(duration_s=report.duration_s, solve_s=report.solve_s,
                                imbalance_before=report.imbalance_before,
                                imbalance_after=report.imbalance_after,
                                recommendations=len(report.recommendations),
                                executed=sum(1 for e in report.executed
                                             if e.get("state") == "completed"),
                                note="; ".join(report.notes)[:2000] or None)
        self.last_cycle = report
        self.ready.set()
        return report

    def _execute_auto(self, recs: list[dict[str, Any]], trigger: str) -> list[dict[str, Any]]:
        todo = [r for r in recs if _level_executes(self.cfg.cluster.vm_level(r["vm"]))]
        if not todo or self.executor is None:
            return []
        done = []
        for rec in self._order(todo):
            if self.stopping.is_set():
                break
            try:
                done.append(self.apply(rec["id"], trigger=trigger))
            except (Conflict, NotFound) as exc:
                done.append({"recommendation": rec["id"], "state": "skipped", "error": str(exc)})
        return [d.get("migration", d) for d in done]

    def _order(self, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """An order in which each move finds room on its target (memory), greedily."""
        inv = self.inventory
        if inv is None:
            return recs
        over = self.cfg.cluster.mem_overcommit
        used = {h.name: 0 for h in inv.hosts}
        for v in inv.vms:
            used[v.host] += v.mem
        cap = {h.name: h.mem_capacity * over for h in inv.hosts}
        left = list(recs)
        out = []
        while left:
            for i, r in enumerate(left):
                if used[r["target"]] + r["mem_mb"] <= cap[r["target"]]:
                    break
            else:
                out.extend(left)  # apply() refuses what does not fit; it stays recommended
                break
            r = left.pop(i)
            used[r["target"]] += r["mem_mb"]
            used[r["source"]] -= r["mem_mb"]
            out.append(r)
        return out

    # -- recommendations ---------------------------------------------------------------------------
    def apply(self, rec_id: int, trigger: str = "api") -> dict[str, Any]:
        rec = self.store.recommendation(rec_id)
        if rec is None:
            raise NotFound(f"recommendation {rec_id} does not exist", ["path", "rec_id"])
        if rec["state"] != "pending":
            raise Conflict(f"recommendation {rec_id} is {rec['state']}, not pending")
        if self.executor is None:
            raise Unavailable("no executor backend configured")
        if self.stopping.is_set():
            raise Unavailable("shutting down: no new migrations")
        inv = self.inventory
        assert inv is not None
        if rec["vm"] not in inv.vm_index or \
                inv.vms[inv.vm_index[rec["vm"]]].host != rec["source"]:
            self.store.set_recommendation_state(rec_id, "superseded", expect="pending",
                                                detail="VM no longer on the source host")
            raise Conflict(f"recommendation {rec_id}: VM {rec['vm']} is no longer on "
                           f"{rec['source']}")
        over = self.cfg.cluster.mem_overcommit
        target = inv.hosts[inv.host_index[rec["target"]]]
        used = sum(v.mem for v in inv.vms if v.host == target.name)
        if used + rec["mem_mb"] > target.mem_capacity * over:
            raise Conflict(f"recommendation {rec_id}: host {target.name} has no room for "
                           f"{rec['vm']} now ({used} + {rec['mem_mb']} MiB > "
                           f"{target.mem_capacity * over:.0f} MiB); apply the others first")
        if not self.store.set_recommendation_state(rec_id, "applying", expect="pending"):
            raise Conflict(f"recommendation {rec_id} is no longer pending")
        try:
            mig = self.executor.migrate(vm=rec["vm"], source=rec["source"],
                                        target=rec["target"], mem_mb=rec["mem_mb"],
                                        trigger=trigger, rec_id=rec_id)
        except Conflict as exc:
            self.store.set_recommendation_state(rec_id, "failed", detail=str(exc))
            raise
        if mig["state"] == "completed":
            self._move_vm(rec["vm"], rec["target"])
            self.store.set_recommendation_state(rec_id, "applied")
        else:
            self.store.set_recommendation_state(rec_id, "failed", detail=mig["error"])
        self.telemetry.pending.set(len(self.store.recommendations("pending")))
        return {"recommendation": self.store.recommendation(rec_id), "migration": mig}

    def dismiss(self, rec_id: int) -> dict[str, Any]:
        rec = self.store.recommendation(rec_id)
        if rec is None:
            raise NotFound(f"recommendation {rec_id} does not exist", ["path", "rec_id"])
        if not self.store.set_recommendation_state(rec_id, "dismissed", expect="pending"):
            raise Conflict(f"recommendation {rec_id} is {rec['state']}, not pending")
        self.telemetry.pending.set(len(self.store.recommendations("pending")))
        return self.store.recommendation(rec_id)  # type: ignore[return-value]

    # -- maintenance ------------------------------------------------------------------------------
    def maintenance(self, host: str, enter: bool) -> dict[str, Any]:
        with self._cycle_lock:
            with self._lock:
                inv = self.inventory
                if inv is None:
                    raise Unavailable("no inventory yet")
                if host not in inv.host_index:
                    raise NotFound(f"host {host!r} is not in the inventory", ["path", "host"])
                state = HostState.MAINTENANCE if enter else HostState.ACTIVE
                hosts = tuple(dataclasses.replace(h, state=state) if h.name == host else h
                              for h in inv.hosts)
                if not enter:
                    self.inventory = ClusterSnapshot(hosts=hosts, vms=inv.vms, rules=inv.rules)
                else:
                    doc = to_dict(ClusterSnapshot(hosts=hosts, vms=inv.vms, rules=inv.rules))
                    # The remaining hosts must be able to hold every VM.
                    self.inventory = parse_snapshot(
                        doc, mem_overcommit=self.cfg.cluster.mem_overcommit)
                self.store.put("inventory", to_dict(self.inventory))
                self.view = None
            out: dict[str, Any] = {"host": host, "state": state.value, "plan": None,
                                   "recommendations": [], "executed": []}
            if not enter:
                pend = [r for r in self.store.recommendations("pending")
                        if r["kind"] == "evacuation" and r["source"] == host]
                for r in pend:
                    self.store.set_recommendation_state(r["id"], "superseded", expect="pending",
                                                        detail=f"{host} left maintenance")
                return out
            view = self.estimate()
            result = plan(view.snapshot, self.options(threshold=1))
            recs = self.store.replace_pending(self._recs_from(result), cycle=None,
                                              kinds=("evacuation", "mandatory"))
            out["plan"] = result.to_dict()
            out["recommendations"] = recs
            out["executed"] = self._execute_auto(recs, trigger="evacuation")
            self.telemetry.pending.set(len(self.store.recommendations("pending")))
            return out

    # -- initial placement ----------------------------------------------------------------------------
    def place(self, *, name: str, vcpus: int, mem_mb: int, cpu_demand: float | None,
              mem_demand_mb: float | None) -> dict[str, Any]:
        """Best host for a new VM: the one that leaves the cluster most balanced.

        Description
            Among active hosts with fresh data where the VM fits (configured memory within
            capacity x overcommit, CPU demand within capacity x (1 - headroom)), pick the one
            minimising CPU std + memory std of host utilisation after placement, as DRS initial
            placement does. Demand defaults to the VM's full size (a conservative guess).
        Requirements
            An inventory; samples make host loads current.
        Limitations
            The new VM has no rules yet; existing rules are not affected by it.
        """
        view = self.current_view()
        snap = view.snapshot
        if name in snap.vm_index:
            raise Conflict(f"field 'name': VM {name!r} already exists")
        cpu_d = float(vcpus) if cpu_demand is None else cpu_demand
        mem_d = float(mem_mb) if mem_demand_mb is None else mem_demand_mb
        if cpu_d > vcpus:
            raise InputError(f"field 'cpu_demand': {cpu_d:g} is above vcpus={vcpus}")
        if mem_d > mem_mb:
            raise InputError(f"field 'mem_demand_mb': {mem_d:g} is above mem_mb={mem_mb}")
        c = self.cfg.cluster
        n = len(snap.hosts)
        cap_c = np.array([h.cpu_capacity for h in snap.hosts], dtype=float)
        cap_m = np.array([h.mem_capacity for h in snap.hosts], dtype=float)
        cpu = np.zeros(n)
        mem = np.zeros(n)
        cfg_mem = np.zeros(n)
        for v in snap.vms:
            h = snap.host_index[v.host]
            cpu[h] += v.cpu_demand
            mem[h] += v.mem_demand
            cfg_mem[h] += v.mem
        active = np.array([h.active for h in snap.hosts])
        stale = set(view.freshness.stale_hosts)
        fresh = np.array([h.name not in stale for h in snap.hosts])
        fits_m = cfg_mem + mem_mb <= cap_m * c.mem_overcommit
        fits_c = cpu + cpu_d * 1000 <= cap_c * (1 - c.cpu_headroom)
        ok = active & fresh & fits_m & fits_c
        if not ok.any():
            raise InfeasibleError(
                f"no host can take VM {name}: {int((~active).sum())} not active, "
                f"{int((active & ~fresh).sum())} without fresh data, "
                f"{int((active & fresh & ~fits_m).sum())} without memory, "
                f"{int((active & fresh & fits_m & ~fits_c).sum())} without CPU",
                culprits=[h.name for h in snap.hosts])
        idx = np.flatnonzero(active)
        cu, mu = cpu[idx] / cap_c[idx], mem[idx] / cap_m[idx]
        before = float(np.std(cu) + np.std(mu))
        scores = []
        for k, h in enumerate(idx):
            if not ok[h]:
                continue
            cu2, mu2 = cu.copy(), mu.copy()
            cu2[k] += cpu_d * 1000 / cap_c[h]
            mu2[k] += mem_d / cap_m[h]
            scores.append((float(np.std(cu2) + np.std(mu2)), snap.hosts[h].name, int(h)))
        scores.sort()
        best, host, h = scores[0]
        reason = (f"{host}: lowest imbalance after placement ({before:.4f} -> {best:.4f}); "
                  f"cpu {100 * cpu[h] / cap_c[h]:.0f}%->"
                  f"{100 * (cpu[h] + cpu_d * 1000) / cap_c[h]:.0f}%, mem "
                  f"{100 * mem[h] / cap_m[h]:.0f}%->{100 * (mem[h] + mem_d) / cap_m[h]:.0f}%; "
                  f"{len(scores)} of {n} hosts could take it")
        applied = False
        if c.automation in ("partially", "fully") and \
                c.vm_level(name) in ("partially", "fully"):
            with self._lock:
                inv = self.inventory
                assert inv is not None
                doc = to_dict(inv)
                doc["vms"].append({"name": name, "host": host, "vcpus": vcpus,
                                   "mem_mb": mem_mb, "cpu_demand": round(cpu_d, 3),
                                   "mem_demand_mb": round(mem_d)})
                self.inventory = parse_snapshot(doc, mem_overcommit=c.mem_overcommit)
                self.store.put("inventory", to_dict(self.inventory))
                self.view = None
            if isinstance(self.backend, DemoBackend):
                self.backend.set_vm(VMInfo(name, host, vcpus, mem_mb))
            applied = True
        return {"vm": name, "host": host, "reason": reason,
                "imbalance_before": round(before, 6), "imbalance_after": round(best, 6),
                "candidates": [{"host": hn, "imbalance_after": round(s, 6)}
                               for s, hn, _ in scores[:5]],
                "applied": applied}

    # -- state for the API ---------------------------------------------------------------------------
    def cluster_state(self) -> dict[str, Any]:
        view = self.current_view()
        snap, fr = view.snapshot, view.freshness
        stats = util_stats(snap, snap.placement())
        n = len(snap.hosts)
        cpu = [0] * n
        mem = [0] * n
        count = [0] * n
        for v in snap.vms:
            h = snap.host_index[v.host]
            cpu[h] += v.cpu_demand
            mem[h] += v.mem_demand
            count[h] += 1
        stale_h = set(fr.stale_hosts)
        stale_v = set(fr.stale_vms)

        def age(x: float | None) -> float | None:
            return None if x is None or math.isnan(x) else round(x, 3)

        hosts = [{"name": h.name, "state": h.state.value, "cpu_capacity": h.cpu_capacity / 1000,
                  "mem_capacity_mb": h.mem_capacity, "cpu_used": cpu[i] / 1000,
                  "mem_used_mb": mem[i], "cpu_util": round(cpu[i] / h.cpu_capacity, 6),
                  "mem_util": round(mem[i] / h.mem_capacity, 6), "vms": count[i],
                  "fresh": h.name not in stale_h, "sample_age_s": age(fr.host_age.get(h.name))}
                 for i, h in enumerate(snap.hosts)]
        vms = [{"name": v.name, "host": v.host, "vcpus": v.vcpus, "mem_mb": v.mem,
                "cpu_demand": v.cpu_demand / 1000, "mem_demand_mb": v.mem_demand,
                "automation": self.cfg.cluster.vm_level(v.name),
                "fresh": v.name not in stale_v, "sample_age_s": age(fr.vm_age.get(v.name)),
                "held": fr.pinned.get(v.name)} for v in snap.vms]
        last = self.last_cycle
        return {"cluster": self.cfg.cluster.name, "automation": self.cfg.cluster.automation,
                "as_of": view.built, "hosts": hosts, "vms": vms,
                "imbalance": stats.as_dict(), "freshness": fr.to_dict(),
                "last_cycle": None if last is None else {
                    "cycle": last.cycle, "duration_s": round(last.duration_s, 3),
                    "recommendations": len(last.recommendations),
                    "executed": len(last.executed), "notes": last.notes,
                    "imbalance_streak": last.streak}}

    def whatif(self, doc: Any, threshold: int, max_migrations: int | None,
               time_limit_s: float | None) -> dict[str, Any]:
        snap = parse_snapshot(doc, mem_overcommit=self.cfg.cluster.mem_overcommit)
        opts = dataclasses.replace(self.options(threshold), max_migrations=max_migrations,
                                   time_limit=time_limit_s or self.cfg.cluster.time_limit_s)
        t0 = time.monotonic()
        result = plan(snap, opts)
        self.telemetry.solve.observe(time.monotonic() - t0)
        out = result.to_dict()
        for m, g in zip(out["migrations"], self.gains(result), strict=True):
            m["gain"] = g
        return out

    def recover(self) -> list[dict[str, Any]]:
        if self.executor is None:
            return []
        rows = self.executor.recover()
        for row in rows:
            if row["state"] == "completed":
                self._move_vm(row["vm"], row["target"])
            if row.get("rec_id") is not None:
                self.store.set_recommendation_state(
                    row["rec_id"], "applied" if row["state"] == "completed" else "failed",
                    expect="applying", detail=row.get("error"))
        return rows


# -- the process: loop thread + uvicorn ----------------------------------------------------------
class Daemon:
    """Control loop on a thread, the API on uvicorn; stops cleanly on SIGTERM/SIGINT."""

    def __init__(self, controller: Controller, app: Any, *, host: str, port: int,
                 on_listening: Callable[[str, int], None] | None = None) -> None:
        import uvicorn

        self.controller = controller
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                     access_log=False, lifespan="on")
        self.server = _Server(self.config, self)
        self.on_listening = on_listening
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="balancer-loop", daemon=True)

    def _loop(self) -> None:
        c = self.controller
        while not c.stopping.is_set():
            try:
                c.run_cycle()
            except Exception:  # the loop must survive a bug in one cycle
                log.exception("control cycle crashed")
            self._wake.wait(c.cfg.loop.interval_s)
            self._wake.clear()

    def request_stop(self) -> None:
        self.controller.stopping.set()
        self._wake.set()
        self.server.should_exit = True

    def run(self) -> int:
        recovered = self.controller.recover()
        for row in recovered:
            log.warning("journal: migration %s of %s resolved as %s", row["id"], row["vm"],
                        row["state"])
        self._thread.start()
        old = {s: signal.signal(s, lambda *_: self.request_stop())
               for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.server.run()
        finally:
            self.request_stop()
            # Let the cycle in progress finish its in-flight migration and journal it.
            self._thread.join(timeout=max(60.0, self.controller.cfg.executor.migration_timeout_s))
            for s, h in old.items():
                signal.signal(s, h)
        return 0 if not self._thread.is_alive() else 1


def _make_server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, config: Any, daemon: Daemon) -> None:
            super().__init__(config)
            self._daemon = daemon

        def install_signal_handlers(self) -> None:  # the Daemon owns the signals
            return

        def capture_signals(self):  # type: ignore[no-untyped-def]  # noqa: ANN201
            import contextlib
            return contextlib.nullcontext()

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and self._daemon.on_listening is not None:
                for server in self.servers:
                    for sock in server.sockets:
                        host, port = sock.getsockname()[:2]
                        self._daemon.on_listening(host, port)
                        return

    return Server


class _Server:
    def __new__(cls, config: Any, daemon: Daemon) -> Any:  # noqa: D102
        return _make_server_class()(config, daemon)
