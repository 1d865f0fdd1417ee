"""One control cycle's thinking: estimate demand, hold what must not move, plan, and the
anti-flapping that decides which moves are recommended now.

Description
    ``ControlCycle.estimate`` turns the samples of every source into the snapshot the engine
    sees (``balancer.ingest.demand``), with VMs *held* (pinned) for a reason: automation
    disabled, or a cool-down after a move or a dismissal (``[loop] cooldown_s``; VMs on a host
    leaving service or in a broken mandatory rule, per ``balancer.verify.broken_rules``, are
    exempt). ``ControlCycle.think`` runs the estimate and the first solve as one call,
    ``estimate_and_plan``, through the injected ``run_fn``: the service runs it in a solver
    worker process, so neither the estimate's nor the solve's CPU competes with API reads for
    the GIL (by default it runs in-process). Further solves go through ``plan_fn`` (same
    signature as ``balancer.service.plan``). ``ControlCycle.plan`` applies anti-flapping:
    balancing moves (``Move.kind`` is ``MoveKind.BALANCE``, set where the engine writes the
    reasons) are recommended only once the plan has wanted them for ``imbalance_cycles``
    consecutive cycles; evacuations and rule fixes are never delayed (the plan is then re-solved
    at threshold 1 for them alone).
Requirements
    Sample sources; the service config.
Limitations
    The streak lives in memory: a new leader starts counting again.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from balancer.config import IngestConfig, ServiceConfig
from balancer.errors import BalancerError
from balancer.forecast import ForecastOptions, ForecastTracker
from balancer.ingest.demand import Freshness, apply_estimates, estimate
from balancer.ingest.samples import SampleBuffer, Source
from balancer.model import (
    ClusterSnapshot,
    HostState,
    Move,
    MoveKind,
    Rule,
    RuleType,
    host_loads,
    util_stats,
)
from balancer.power_plan import PowerPlanOptions, forecast_snapshot, plan_power
from balancer.service import PlanOptions, PlanResult, plan
from balancer.store import Store
from balancer.telemetry import Telemetry
from balancer.verify import broken_rules

PlanFn = Callable[[ClusterSnapshot, PlanOptions], PlanResult]
SPARE_RULE = "balancer:standby-pending"  # keeps VMs off hosts whose standby is held
# run_fn(fn, *args): fn(*args, stop=...) where the caller chooses (a solver worker, in-process)
RunFn = Callable[..., Any]


def run_here(fn: Callable[..., Any], *args: Any) -> Any:
    """The default ``run_fn``: in this process."""
    return fn(*args, stop=None)


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
    power: list[dict[str, Any]] = field(default_factory=list)  # host actions carried out
    notes: list[str] = field(default_factory=list)
    imbalance_before: float | None = None
    imbalance_after: float | None = None
    streak: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ControlCycle:
    def __init__(self, cfg: ServiceConfig, store: Store, telemetry: Telemetry,
                 push: SampleBuffer, sources: Sequence[Source], plan_fn: PlanFn,
                 run_fn: RunFn = run_here) -> None:
        self.cfg = cfg
        self.store = store
        self.telemetry = telemetry
        self.push = push
        self.sources = list(sources)
        self.plan_fn = plan_fn
        self.run_fn = run_fn
        self.streak = 0
        self.power_streak = 0  # cycles in a row the power plan wanted a host in standby
        self._forecast: dict[str, float] | None = None  # the last power plan's, per VM

    # -- estimation --------------------------------------------------------------------------
    def frame(self, now: float) -> pd.DataFrame:
        frames = []
        for src in self.sources:
            f = src.frame(now)
            if len(f):
                frames.append(f)
        if not frames:
            return self.push.frame(now)
        return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)

    def pins(self, inv: ClusterSnapshot, now: float) -> dict[str, str]:
        """VMs held where they are, and why."""
        pins: dict[str, str] = {}
        for v in inv.vms:
            if self.cfg.cluster.vm_level(v.name) == "disabled":
                pins[v.name] = "automation disabled for this VM"
        cd = self.cfg.loop.cooldown_s
        if cd > 0:
            exempt = {vm for vms in broken_rules(inv).values() for vm in vms} | {
                v.name for v in inv.vms if not inv.hosts[inv.host_index[v.host]].active}
            since = now - cd
            for vm in self.store.moved_since(since):
                if vm not in exempt:
                    pins.setdefault(vm, f"cool-down: moved within the last {cd:g} s")
            for vm in self.store.dismissed_since(since):
                if vm not in exempt:
                    pins.setdefault(vm, f"cool-down: recommendation dismissed within {cd:g} s")
        return pins

    def estimate(self, inv: ClusterSnapshot, now: float) -> ClusterView:
        """Estimate demand from the samples and build the snapshot the engine sees."""
        seen = self.push.total
        snap, fresh = estimated(inv, self.frame(now), now, self.cfg.ingest, self.pins(inv, now))
        view = ClusterView(snapshot=snap, freshness=fresh, built=now, samples_seen=seen)
        self.export(view)
        return view

    def think(self, inv: ClusterSnapshot, now: float, report: CycleReport
              ) -> tuple[ClusterView, PlanResult, list[float]]:
        """The cycle's estimate, its plan (anti-flapping applied, see ``plan``) and each move's
        gain. The estimate and the first solve run as one ``run_fn`` call."""
        seen = self.push.total
        t = time.monotonic()
        th: Thought = self.run_fn(estimate_and_plan, inv, self.frame(now), now, self.cfg.ingest,
                                  self.pins(inv, now), self.options())
        solve_s = time.monotonic() - t - th.estimate_s
        self.telemetry.solve.observe(solve_s)
        view = ClusterView(snapshot=th.snapshot, freshness=th.freshness, built=now,
                           samples_seen=seen)
        self.export(view)
        result = self.plan(view, report, first=(th.result, solve_s))
        return view, result, th.gains if result is th.result else self.gains(result)

    def export(self, view: ClusterView) -> None:
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
        self.telemetry.hosts_standby.set(sum(h.state is HostState.STANDBY for h in snap.hosts))

    # -- planning ----------------------------------------------------------------------------
    def options(self, threshold: int | None = None) -> PlanOptions:
        c = self.cfg.cluster
        return PlanOptions(threshold=c.threshold if threshold is None else threshold,
                           max_migrations=c.max_migrations, max_moved_mem_gb=c.max_moved_mem_gb,
                           mem_overcommit=c.mem_overcommit, cpu_headroom=c.cpu_headroom,
                           time_limit=c.time_limit_s, seed=c.seed)

    def solve(self, snap: ClusterSnapshot, opts: PlanOptions) -> tuple[PlanResult, float]:
        t = time.monotonic()
        result = self.plan_fn(snap, opts)
        took = time.monotonic() - t
        self.telemetry.solve.observe(took)
        return result, took

    @staticmethod
    def gains(result: PlanResult) -> list[float]:
        """Per move: how much worse (CPU std + memory std) the plan would be without it."""
        return move_gains(result)

    def plan(self, view: ClusterView, report: CycleReport,
             first: tuple[PlanResult, float] | None = None) -> PlanResult:
        """The plan to recommend this cycle, anti-flapping applied; fills ``report``.
        ``first``: (the plan of ``view`` at the configured options, its solve seconds) when
        solved already."""
        for vm, why in list(view.freshness.pinned.items())[:5]:
            report.notes.append(f"{vm} held: {why}")
        if len(view.freshness.pinned) > 5:
            report.notes.append(f"... {len(view.freshness.pinned) - 5} more VMs held")
        result, report.solve_s = (self.solve(view.snapshot, self.options()) if first is None
                                  else first)
        report.imbalance_before = result.before.imbalance
        report.imbalance_after = result.after.imbalance
        kinds = [m.kind for m in result.moves]
        if MoveKind.BALANCE in kinds:
            self.streak += 1
            need = self.cfg.loop.imbalance_cycles
            if self.streak < need:
                report.notes.append(f"imbalance seen {self.streak} of {need} cycles; "
                                    "balancing moves held")
                if any(k is not MoveKind.BALANCE for k in kinds):
                    result, took = self.solve(view.snapshot, self.options(threshold=1))
                    report.solve_s += took
                else:
                    result = dataclasses.replace(result, moves=[],
                                                 placement=view.snapshot.placement(),
                                                 after=result.before)
                report.imbalance_after = result.after.imbalance
        else:
            self.streak = 0
        report.streak = self.streak
        report.notes.extend(result.notes)
        return result

    # -- power management --------------------------------------------------------------------
    def power(self, view: ClusterView, result: PlanResult, gains: list[float],
              report: CycleReport) -> tuple[PlanResult, list[float], list[Move], list[float]]:
        """The power plan beside the balance plan (``[power]``, ``balancer.power_plan``).

        Hosts to wake are recommended at once. Hosts to put in standby are recommended once
        the power plan has wanted a standby for ``standby_cycles`` cycles in a row; the
        balance plan is then solved again with those hosts leaving service, so that its moves
        empty them (kind ``POWER``) while it balances what stays on. A host whose standby or
        wake was dismissed keeps its state for the cool-down. Returns the plan, its gains,
        the host actions and theirs (watts saved; 0 for a wake)."""
        pc = self.cfg.power
        if pc.automation == "off":
            return result, gains, [], []
        snap = view.snapshot
        keep_on = self.store.dismissed_hosts_since(view.built - self.cfg.loop.cooldown_s)
        c = self.cfg.cluster
        opts = PowerPlanOptions(target_util=pc.target_util, migration_w=pc.migration_w,
                                max_switch=pc.max_switch, idle_w=pc.idle_w, peak_w=pc.peak_w,
                                mem_overcommit=c.mem_overcommit, seed=c.seed)
        history = None
        if pc.forecast:
            self._score_forecast(snap, report)
            f = self.frame(view.built)
            f = f[f["kind"] == "vm"]
            history = pd.DataFrame({"timestamp": f["ts"].to_numpy(), "vm": f["name"].to_numpy(),
                                    "cpu": f["cpu"].to_numpy()})
        t = time.monotonic()
        try:
            doc, self._forecast = self.run_fn(power_plan, snap, opts, frozenset(keep_on),
                                              history)
        except (BalancerError, ValueError) as exc:
            report.notes.append(f"power: no plan: {exc}")
            return result, gains, [], []
        report.solve_s = (report.solve_s or 0.0) + time.monotonic() - t
        fc = doc["power"].get("forecast")
        if fc is not None:
            report.notes.append(
                f"power: planned on the forecast of {fc['vms_forecast']} VMs: "
                f"{fc['cpu_forecast_cores']:g} cores against {fc['cpu_now_cores']:g} estimated")
        acts = doc["power"]["recommendations"]
        wake = [a for a in acts if a["action"] == "wake"]
        standby = [a for a in acts if a["action"] == "standby"]
        self.power_streak = self.power_streak + 1 if standby else 0
        if standby and self.power_streak < pc.standby_cycles:
            wanted = {a["host"] for a in standby}
            report.notes.append(
                f"power: standby of {', '.join(sorted(wanted))} wanted "
                f"{self.power_streak} of {pc.standby_cycles} cycles; held")
            standby = []
            if any(m.target in wanted for m in result.moves):
                result, gains = self._spare(snap, wanted, result, gains, report)
        if standby:
            leaving = {a["host"]: a for a in standby}
            snap2 = snap
            for h in leaving:
                snap2 = snap2.with_host_state(h, HostState.MAINTENANCE)
            try:
                r2 = self._replan(snap2, report)
            except (BalancerError, ValueError) as exc:
                report.notes.append(f"power: standby of {', '.join(leaving)} dropped: its "
                                    f"moves cannot be planned ({exc})")
                standby = []
            else:
                moves = [Move(m.vm, m.source, m.target,
                              f"empty {m.source} for standby (it draws about "
                              f"{leaving[m.source]['watts_now']:.0f} W now)", m.mem,
                              MoveKind.POWER)
                         if m.source in leaving else m for m in r2.moves]
                result = dataclasses.replace(r2, moves=moves)
                gains = move_gains(result)
        actions = [Move("", a["host"], a["host"], a["reason"], 0, MoveKind.STANDBY)
                   for a in standby] + [Move("", a["host"], a["host"], a["reason"], 0,
                                             MoveKind.WAKE) for a in wake]
        watts = [float(a["watts_now"]) for a in standby] + [0.0] * len(wake)
        if actions:
            report.notes.append(
                f"power: {len(standby)} standby, {len(wake)} wake recommended; the plan's "
                f"hosts draw {doc['power']['watts_before']:.0f} W now, "
                f"{doc['power']['watts_after']:.0f} W after")
        return result, gains, actions, watts

    def _spare(self, snap: ClusterSnapshot, wanted: set[str], result: PlanResult,
               gains: list[float], report: CycleReport) -> tuple[PlanResult, list[float]]:
        """While a standby is held by ``standby_cycles``, the balance plan sends no VM to the
        hosts it wants to empty (a mandatory rule keeps every VM not on them off them; their
        own VMs may stay or leave): otherwise balancing would fill them, the cool-down would
        then hold those VMs, and the hosts could not be emptied. Unchanged if that plan
        cannot be made."""
        rule = Rule(SPARE_RULE, RuleType.VM_HOST,
                    vms=tuple(v.name for v in snap.vms if v.host not in wanted),
                    hosts=tuple(h.name for h in snap.hosts if h.name not in wanted))
        snap2 = dataclasses.replace(snap, rules=(*snap.rules, rule))
        try:
            r2 = self._replan(snap2, report)
        except (BalancerError, ValueError) as exc:
            report.notes.append(f"power: balancing may fill {', '.join(sorted(wanted))}: no "
                                f"plan keeps them spare ({exc})")
            return result, gains
        report.notes.append(f"power: no VM sent to {', '.join(sorted(wanted))} while their "
                            "standby is held")
        return r2, move_gains(r2)

    def _replan(self, snap: ClusterSnapshot, report: CycleReport) -> PlanResult:
        """The cycle's plan solved again on ``snap`` (the power step's variant of the view), at
        the threshold anti-flapping allows now (1 while balancing moves are held); its solve
        time and imbalance go into ``report``. Raises what the solve raises."""
        balance_now = self.streak >= self.cfg.loop.imbalance_cycles
        r, took = self.solve(snap, self.options(None if balance_now else 1))
        report.solve_s = (report.solve_s or 0.0) + took
        report.imbalance_after = r.after.imbalance
        return r

    def _score_forecast(self, snap: ClusterSnapshot, report: CycleReport) -> None:
        """The last cycle's forecast against this cycle's estimate (what the demand turned out
        to be): WAPE and the share of VMs above their forecast."""
        last, self._forecast = self._forecast, None
        if not last:
            return
        names = [v.name for v in snap.vms if v.name in last]
        if not names:
            return
        actual = np.array([snap.vms[snap.vm_index[n]].cpu_demand for n in names], dtype=float)
        fc = np.array([last[n] for n in names], dtype=float)
        tracker = ForecastTracker()
        tracker.score(fc, actual)
        score = tracker.report()
        self.telemetry.forecast_wape.set(score["forecast_wape"])
        report.notes.append(f"power: last cycle's forecast: WAPE "
                            f"{100 * score['forecast_wape']:.1f} %, "
                            f"{100 * score['forecast_under_share']:.1f} % of VMs above it")


def power_plan(snap: ClusterSnapshot, opts: PowerPlanOptions, keep_on: frozenset[str],
               history: pd.DataFrame | None = None, stop: threading.Event | None = None
               ) -> tuple[dict[str, Any], dict[str, float] | None]:
    """The cycle's power plan (run in a solver worker through ``run_fn``); with ``history``
    (timestamp, vm, cpu in cores), on each VM's forecast peak (``ForecastOptions()``: at least
    its last sample). Returns the plan and the forecast per VM (millicores), or None."""
    forecast = report = None
    if history is not None and len(history):
        snap, _, report = forecast_snapshot(snap, history, ForecastOptions())
        forecast = {v.name: float(v.cpu_demand) for v in snap.vms}
    doc = plan_power(snap, opts, keep_on=keep_on, stop=stop)
    if report is not None:
        doc["power"]["forecast"] = report
    return doc, forecast


def move_gains(result: PlanResult) -> list[float]:
    """Per move: how much worse (CPU std + memory std) the plan would be without it."""
    snap = result.snapshot
    base = result.after.imbalance
    if not result.moves:
        return []
    # The final loads once, then per move only its VM put back on its source (numpy over
    # the active hosts): util_stats per move cost O(moves x VMs) in the API's process.
    cpu, mem = (np.asarray(x, dtype=float) for x in host_loads(snap, result.placement))
    active = np.asarray(snap.active_hosts(), dtype=int)
    cap_c = np.asarray([h.cpu_capacity for h in snap.hosts], dtype=float)
    cap_m = np.asarray([h.mem_capacity for h in snap.hosts], dtype=float)
    out = []
    for m in result.moves:
        v = snap.vm_index[m.vm]
        vm = snap.vms[v]
        now, back = result.placement[v], snap.host_index[m.source]
        c, mm = cpu.copy(), mem.copy()
        c[now] -= vm.cpu_demand
        c[back] += vm.cpu_demand
        mm[now] -= vm.mem_demand
        mm[back] += vm.mem_demand
        without = (float(np.std(c[active] / cap_c[active])) +
                   float(np.std(mm[active] / cap_m[active]))) if active.size else 0.0
        out.append(round(without - base, 6))
    return out


class Thought(NamedTuple):
    """What ``estimate_and_plan`` sends back from the worker."""

    snapshot: ClusterSnapshot
    freshness: Freshness
    result: PlanResult
    gains: list[float]
    estimate_s: float


def estimated(inv: ClusterSnapshot, frame: pd.DataFrame, now: float, ic: IngestConfig,
              pins: dict[str, str]) -> tuple[ClusterSnapshot, Freshness]:
    """The snapshot the engine sees: the inventory with demand estimated from ``frame``."""
    est = estimate(frame, now, window_s=ic.window_s, method=ic.estimator,
                   percentile=ic.percentile)
    return apply_estimates(inv, est, now, stale_after_s=ic.stale_after_s, pins=pins)


def estimate_and_plan(inv: ClusterSnapshot, frame: pd.DataFrame, now: float, ic: IngestConfig,
                      pins: dict[str, str], options: PlanOptions,
                      stop: threading.Event | None = None) -> Thought:
    """A cycle's thinking in one call (the service runs it in a solver worker): the estimate,
    the plan at ``options`` and each move's gain."""
    t = time.monotonic()
    snap, fresh = estimated(inv, frame, now, ic, pins)
    took = time.monotonic() - t
    result = plan(snap, options, stop=stop)
    return Thought(snap, fresh, result, move_gains(result), took)
