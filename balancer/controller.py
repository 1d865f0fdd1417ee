"""The service's operations, as the API and the loop call them: a facade over its parts.

``Controller`` wires the parts, each in its own module, and does what the API asks:

- ``balancer.inventory.Inventory``: the cluster snapshot, replaced whole or edited through the
  model's methods, kept in the store;
- ``balancer.cycle.ControlCycle``: estimation, what is held and why, planning through the
  injected ``plan_fn``, anti-flapping;
- ``balancer.recommendations``: typed recommendations and their transitions (stable ids);
- ``balancer.execution.PlanExecutor``: waves and the executor's runner, the history;
- ``balancer.leadership.Leadership`` (optional): only the leader mutates; followers answer
  409 naming it (``NotLeader``).

Automation levels (DRS terms), per cluster with per-VM overrides: ``manual`` recommends;
``partially`` also records initial placements; ``fully`` executes recommendations at once;
``disabled`` (per VM) never moves the VM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from balancer.config import ServiceConfig
from balancer.cycle import ClusterView, ControlCycle, CycleReport, PlanFn, RunFn, run_here
from balancer.errors import BalancerError, InfeasibleError, InputError
from balancer.execution import PlanExecutor, executor_config, simulated_backend
from balancer.executor.base import Backend, BackendError
from balancer.ingest.samples import SampleBuffer, Source
from balancer.inventory import Inventory
from balancer.leadership import Leadership
from balancer.model import VM, ClusterSnapshot, HostState, MoveKind, host_loads, util_stats
from balancer.power_actions import PowerActions
from balancer.recommendations import Recommendation, Recommendations, RecState
from balancer.service import plan
from balancer.service_errors import Conflict, NotFound, NotLeader, Unavailable
from balancer.snapshot import parse_snapshot
from balancer.store import Store
from balancer.telemetry import Telemetry
from policies.compatibility import eligibility as compat_eligibility

log = logging.getLogger("balancer.daemon")


def _level_executes(level: str) -> bool:
    return level == "fully"


class Controller:
    def __init__(self, cfg: ServiceConfig, store: Store, telemetry: Telemetry, *,
                 sources: Sequence[Source] = (), backend: Backend | None = None,
                 inventory: ClusterSnapshot | None = None,
                 clock: Callable[[], float] = time.time,
                 plan_fn: PlanFn = plan, run_fn: RunFn = run_here,
                 leadership: Leadership | None = None) -> None:
        self.cfg = cfg
        # None: a lone controller (tests, tools) that always leads and writes unfenced.
        self.leadership = leadership
        self.term: int | None = None  # the term this controller took over (take_over)
        self.store = store
        self.telemetry = telemetry
        self.clock = clock
        self.push = SampleBuffer(cfg.ingest.retention_s)
        self.sources: list[Source] = [self.push, *sources]
        # Every solve goes through plan_fn (same signature as balancer.service.plan), and the
        # cycle's estimate-and-plan through run_fn, so the service can run them in a worker
        # process.
        self.plan_fn = plan_fn
        self.cycle = ControlCycle(cfg, store, telemetry, self.push, self.sources, plan_fn,
                                  run_fn)
        self.recs = Recommendations(store)
        self._lock = threading.RLock()  # the view
        self._cycle_lock = threading.Lock()  # one cycle (or maintenance plan) at a time
        self.exec_cfg = executor_config(cfg, store.path)
        # One daemon per journal file: `balancer serve` holds the journal's lock (JournalLock)
        # for its lifetime; in PostgreSQL leadership is the lock.
        self.view: ClusterView | None = None
        self.backend: Backend | None = None
        self.executor: PlanExecutor | None = None
        self.inv = Inventory(store, mem_overcommit=cfg.cluster.mem_overcommit,
                             snapshot=inventory)
        self.inv.listeners.append(self._inventory_changed)
        self.power = PowerActions(self.inv, self.recs, telemetry, lambda: self.cfg.power)
        snap = self.inv.snapshot
        if backend is None and snap is not None and cfg.executor.backend == "simulated":
            backend = simulated_backend(snap, self.exec_cfg)
        if backend is not None:
            self.set_backend(backend)
        self.cycle_no = int(store.get("cycle_no", 0))
        self.last_cycle: CycleReport | None = None
        # /v1/cluster's JSON, kept while the view, the last cycle and the config are the same
        self._cluster_json: tuple[tuple[Any, ...], bytes] | None = None
        self._cluster_json_lock = threading.Lock()  # one build at a time; the others wait
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self._pending_gauge()
        self.telemetry.leader.set(1 if leadership is None else 0)

    # -- parts ---------------------------------------------------------------------------
    @property
    def cfg(self) -> ServiceConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, value: ServiceConfig) -> None:
        """A new config (the API changes automation levels) reaches the cycle too."""
        self._cfg = value
        cycle = getattr(self, "cycle", None)
        if cycle is not None:
            cycle.cfg = value

    @property
    def inventory(self) -> ClusterSnapshot | None:
        return self.inv.snapshot

    @property
    def streak(self) -> int:
        return self.cycle.streak

    def _inventory_changed(self, snap: ClusterSnapshot) -> None:
        with self._lock:
            self.view = None

    def _pending_gauge(self) -> None:
        self.telemetry.pending.set(self.recs.pending_count())

    def set_backend(self, backend: Backend) -> None:
        """Use ``backend`` for migrations (the simulated one is rebuilt with the inventory)."""
        with self._lock:
            self.backend = backend
            if self.executor is not None:
                self.executor.set_backend(backend)
            else:
                self.executor = PlanExecutor(
                    backend, self.store, self.telemetry, self.exec_cfg,
                    self.exec_cfg.journal.path, gate=self._gate)
                if self.term is not None:
                    self.executor.lead(self.term)

    def close(self) -> None:
        for src in self.sources:
            closer = getattr(src, "close", None)
            if closer is not None:
                closer()
        if self.executor is not None:
            self.executor.close()
        self.store.close()

    # -- leadership ------------------------------------------------------------------------
    def _gate(self) -> None:
        if self.leadership is not None:
            self.leadership.gate()

    @property
    def leading(self) -> bool:
        return self.leadership is None or self.leadership.is_leader

    def require_leader(self) -> None:
        """Mutations are the leader's: on a follower, a 409 naming the leader."""
        if self.leadership is not None and not self.leadership.is_leader:
            raise NotLeader(f"this node ({self.leadership.node}) follows: "
                            f"{self.leadership.leader_hint()}")

    def leader_info(self) -> dict[str, Any]:
        if self.leadership is None:
            return {"role": "leader", "term": 0, "id": "local",
                    "leader": {"id": "local", "address": "", "since": None}}
        return self.leadership.info()

    def take_over(self, term: int) -> list[dict[str, Any]]:
        """Newly elected: write under ``term``, settle what the last leader left unfinished
        (journal, history, recommendations) from where the backend says each VM is, and take
        VM placement from the backend."""
        log.info("taking over as leader, term %d", term)
        self.store.fence = (self.leadership.node, term) if self.leadership else None
        self.term = term
        self.telemetry.leader.set(1)
        self.telemetry.term.set(term)
        self.reload_inventory(force=True)
        with self._lock:
            if self.executor is not None:
                self.executor.lead(term)
        rows = self.recover()
        if self.backend is not None and self.cfg.executor.backend == "simulated" and \
                self.exec_cfg.simulated.state_path:
            self.refresh_from_backend()
        for row in rows:
            log.warning("recovered migration %s of %s: %s", row["id"], row["vm"],
                        row["state"])
        return rows

    def step_down(self) -> None:
        # The run in progress stops by itself: its next start is refused by the gate and its
        # next journal write by the fence. Migrations in flight are left to the new leader.
        self.term = None
        self.telemetry.leader.set(0)

    def reload_inventory(self, force: bool = False) -> None:
        """Followers (and a new leader) take the inventory the leader stored."""
        if self.inv.reload(force=force) and self.backend is None and \
                self.cfg.executor.backend == "simulated" and self.inventory is not None:
            self.set_backend(simulated_backend(self.inventory, self.exec_cfg))

    # -- inventory and samples -------------------------------------------------------------
    def set_inventory(self, doc: Any) -> ClusterSnapshot:
        self.require_leader()
        snap = parse_snapshot(doc, mem_overcommit=self.cfg.cluster.mem_overcommit)
        log.info("inventory replaced: %d hosts, %d VMs, %d rules", len(snap.hosts),
                 len(snap.vms), len(snap.rules))
        self.inv.replace(snap)
        if self.cfg.executor.backend == "simulated":
            # The simulated cluster is the inventory: it starts where the inventory says.
            self.set_backend(simulated_backend(snap, self.exec_cfg))
        return snap

    def ingest(self, ts: Sequence[float], kind: Sequence[str], name: Sequence[str],
               cpu: Sequence[float], mem: Sequence[float]) -> int:
        self.require_leader()
        n = self.push.add(ts, kind, name, cpu, mem)
        self.telemetry.samples.inc(n)
        return n

    def refresh_from_backend(self) -> None:
        """Take VM placement (and new or gone VMs) from the backend's inventory."""
        if self.backend is None or self.inventory is None:
            return
        self.inv.follow((i.name, i.host, i.vcpus, i.mem_mb) for i in self.backend.inventory())

    # -- estimation ------------------------------------------------------------------------
    def estimate(self, now: float | None = None) -> ClusterView:
        """Estimate demand from the samples and build the snapshot the engine sees."""
        now = self.clock() if now is None else now
        inv = self.inventory
        if inv is None:
            raise Unavailable("no inventory yet: POST /v1/inventory or set [cluster] inventory")
        view = self.cycle.estimate(inv, now)
        with self._lock:
            if self.inventory is inv:
                self.view = view
        return view

    def _fresh_view(self, now: float) -> ClusterView | None:
        """The current view if it is still good (no new samples, or built < 2 s ago)."""
        with self._lock:
            view = self.view
        if view is not None and (view.samples_seen == self.push.total or now - view.built < 2.0):
            return view
        return None

    def current_view(self) -> ClusterView:
        now = self.clock()
        view = self._fresh_view(now)
        return view if view is not None else self.estimate(now)

    def options(self, threshold: int | None = None) -> Any:
        return self.cycle.options(threshold)

    gains = staticmethod(ControlCycle.gains)

    # -- the cycle -------------------------------------------------------------------------
    def run_cycle(self) -> CycleReport:
        """One control cycle: ingest, estimate, solve, store, execute by automation level."""
        self.require_leader()
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
            now = self.clock()
            inv = self.inventory
            if inv is None:
                raise Unavailable("no inventory yet: POST /v1/inventory or set [cluster] "
                                  "inventory")
            try:
                view, result, gains = self.cycle.think(inv, now, report)
            except (BalancerError, ValueError):
                # no plan: the view and its metrics (stale VMs, imbalance) still follow the
                # samples, as they would after a plan
                with contextlib.suppress(BalancerError, ValueError):
                    self.estimate(now)
                raise
            with self._lock:
                if self.inventory is inv:
                    self.view = view
            result, gains, actions, watts = self.cycle.power(view, result, gains, report)
            recs = self.recs.propose(result.moves + actions, gains + watts, cycle=self.cycle_no)
            report.recommendations = [r.to_dict() for r in recs]
            if recs:
                report.executed = self._execute_auto(recs, trigger="auto", power=report.power)
            self._pending_gauge()
            self.telemetry.cycles.labels(result="ok").inc()
        except (BalancerError, ValueError) as exc:
            report.notes.append(f"cycle failed: {exc}")
            self.telemetry.cycles.labels(result="error").inc()
            log.warning("cycle %d failed: %s", self.cycle_no, exc)
        report.duration_s = time.monotonic() - t0
        self.telemetry.cycle.observe(report.duration_s)
        if report.imbalance_before is not None:
            log.info("cycle %d: imbalance %.4f -> %.4f, %d recommendations, %d executed, "
                     "solve %.2f s, cycle %.2f s", report.cycle, report.imbalance_before,
                     report.imbalance_after if report.imbalance_after is not None else
                     report.imbalance_before, len(report.recommendations),
                     len(report.executed), report.solve_s or 0.0, report.duration_s)
        self.store.record_cycle(duration_s=report.duration_s, solve_s=report.solve_s,
                                imbalance_before=report.imbalance_before,
                                imbalance_after=report.imbalance_after,
                                recommendations=len(report.recommendations),
                                executed=sum(1 for e in report.executed
                                             if e.get("state") == "completed"),
                                note="; ".join(report.notes)[:2000] or None)
        self.last_cycle = report
        self.ready.set()
        if self._cluster_json is not None:
            # /v1/cluster is read (a console, a tool): build its new state now, on the cycle's
            # thread, rather than in the first request after the cycle
            try:
                self.cluster_state_json()
            except (BalancerError, ValueError) as exc:
                log.debug("cluster state not prepared after cycle %d: %s", report.cycle, exc)
        return report

    # -- execution -------------------------------------------------------------------------
    def _execute_auto(self, recs: list[Recommendation], trigger: str,
                      power: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """What the automation levels carry out: the moves of VMs at level fully (their
        migration rows are returned); with ``[power] automation = "automated"``, wakes first,
        then the moves, then the standbys whose hosts the moves emptied (appended to
        ``power``)."""
        if self.stopping.is_set():
            return []
        todo = [r for r in recs if not r.kind.host_action
                and _level_executes(self.cfg.cluster.vm_level(r.vm))]
        acts = ([r for r in recs if r.kind.host_action]
                if self.cfg.power.automation == "automated" and power is not None else [])
        for r in acts:
            if r.kind is MoveKind.WAKE:
                power.append(self._power_auto(r, trigger))  # type: ignore[union-attr]
        rows = self._execute(todo, trigger) if todo and self.executor is not None else []
        for r in acts:
            if r.kind is MoveKind.STANDBY and not self.stopping.is_set():
                power.append(self._power_auto(r, trigger))  # type: ignore[union-attr]
        if acts:
            self._pending_gauge()
        return rows

    def _power_auto(self, rec: Recommendation, trigger: str) -> dict[str, Any]:
        try:
            return self.power.apply(rec, trigger)
        except Conflict as exc:  # e.g. a move that empties the host failed: it stays pending
            return {"rec_id": rec.id, "host": rec.source, "action": rec.kind.value,
                    "trigger": trigger, "state": "skipped", "detail": str(exc)}

    def _execute(self, recs: list[Recommendation], trigger: str) -> list[dict[str, Any]]:
        """Run recommendations through the executor; mark each applied or failed."""
        assert self.executor is not None
        inv = self.inventory
        assert inv is not None
        for r in recs:
            if not self.recs.move(r.id, RecState.APPLYING, expect=RecState.PENDING):
                raise Conflict(f"recommendation {r.id} is no longer pending")
        try:
            rows = self.executor.execute(inv, [r.move() for r in recs], trigger=trigger,
                                         rec_ids={r.vm: r.id for r in recs})
        except (InfeasibleError, Unavailable) as exc:
            for r in recs:
                self.recs.move(r.id, RecState.PENDING, expect=RecState.APPLYING)
            raise Conflict(f"cannot execute now: {exc}") from None
        finally:
            self._pending_gauge()
        for r in recs:
            where = self.backend.locate(r.vm) if self.backend is not None else None
            if where is not None and where != r.source:
                self.inv.move_vm(r.vm, where)
            if where == r.target:
                self.recs.move(r.id, RecState.APPLIED)
            else:
                legs = [x for x in rows if x["vm"] == r.vm]
                why = next((x["error"] for x in reversed(legs) if x["error"]), None)
                self.recs.move(r.id, RecState.FAILED,
                               detail=f"VM on {where}: {why or 'not moved'}")
        self._pending_gauge()
        return rows

    # -- recommendations -------------------------------------------------------------------
    def _rec(self, rec_id: int) -> Recommendation:
        rec = self.recs.get(rec_id)
        if rec is None:
            raise NotFound(f"recommendation {rec_id} does not exist", ["path", "rec_id"])
        return rec

    def apply(self, rec_id: int, trigger: str = "api") -> dict[str, Any]:
        self.require_leader()
        rec = self._rec(rec_id)
        if rec.state is not RecState.PENDING:
            raise Conflict(f"recommendation {rec_id} is {rec.state.value}, not pending")
        if self.stopping.is_set():
            raise Unavailable("shutting down: no new migrations")
        if rec.kind.host_action:
            with self._cycle_lock:  # not while a cycle plans with the host's current state
                done = self.power.apply(rec, trigger)
            self._pending_gauge()
            return {"recommendation": self.store.recommendation(rec_id), "migration": None,
                    "power": done}
        if self.executor is None:
            raise Unavailable("no executor backend configured")
        inv = self.inventory
        assert inv is not None
        if rec.vm not in inv.vm_index or inv.vms[inv.vm_index[rec.vm]].host != rec.source:
            self.recs.move(rec_id, RecState.SUPERSEDED, expect=RecState.PENDING,
                           detail="VM no longer on the source host")
            raise Conflict(f"recommendation {rec_id}: VM {rec.vm} is no longer on "
                           f"{rec.source}")
        log.info("recommendation %d applied by %s: %s %s -> %s", rec_id, trigger, rec.vm,
                 rec.source, rec.target)
        rows = self._execute([rec], trigger)
        return {"recommendation": self.store.recommendation(rec_id),
                "migration": rows[-1] if rows else None}

    def dismiss(self, rec_id: int) -> dict[str, Any]:
        self.require_leader()
        rec = self._rec(rec_id)
        if not self.recs.move(rec_id, RecState.DISMISSED, expect=RecState.PENDING):
            raise Conflict(f"recommendation {rec_id} is {rec.state.value}, not pending")
        self._pending_gauge()
        if rec.kind.host_action:
            log.info("recommendation %d dismissed: %s of %s (the host keeps its state for the "
                     "cool-down)", rec_id, rec.kind.value, rec.source)
        else:
            log.info("recommendation %d dismissed: %s %s -> %s (VM held for the cool-down)",
                     rec_id, rec.vm, rec.source, rec.target)
        return self.store.recommendation(rec_id)  # type: ignore[return-value]

    # -- maintenance -----------------------------------------------------------------------
    def maintenance(self, host: str, enter: bool) -> dict[str, Any]:
        self.require_leader()
        with self._cycle_lock:
            inv = self.inventory
            if inv is None:
                raise Unavailable("no inventory yet")
            if host not in inv.host_index:
                raise NotFound(f"host {host!r} is not in the inventory", ["path", "host"])
            state = HostState.MAINTENANCE if enter else HostState.ACTIVE
            self.inv.set_host_state(host, state)
            log.info("host %s %s maintenance", host, "enters" if enter else "leaves")
            out: dict[str, Any] = {"host": host, "state": state.value, "plan": None,
                                   "recommendations": [], "executed": []}
            if not enter:
                for r in self.recs.in_state(RecState.PENDING):
                    if r.kind is MoveKind.EVACUATION and r.source == host:
                        self.recs.move(r.id, RecState.SUPERSEDED, expect=RecState.PENDING,
                                       detail=f"{host} left maintenance")
                self._pending_gauge()
                return out
            view = self.estimate()
            result, _ = self.cycle.solve(view.snapshot, self.options(threshold=1))
            recs = self.recs.propose(result.moves, self.cycle.gains(result), cycle=None,
                                     kinds=(MoveKind.EVACUATION, MoveKind.MANDATORY))
            out["plan"] = result.to_dict()
            out["recommendations"] = [r.to_dict() for r in recs]
            out["executed"] = self._execute_auto(recs, trigger="evacuation")
            self._pending_gauge()
            return out

    # -- initial placement -----------------------------------------------------------------
    def place(self, *, name: str, vcpus: int, mem_mb: int, cpu_demand: float | None,
              mem_demand_mb: float | None) -> dict[str, Any]:
        """Best host for a new VM: the one that leaves the cluster most balanced.

        Description
            Among active hosts with fresh data where the VM fits (configured memory within
            capacity x overcommit, CPU demand within capacity x (1 - headroom)), pick the one
            minimising CPU std + memory std of host utilisation after placement
            (``balancer.model.util_stats``, the statistics the engine balances), as DRS
            initial placement does. Demand defaults to the VM's full size (a conservative
            guess).
        Requirements
            An inventory; samples make host loads current.
        Limitations
            The new VM has no rules yet; existing rules are not affected by it.
        """
        self.require_leader()
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
        cpu = [0.0] * n
        mem = [0.0] * n
        cfg_mem = [0.0] * n
        for v in snap.vms:
            h = snap.host_index[v.host]
            cpu[h] += v.cpu_demand
            mem[h] += v.mem_demand
            cfg_mem[h] += v.mem
        stale = set(view.freshness.stale_hosts)
        counts = {"not active": 0, "without fresh data": 0, "without memory": 0,
                  "without CPU": 0}
        ok = []
        for i, h in enumerate(snap.hosts):
            if not h.active:
                counts["not active"] += 1
            elif h.name in stale:
                counts["without fresh data"] += 1
            elif cfg_mem[i] + mem_mb > h.mem_capacity * c.mem_overcommit:
                counts["without memory"] += 1
            elif cpu[i] + cpu_d * 1000 > h.cpu_capacity * (1 - c.cpu_headroom):
                counts["without CPU"] += 1
            else:
                ok.append(i)
        if not ok:
            raise InfeasibleError(
                f"no host can take VM {name}: " + ", ".join(f"{k_n} {k}" for k, k_n in
                                                            counts.items()),
                culprits=[h.name for h in snap.hosts])
        new = VM(name=name, host=snap.hosts[ok[0]].name, vcpus=vcpus, mem=mem_mb,
                 cpu_demand=int(round(cpu_d * 1000)), mem_demand=int(round(mem_d)))
        before = util_stats(snap, snap.placement()).imbalance
        trial = snap.with_vm(new)
        base = list(trial.placement())
        at = trial.vm_index[name]
        scores = []
        for i in ok:
            base[at] = i
            scores.append((util_stats(trial, tuple(base)).imbalance, snap.hosts[i].name, i))
        scores.sort()
        best, host, h = scores[0]
        reason = (f"{host}: lowest imbalance after placement ({before:.4f} -> {best:.4f}); "
                  f"cpu {100 * cpu[h] / snap.hosts[h].cpu_capacity:.0f}%->"
                  f"{100 * (cpu[h] + cpu_d * 1000) / snap.hosts[h].cpu_capacity:.0f}%, mem "
                  f"{100 * mem[h] / snap.hosts[h].mem_capacity:.0f}%->"
                  f"{100 * (mem[h] + mem_d) / snap.hosts[h].mem_capacity:.0f}%; "
                  f"{len(scores)} of {n} hosts could take it")
        applied = False
        if c.automation in ("partially", "fully") and \
                c.vm_level(name) in ("partially", "fully"):
            inv = self.inv.add_vm(dataclasses.replace(new, host=host))
            if self.cfg.executor.backend == "simulated":
                self.set_backend(simulated_backend(inv, self.exec_cfg))
            applied = True
        log.info("placement of %s: %s (%s)", name, host,
                 "recorded" if applied else "recommended only")
        return {"vm": name, "host": host, "reason": reason,
                "imbalance_before": round(before, 6), "imbalance_after": round(best, 6),
                "candidates": [{"host": hn, "imbalance_after": round(s, 6)}
                               for s, hn, _ in scores[:5]],
                "applied": applied}

    # -- state for the API -----------------------------------------------------------------
    def cluster_state_cached(self) -> bytes | None:
        """``cluster_state_json()`` if it is ready without work (no estimate, no build)."""
        view = self._fresh_view(self.clock())
        return None if view is None else self._cached_cluster_json(view)

    def _cached_cluster_json(self, view: ClusterView) -> bytes | None:
        key = (view, self.last_cycle, self.cfg)
        cached = self._cluster_json
        if cached is not None and all(a is b for a, b in zip(cached[0], key, strict=True)):
            return cached[1]
        return None

    def cluster_state_json(self) -> bytes:
        """``cluster_state()`` as JSON, computed once per (view, last cycle, config)."""
        with self._cluster_json_lock:
            view = self.current_view()
            hit = self._cached_cluster_json(view)
            if hit is not None:
                return hit
            key = (view, self.last_cycle, self.cfg)
            body = json.dumps(self.cluster_state(view), separators=(",", ":"),
                              allow_nan=False).encode()
            self._cluster_json = (key, body)
            return body

    def cluster_state(self, view: ClusterView | None = None) -> dict[str, Any]:
        if view is None:
            view = self.current_view()
        snap, fr = view.snapshot, view.freshness
        placement = snap.placement()
        stats = util_stats(snap, placement)
        cpu, mem = host_loads(snap, placement)
        count = [0] * len(snap.hosts)
        for h in placement:
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
        result, _ = self.cycle.solve(snap, opts)
        out = result.to_dict()
        for m, g in zip(out["migrations"], self.cycle.gains(result), strict=True):
            m["gain"] = g
        return out

    # -- after a crash or a change of leader ----------------------------------------------
    def recover(self) -> list[dict[str, Any]]:
        if self.executor is None:
            return []
        rows = self.executor.recover()
        for row in rows:
            if row["state"] == "completed":
                self.inv.move_vm(row["vm"], row["target"])
            if row.get("rec_id") is not None:
                self.recs.move(row["rec_id"], RecState.APPLIED if row["state"] == "completed"
                               else RecState.FAILED, expect=RecState.APPLYING,
                               detail=row.get("error"))
        self._settle_applying()
        return rows

    def _settle_applying(self) -> None:
        """No recommendation stays ``applying`` after a crash: its last migration's outcome,
        else where the backend says the VM is."""
        for rec in self.recs.in_state(RecState.APPLYING):
            if rec.kind.host_action:
                self.power.settle(rec)
                continue
            legs = [m for m in self.store.migrations(limit=50, vm=rec.vm)
                    if m["rec_id"] == rec.id]
            if legs and legs[0]["state"] != "started":
                ok = legs[0]["state"] == "completed"
                why = legs[0]["error"]
            else:
                where = None
                if self.backend is not None:
                    try:
                        where = self.backend.locate(rec.vm)
                    except BackendError:
                        where = None
                ok = where == rec.target
                why = None if ok else f"interrupted by a crash before it ran; VM on {where}"
            self.recs.move(rec.id, RecState.APPLIED if ok else RecState.FAILED,
                           expect=RecState.APPLYING, detail=why)
            log.warning("recommendation %d was left applying: now %s", rec.id,
                        "applied" if ok else "failed")
