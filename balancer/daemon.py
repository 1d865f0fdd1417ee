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
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from balancer import sdnotify
from balancer.config import ServiceConfig
from balancer.errors import BalancerError, InfeasibleError, InputError
from balancer.events import migration_event
from balancer.executor.base import Backend, BackendError
from balancer.executor.config import ExecutorConfig as ExecConfig
from balancer.executor.config import JournalConfig, LimitsConfig
from balancer.executor.config import load_config as load_exec_config
from balancer.executor.config import parse_config as parse_exec_config
from balancer.executor.journal import Entry, Journal, State
from balancer.executor.runner import Runner
from balancer.executor.simulated import SimulatedBackend
from balancer.ingest.demand import Freshness, apply_estimates, estimate
from balancer.ingest.samples import SampleBuffer, Source
from balancer.model import ClusterSnapshot, HostState, Move, RuleType, util_stats
from balancer.planner import PlannerLimits, Waves, make_waves, plan_fingerprint
from balancer.service import PlanOptions, PlanResult, plan
from balancer.snapshot import parse_snapshot, to_dict
from balancer.store import NewRecommendation, Store
from balancer.telemetry import Telemetry
from policies.compatibility import eligibility as compat_eligibility

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


# -- executing moves through the executor's runner ------------------------------------------
def executor_config(cfg: ServiceConfig, store_path: str) -> ExecConfig:
    """The executor's config: from ``[executor] config`` or ``[executor.settings]``.

    Unless it names a journal, the journal lives beside the store (``<store>.journal``); unless
    it sets limits, the executor's memory overcommit follows ``[cluster] mem_overcommit``.
    """
    if cfg.executor.settings is not None:
        out = parse_exec_config(cfg.executor.settings,
                                source=f"{cfg.source_path or 'config'}: [executor.settings]")
    else:
        out = load_exec_config(cfg.executor.config)
    update: dict[str, Any] = {}
    if out.journal == JournalConfig():
        jp = ":memory:" if store_path == ":memory:" else store_path + ".journal"
        update["journal"] = JournalConfig(path=jp, synchronous="normal")
    if out.limits == LimitsConfig():
        update["limits"] = LimitsConfig(mem_overcommit=cfg.cluster.mem_overcommit)
    return out.model_copy(update=update) if update else out


def simulated_backend(snapshot: ClusterSnapshot, exec_cfg: ExecConfig) -> Backend:
    """The executor's simulated backend holding ``snapshot``'s VMs (state kept in memory)."""
    return SimulatedBackend.from_snapshot(snapshot, exec_cfg, persist=False)


_OUTCOME = {State.SUCCEEDED: "completed", State.FAILED: "failed",
            State.CANCELLED: "cancelled", State.SKIPPED: "skipped"}


class PlanExecutor:
    """Hands moves to the executor (planner waves + runner) and keeps the service's history.

    Description
        ``execute`` orders the moves into waves with ``balancer.planner.make_waves`` (every
        intermediate state fits; concurrency limits respected) and runs them with the
        executor's ``Runner``, the single chokepoint for limits, timeouts, retries and its
        SQLite journal. The service's own history rows (``Store.migrations``) are written
        ``started`` before the run and given the runner's outcome after it, so the API's
        history never loses a migration. ``recover`` lets the runner reconcile its journal after
        a crash, then resolves the service rows still ``started`` by where the VM runs.
        ``cancel`` (SIGTERM) asks the runner to cancel the run: in-flight migrations are
        cancelled and journalled, the rest marked cancelled.
    Requirements
        A backend on the ``balancer.executor.base.Backend`` protocol; host memory capacities.
    Limitations
        One run at a time (runs are serialised by a lock).
    """

    def __init__(self, backend: Backend, store: Store, telemetry: Telemetry,
                 exec_cfg: ExecConfig, journal_path: str) -> None:
        self.backend = backend
        self.store = store
        self.telemetry = telemetry
        self.exec_cfg = exec_cfg
        # The journal's SQLite connection belongs to the thread that opened it, so one worker
        # thread owns it and runs every executor call; callers wait for their result.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="executor")
        self.journal: Journal = self._worker.submit(
            Journal, journal_path, synchronous=exec_cfg.journal.synchronous).result()
        self._lock = threading.Lock()
        self._runner: Runner | None = None
        self._cancelled = False

    def close(self) -> None:
        self._worker.submit(self.journal.close).result()
        self._worker.shutdown(wait=True)

    def _limits(self) -> PlannerLimits:
        c = self.exec_cfg
        return PlannerLimits(max_incoming_per_host=c.limits.max_incoming_per_host,
                             max_outgoing_per_host=c.limits.max_outgoing_per_host,
                             max_concurrent=c.limits.max_concurrent,
                             mem_overcommit=c.limits.mem_overcommit,
                             bandwidth_mbps=c.migration.bandwidth_mbps,
                             dirty_rate_mbps=c.migration.dirty_rate_mbps,
                             downtime_ms=c.migration.downtime_ms)

    def execute(self, snapshot: ClusterSnapshot, moves: list[Move], *, trigger: str,
                rec_ids: dict[str, int]) -> list[dict[str, Any]]:
        """Run ``moves`` (from ``snapshot``'s placement); one history row per migration leg."""
        return self._worker.submit(self._execute, snapshot, moves, trigger, rec_ids).result()

    def _execute(self, snapshot: ClusterSnapshot, moves: list[Move], trigger: str,
                 rec_ids: dict[str, int]) -> list[dict[str, Any]]:
        with self._lock:
            if self._cancelled:
                raise Unavailable("shutting down: no new migrations")
            waves = make_waves(snapshot, moves, self._limits())
            rows = {}
            for m in waves.migrations:
                rows[m.id] = self.store.migration_started(
                    vm=m.vm, source=m.source, target=m.target, mem_mb=m.mem_mb,
                    trigger=trigger, rec_id=rec_ids.get(m.vm))
            caps = {h.name: float(h.mem_capacity) for h in snapshot.hosts}
            plan_id = plan_fingerprint(waves)
            done: set[int] = set()

            def on_event(kind: str, e: Entry, progress: Any) -> None:
                self.telemetry.events.publish(migration_event(kind, e, progress))  # console
                # History follows the run live: each leg's row ends when the runner ends it.
                if kind in ("end", "skip") and e.plan_id == plan_id and e.id in rows \
                        and e.id not in done and e.state in _OUTCOME:
                    outcome = _OUTCOME[e.state]
                    self.store.migration_finished(rows[e.id], outcome, e.reason or None)
                    self.telemetry.migrations.labels(outcome=outcome).inc()
                    done.add(e.id)

            self._runner = Runner(self.backend, self.journal, self.exec_cfg, caps,
                                  on_event=on_event)
            try:
                summary = self._runner.run(waves, json.dumps(waves.to_dict()))
            except BackendError as exc:
                for mid, row in rows.items():
                    m = waves.migrations[mid] if mid < len(waves.migrations) else None
                    self._settle_row(row, m.vm if m else "", m.target if m else "", str(exc))
                raise Unavailable(f"executor stopped: {exc}") from None
            finally:
                self._runner = None
            out = []
            for e in summary.entries:
                outcome = _OUTCOME.get(e.state)
                if e.id in done:
                    pass
                elif outcome is None:  # cannot happen after run(); keep the row honest anyway
                    self._settle_row(rows[e.id], e.vm, e.target, f"left {e.state.value}")
                else:
                    self.store.migration_finished(rows[e.id], outcome, e.reason or None)
                    self.telemetry.migrations.labels(outcome=outcome).inc()
                row = self.store.migration(rows[e.id])
                if row is not None:
                    out.append(row)
            return out

    def _settle_row(self, row_id: int, vm: str, target: str, error: str) -> None:
        try:
            where = self.backend.locate(vm) if vm else None
        except BackendError as exc:
            self.store.migration_finished(row_id, "failed", f"{error}; location unknown: {exc}")
            return
        if where == target:
            self.store.migration_finished(row_id, "completed", None)
        else:
            self.store.migration_finished(row_id, "failed", f"{error}; VM on {where}")

    def cancel(self) -> None:
        """Stop: cancel the run in progress (safe from a signal handler) and refuse new ones."""
        self._cancelled = True
        runner = self._runner
        if runner is not None:
            runner.cancel()

    def recover(self) -> list[dict[str, Any]]:
        """After a crash: the runner reconciles its journal, then our rows are resolved."""
        return self._worker.submit(self._recover).result()

    def _recover(self) -> list[dict[str, Any]]:
        with self._lock:
            if self.journal.unfinished():
                Runner(self.backend, self.journal, self.exec_cfg, {}).run(
                    Waves(migrations=[], makespan_s=0.0))
            out = []
            for row in self.store.unfinished_migrations():
                self._settle_row(row["id"], row["vm"], row["target"], "interrupted by a restart")
                out.append(self.store.migration(row["id"]))
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
                 clock: Callable[[], float] = time.time,
                 plan_fn: Callable[[ClusterSnapshot, PlanOptions], PlanResult] = plan) -> None:
        self.cfg = cfg
        # Every plan goes through plan_fn: balancer.service.plan in-process by default;
        # ``balancer serve`` passes a worker-process pool (balancer.solving).
        self.plan_fn = plan_fn
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
        self.exec_cfg = executor_config(cfg, store.path)
        self.backend: Backend | None = None
        self.executor: PlanExecutor | None = None
        if backend is None and inventory is not None and cfg.executor.backend == "simulated":
            backend = simulated_backend(inventory, self.exec_cfg)
        if backend is not None:
            self.set_backend(backend)
        self.view: ClusterView | None = None
        self.cycle_no = int(store.get("cycle_no", 0))
        self.streak = 0
        self.last_cycle: CycleReport | None = None
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.telemetry.pending.set(len(store.recommendations("pending")))

    # -- inventory and samples --------------------------------------------------
    def set_backend(self, backend: Backend) -> None:
        """Use ``backend`` for migrations (the simulated one is rebuilt with the inventory)."""
        with self._lock:
            if self.executor is not None:
                self.executor.close()
            self.backend = backend
            self.executor = PlanExecutor(backend, self.store, self.telemetry, self.exec_cfg,
                                         self.exec_cfg.journal.path)

    def set_inventory(self, doc: Any) -> ClusterSnapshot:
        snap = parse_snapshot(doc, mem_overcommit=self.cfg.cluster.mem_overcommit)
        with self._lock:
            self.inventory = snap
            self.store.put("inventory", to_dict(snap))
            if self.cfg.executor.backend == "simulated":
                # The simulated cluster is the inventory: it starts where the inventory says.
                self.set_backend(simulated_backend(snap, self.exec_cfg))
            self.view = None
        return snap

    def close(self) -> None:
        for src in self.sources:
            closer = getattr(src, "close", None)
            if closer is not None:
                closer()
        if self.executor is not None:
            self.executor.close()
        self.store.close()

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

    # -- estimation --------------------------------------------------
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
        self.telemetry.vms.set(len(snap.vms))

    def current_view(self) -> ClusterView:
        with self._lock:
            view = self.view
        now = self.clock()
        if view is not None and (view.samples_seen == self.push.total or now - view.built < 2.0):
            return view
        return self.estimate(now)

    # -- planning --------------------------------------------------
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
            result = self.plan_fn(view.snapshot, self.options())
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
                        result = self.plan_fn(view.snapshot, self.options(threshold=1))
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
        if not todo or self.executor is None or self.stopping.is_set():
            return []
        return self._execute(todo, trigger)

    def _execute(self, recs: list[dict[str, Any]], trigger: str) -> list[dict[str, Any]]:
        """Run recommendations through the executor; mark each applied or failed."""
        assert self.executor is not None
        inv = self.inventory
        assert inv is not None
        for r in recs:
            if not self.store.set_recommendation_state(r["id"], "applying", expect="pending"):
                raise Conflict(f"recommendation {r['id']} is no longer pending")
        moves = [Move(vm=r["vm"], source=r["source"], target=r["target"], reason=r["reason"],
                      mem=r["mem_mb"]) for r in recs]
        try:
            rows = self.executor.execute(inv, moves, trigger=trigger,
                                         rec_ids={r["vm"]: r["id"] for r in recs})
        except (InfeasibleError, Unavailable) as exc:
            for r in recs:
                self.store.set_recommendation_state(r["id"], "pending", expect="applying")
            raise Conflict(f"cannot execute now: {exc}") from None
        finally:
            self.telemetry.pending.set(len(self.store.recommendations("pending")))
        for r in recs:
            where = self.backend.locate(r["vm"]) if self.backend is not None else None
            if where is not None and where != r["source"]:
                self._move_vm(r["vm"], where)
            if where == r["target"]:
                self.store.set_recommendation_state(r["id"], "applied")
            else:
                legs = [x for x in rows if x["vm"] == r["vm"]]
                why = next((x["error"] for x in reversed(legs) if x["error"]), None)
                self.store.set_recommendation_state(
                    r["id"], "failed", detail=f"VM on {where}: {why or 'not moved'}")
        self.telemetry.pending.set(len(self.store.recommendations("pending")))
        return rows

    # -- recommendations --------------------------------------------------
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
        rows = self._execute([rec], trigger)
        return {"recommendation": self.store.recommendation(rec_id),
                "migration": rows[-1] if rows else None}

    def dismiss(self, rec_id: int) -> dict[str, Any]:
        rec = self.store.recommendation(rec_id)
        if rec is None:
            raise NotFound(f"recommendation {rec_id} does not exist", ["path", "rec_id"])
        if not self.store.set_recommendation_state(rec_id, "dismissed", expect="pending"):
            raise Conflict(f"recommendation {rec_id} is {rec['state']}, not pending")
        self.telemetry.pending.set(len(self.store.recommendations("pending")))
        return self.store.recommendation(rec_id)  # type: ignore[return-value]

    # -- maintenance --------------------------------------------------
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
            result = self.plan_fn(view.snapshot, self.options(threshold=1))
            recs = self.store.replace_pending(self._recs_from(result), cycle=None,
                                              kinds=("evacuation", "mandatory"))
            out["plan"] = result.to_dict()
            out["recommendations"] = recs
            out["executed"] = self._execute_auto(recs, trigger="evacuation")
            self.telemetry.pending.set(len(self.store.recommendations("pending")))
            return out

    # -- initial placement --------------------------------------------------
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
            if self.cfg.executor.backend == "simulated" and self.inventory is not None:
                self.set_backend(simulated_backend(self.inventory, self.exec_cfg))
            applied = True
        return {"vm": name, "host": host, "reason": reason,
                "imbalance_before": round(before, 6), "imbalance_after": round(best, 6),
                "candidates": [{"host": hn, "imbalance_after": round(s, 6)}
                               for s, hn, _ in scores[:5]],
                "applied": applied}

    # -- state for the API --------------------------------------------------
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
        why = {snap.vms[v].name: w for v, (_ok, w) in compat_eligibility(snap).items()}

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
                "held": fr.pinned.get(v.name),
                "eligibility": why.get(v.name, [])} for v in snap.vms]
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
        result = self.plan_fn(snap, opts)
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
                 on_listening: Callable[[str, int], None] | None = None,
                 stop_solves: Callable[[], None] | None = None) -> None:
        import uvicorn

        self.controller = controller
        self.stop_solves = stop_solves  # asks solves in progress to return now
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
        if not self.controller.stopping.is_set():
            sdnotify.notify("STOPPING=1", "STATUS=stopping")  # systemd: shutting down
        self.controller.stopping.set()
        if self.stop_solves is not None:
            self.stop_solves()
        if self.controller.executor is not None:
            self.controller.executor.cancel()
        self._wake.set()
        self.server.should_exit = True

    def run(self) -> int:
        recovered = self.controller.recover()
        for row in recovered:
            log.warning("journal: migration %s of %s resolved as %s", row["id"], row["vm"],
                        row["state"])
        self._thread.start()
        watchdog = sdnotify.Watchdog(alive=self._thread.is_alive)  # WATCHDOG=1 if WatchdogSec
        old = {s: signal.signal(s, lambda *_: self.request_stop())
               for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.server.run()
        finally:
            self.request_stop()
            watchdog.stop()
            # Let the cycle in progress finish its in-flight migration and journal it.
            self._thread.join(timeout=600.0)
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
