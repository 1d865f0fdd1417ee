"""The composition root: snapshot -> policies -> problem -> solver -> verified, explained plan.

The CLI, the daemon, the API and the replay simulator all call ``plan()``; they differ only in
where the snapshot comes from and what happens to the plan.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from balancer.errors import InputError, SolverError
from balancer.model import ClusterSnapshot, Move, MoveKind, Placement, UtilStats, util_stats
from balancer.model.problem import Problem, unit_placement, vm_placement
from balancer.solver import EngineOptions, Status, solve
from balancer.solver.engine import curve
from balancer.solver.gains import Imbalance, drop_unpaid, forced_units, moved_units, own_gains
from balancer.solver.greedy import greedy
from balancer.solver.objective import Evaluator
from balancer.solver.price import frontier_prices, reprice
from balancer.verify import Limits, verify
from policies import Policy, build_problem
from policies.balance import PRICE_PER_MIB, Balance, BalanceArgs, Threshold
from policies.budget import Budget, BudgetArgs
from policies.capacity import Capacity, CapacityArgs
from policies.compatibility import Compatibility
from policies.evacuation import Evacuation
from policies.rules import Rules


@dataclass(frozen=True)
class PlanOptions:
    """Everything a plan depends on besides the snapshot: a plain, picklable, frozen value.

    Validated once, here: ``threshold`` becomes a ``Threshold`` and the policy arguments are
    checked by building them (``policies()``), so a bad value fails at construction with the
    field named. The same argument objects give the verifier its limits (``limits()``)."""

    threshold: int = Threshold.DEFAULT
    max_migrations: int | None = None
    max_moved_mem_gb: float | None = None
    mem_overcommit: float = 1.0
    cpu_headroom: float = 0.1
    time_limit: float | None = None  # wall-clock safety stop; None: auto_time_limit
    seed: int = 0
    max_iterations: int | None = None
    max_dtime: float | None = None
    solver: str = "cpsat"  # cpsat | greedy
    # deterministic search effort (model size built over all LNS steps); None: auto_work()
    max_work: int | None = None
    effort: float = 1.0  # multiplies the automatic effort
    fixed_cost_mb: int = 1024  # every migration costs as if it moved this much more memory

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", Threshold(self.threshold))
        if self.solver not in ("cpsat", "greedy"):
            raise InputError(f"solver: must be 'cpsat' or 'greedy', got {self.solver!r}")
        self.capacity_args()
        self.budget_args()
        self.balance_args()

    def capacity_args(self) -> CapacityArgs:
        return CapacityArgs(mem_overcommit=self.mem_overcommit, cpu_headroom=self.cpu_headroom)

    def balance_args(self) -> BalanceArgs:
        return BalanceArgs(threshold=self.threshold, fixed_cost_mb=self.fixed_cost_mb)

    def budget_args(self) -> BudgetArgs:
        return BudgetArgs(max_migrations=self.max_migrations,
                          max_moved_mem_gb=self.max_moved_mem_gb)

    def policies(self) -> list[Policy]:
        """The policy objects of a plan, built directly (in ``DEFAULT_POLICIES`` order)."""
        return [Capacity(self.capacity_args()), Evacuation(), Compatibility(), Rules(),
                Balance(self.balance_args()), Budget(self.budget_args())]

    def policy_config(self) -> dict[str, dict[str, Any]]:
        """The same arguments as a registry config (for callers that build by name)."""
        return {
            "capacity": {"mem_overcommit": self.mem_overcommit, "cpu_headroom": self.cpu_headroom},
            "balance": {"threshold": int(self.threshold), "fixed_cost_mb": self.fixed_cost_mb},
            "budget": {"max_migrations": self.max_migrations,
                       "max_moved_mem_gb": self.max_moved_mem_gb},
        }

    def limits(self) -> Limits:
        """The verifier's limits, from the same argument objects the policies use."""
        cap, budget = self.capacity_args(), self.budget_args()
        return Limits(
            mem_overcommit=cap.mem_overcommit,
            cpu_headroom=cap.cpu_headroom,
            max_migrations=budget.max_migrations,
            max_moved_mem_mb=budget.max_moved_mem_mb,
        )


@dataclass
class PlanResult:
    snapshot: ClusterSnapshot
    placement: Placement
    moves: list[Move]
    before: UtilStats
    after: UtilStats
    solver: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    eligibility: dict[str, list[str]] = field(default_factory=dict)  # VM -> why fewer hosts

    @property
    def moved_mem(self) -> int:
        return sum(m.mem for m in self.moves)

    def to_dict(self) -> dict[str, Any]:
        return {
            "migrations": [
                {"vm": m.vm, "from": m.source, "to": m.target, "reason": m.reason,
                 "mem_mb": m.mem}
                for m in self.moves
            ],
            "efficacy": {
                "before": self.before.as_dict(),
                "after": self.after.as_dict(),
                "migrations": len(self.moves),
                "moved_mem_mb": self.moved_mem,
            },
            "solver": self.solver,
            "notes": self.notes,
            "eligibility": self.eligibility,
        }


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _gain_text(gain: float) -> str:
    return f"{gain:.4f}" if gain >= 1e-3 else f"{gain:.2g}"


def explain_moves(problem: Problem, placement: Placement, ev: Evaluator | None = None,
                  room: dict[int, str] | None = None) -> list[Move]:
    """One ``Move`` per migrated VM, with the reason it is in the plan.

    Mandatory moves name what they fix (evacuation, the rule). A balancing move states its own
    effect: how much the imbalance (CPU std + memory std of host utilisation) would rise if that
    move alone were undone, and the change it makes on its two hosts (their utilisation with
    and without it, the rest of the plan in place). The plan's per-host before/after is in the
    table, once. ``room`` names units kept because other moves need the room they free.
    """
    snap = problem.snapshot
    start = problem.start
    ev = ev or Evaluator(problem)
    room = room or {}
    pl = np.array(placement, dtype=np.int64)
    unit_hosts = np.array(unit_placement(problem, placement), dtype=np.int64)
    cpu, mem, _ = ev.loads(unit_hosts)
    imb = Imbalance.of(problem, ev)
    forced = forced_units(problem, ev, unit_hosts)
    moved = moved_units(ev, unit_hosts)
    balancing = np.array([u for u in moved.tolist() if u not in forced and u not in room],
                         dtype=np.int64)
    gain_of = dict(zip(balancing.tolist(),
                       own_gains(problem, ev, unit_hosts, balancing, imb).tolist(),
                       strict=True))
    soft_broken_at_start: dict[int, list[str]] = {}
    for pref in problem.prefer:
        for u in pref.units:
            for v in problem.units[u].members:
                if start[v] not in pref.hosts and placement[v] in pref.hosts:
                    soft_broken_at_start.setdefault(v, []).append(pref.rule)
    moves = []
    for v in np.nonzero(pl != np.array(start, dtype=np.int64))[0].tolist():
        vm = snap.vms[v]
        s, t = start[v], placement[v]
        u = problem.unit_of[v]
        src, dst = snap.hosts[s], snap.hosts[t]
        reasons = []
        kind = MoveKind.EVACUATION if u in problem.mandatory_reason and not src.active \
            else MoveKind.MANDATORY
        if u in problem.mandatory_reason:
            reasons.append(problem.mandatory_reason[u])
        for rule in soft_broken_at_start.get(v, []):
            reasons.append(f"follows should-rule {rule} (vm_host)")
        if not reasons and problem.only_mandatory:
            reasons.append("makes room for the mandatory moves (threshold 1)")
        if not reasons and u in room:
            reasons.append(room[u])
        if not reasons and u in gain_of:
            kind = MoveKind.BALANCE
            # this move's own effect on its two hosts: without it -> with it
            uc, um = int(ev.u_cpu[u]), int(ev.u_memd[u])
            reasons.append(
                f"balance: lowers imbalance (cpu std + mem std) by {_gain_text(gain_of[u])}; "
                f"{src.name} cpu {_pct((cpu[s] + uc) / ev.cpu_cap[s])}->"
                f"{_pct(cpu[s] / ev.cpu_cap[s])} mem {_pct((mem[s] + um) / ev.mem_cap[s])}->"
                f"{_pct(mem[s] / ev.mem_cap[s])}, {dst.name} cpu "
                f"{_pct((cpu[t] - uc) / ev.cpu_cap[t])}->{_pct(cpu[t] / ev.cpu_cap[t])} mem "
                f"{_pct((mem[t] - um) / ev.mem_cap[t])}->{_pct(mem[t] / ev.mem_cap[t])}"
            )
        if not reasons:
            reasons.append("moves with its group")
        moves.append(Move(vm=vm.name, source=src.name, target=dst.name,
                          reason="; ".join(reasons), mem=vm.mem, kind=kind))
    return moves


def auto_time_limit(snapshot: ClusterSnapshot) -> float:
    """Default wall-clock safety stop: 6 s per 1,000 VMs, at least 10 s and at most 120 s.

    The search itself stops on deterministic effort (``auto_work``), well before this on an
    idle machine; the wall-clock stop only guards against a machine far busier than that, and
    the solver block says when it fired (``"stopped_by": "wall_clock"``)."""
    return float(min(120.0, max(10.0, 6.0 * len(snapshot.vms) / 1000)))


WORK_PER_VM = 70  # model variables + constraints per VM in the cluster (see auto_work)


WORK_CAP = 100_000  # the default effort stops growing here (1,000 VMs and beyond)
# From this many active hosts the engine pre-balances the whole fleet by pairs of hot and
# cold hosts (``balancer.solver.pairs``, EngineOptions.pairs_min_hosts) and the search after it
# only polishes: the default effort stops at FLEET_WORK_CAP.
FLEET_HOSTS = 200
FLEET_WORK_CAP = 50_000


def auto_work(snapshot: ClusterSnapshot, effort: float = 1.0) -> int:
    """Default search effort in deterministic units (CP-SAT variables + constraints built over
    all LNS steps): WORK_PER_VM per VM, at least 20,000 and at most WORK_CAP (FLEET_WORK_CAP
    from FLEET_HOSTS active hosts), times ``effort``.
    On 64 hosts / 1,000 VMs that is about 220 LNS steps, 3 to 4 CPU seconds here."""
    cap = FLEET_WORK_CAP if len(snapshot.active_hosts()) >= FLEET_HOSTS else WORK_CAP
    return int(effort * max(20_000, min(cap, WORK_PER_VM * len(snapshot.vms))))


def plan(snapshot: ClusterSnapshot, options: PlanOptions | None = None,
         stop: threading.Event | None = None) -> PlanResult:
    """Plan the migrations that rebalance ``snapshot``; every answer passes the verifier.

    ``stop`` (a ``threading.Event``): when set, the search stops within about 0.5 s and the
    best verified plan found so far is returned, its solver block saying
    ``"stopped_by": "stop"``.
    """
    opts = options or PlanOptions()
    t0 = time.monotonic()
    problem = build_problem(snapshot, policies=opts.policies())
    ev = Evaluator(problem)
    if opts.solver == "greedy":
        unit_hosts = greedy(problem, ev, should_stop=None if stop is None else stop.is_set)
        solver_info: dict[str, Any] = {
            "name": "greedy", "status": "FEASIBLE", "objective": ev.objective(unit_hosts),
            "bound": None, "seconds": round(time.monotonic() - t0, 3),
            "stopped_by": "stop" if stop is not None and stop.is_set() else "converged"}
    else:
        time_limit = opts.time_limit or auto_time_limit(snapshot)
        max_work = opts.max_work
        if max_work is None and opts.max_iterations is None and opts.max_dtime is None:
            max_work = auto_work(snapshot, opts.effort)
        result = solve(problem, EngineOptions(
            time_limit=time_limit, seed=opts.seed, max_iterations=opts.max_iterations,
            max_dtime=opts.max_dtime, max_work=max_work,
            price=PRICE_PER_MIB.get(int(opts.threshold)), fixed_cost_mb=opts.fixed_cost_mb),
            ev, stop=stop)
        if result.status is Status.NO_SOLUTION_IN_TIME:
            if result.stopped_by == "stop":
                raise SolverError("stopped before a feasible plan was found")
            raise SolverError(
                f"no feasible plan found within {time_limit:g} s; raise --time-limit")
        unit_hosts = result.unit_hosts
        solver_info = {
            "name": "cpsat-lns",
            "status": result.status.value,
            "objective": result.objective,
            "bound": result.bound,
            "seconds": 0.0,
            "stopped_by": result.stopped_by,
            "iterations": result.iterations,
            "improvements": result.improvements,
            "start_objective": result.start_objective,
            "greedy_objective": result.greedy_objective,
            "seed": opts.seed,
            "time_limit": time_limit,
            "dtime": result.stats.get("dtime"),
            "work": result.stats.get("work"),
            "max_work": max_work,
            "converged": bool(result.stats.get("converged", False)),
            "greedy_kept": bool(result.stats.get("greedy_kept", False)),
            "bound_kind": result.stats.get("bound_kind", "solver" if result.status is
                                           Status.OPTIMAL else "forced moves"),
        }
    # Final pass: a balancing move stays only if its own gain is positive.
    unit_hosts, undone, room = drop_unpaid(problem, ev, np.asarray(unit_hosts, dtype=np.int64))
    if undone:
        solver_info["objective"] = ev.objective(unit_hosts)
        if solver_info.get("status") == "OPTIMAL":
            solver_info["status"] = "FEASIBLE"  # optimal for the model, pruned for people
        if solver_info.get("bound") is not None:
            solver_info["bound"] = min(solver_info["bound"], solver_info["objective"])
    if solver_info.get("bound") is not None:
        obj = solver_info["objective"]
        solver_info["gap"] = 0.0 if obj <= 0 else round((obj - solver_info["bound"]) / obj, 6)
    solver_info["moves_undone"] = undone
    placement = vm_placement(problem, [int(h) for h in unit_hosts])
    solver_info["seconds"] = round(time.monotonic() - t0, 3)
    errors = verify(snapshot, placement, opts.limits())
    if errors:
        # A broken promise here is a bug in the engine; never hand such a plan out.
        raise SolverError("internal error: plan failed verification: " + "; ".join(errors[:5]))
    return PlanResult(
        snapshot=snapshot,
        placement=placement,
        moves=explain_moves(problem, placement, ev, room),
        before=util_stats(snapshot, snapshot.placement()),
        after=util_stats(snapshot, placement),
        solver=solver_info,
        notes=problem.notes,
        eligibility={snapshot.vms[v].name: why for v, why in sorted(problem.eligibility.items())},
    )


@dataclass
class FrontierPoint:
    price: float  # per MiB moved, in the thresholds' units (policies.balance.PRICE_PER_MIB)
    plan: PlanResult
    bound: int  # lower bound on the objective at this price
    objective: int
    kind: str = "price"  # "price": solved at its price; "memory budget": filled between two

    def to_dict(self) -> dict[str, Any]:
        a = self.plan.after
        return {
            "price": round(self.price, 3),
            "moved_mem_gb": round(self.plan.moved_mem / 1024, 3),
            "moves": len(self.plan.moves),
            "imbalance": a.imbalance,
            "cpu_std": a.cpu_std,
            "mem_std": a.mem_std,
            "objective": self.objective,
            "bound": self.bound,
            "gap": (0.0 if self.objective <= 0
                    else round((self.objective - self.bound) / self.objective, 6)),
            "solved_by": self.kind,
            "migrations": [{"vm": m.vm, "from": m.source, "to": m.target, "reason": m.reason,
                            "mem_mb": m.mem} for m in self.plan.moves],
        }


@dataclass
class FrontierResult:
    snapshot: ClusterSnapshot
    before: UtilStats
    points: list[FrontierPoint]  # sorted by memory moved
    solver: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"before": self.before.as_dict(),
                "frontier": [p.to_dict() for p in self.points],
                "solver": self.solver}


FRONTIER_HIGH = 60_000.0  # price per MiB of the frontier's first point (2x threshold 2's)
FRONTIER_LOW = 10.0  # and of its last (a tenth of threshold 5's)


def frontier(snapshot: ClusterSnapshot, options: PlanOptions | None = None, points: int = 8,
             stop: threading.Event | None = None, fill: int = 2) -> FrontierResult:
    """The balance / migration-cost curve: ``points`` verified plans, one per price per MiB
    moved (geometric from ``FRONTIER_HIGH`` to ``FRONTIER_LOW``), from one search that
    warm-starts each point from the one before; sorted by memory moved.

    ``options`` gives the constraints (capacity, budgets are ignored: the curve is what a
    budget would pick from), the seed and the effort (three times a plan's, shared between the
    points); its threshold is not used (each point has its own price).

    ``fill`` more points are solved between each two neighbouring price points, by memory
    budget (``balancer.solver.engine.curve``), so any memory level has a plan nearby: up to
    ``points + fill x (points - 1)`` points in all, each saying how it was solved.
    """
    if points < 1:
        raise InputError(f"points: must be >= 1, got {points}")
    if fill < 0:
        raise InputError(f"fill: must be >= 0, got {fill}")
    opts = options or PlanOptions()
    t0 = time.monotonic()
    free = replace(opts, max_migrations=None, max_moved_mem_gb=None, threshold=5)
    problem = build_problem(snapshot, policies=free.policies())
    ev = Evaluator(problem)
    time_limit = opts.time_limit or 2 * auto_time_limit(snapshot)
    max_work = opts.max_work
    if max_work is None and opts.max_iterations is None and opts.max_dtime is None:
        max_work = 3 * auto_work(snapshot, opts.effort)
    prices = frontier_prices(points, FRONTIER_HIGH, FRONTIER_LOW)
    pts, stopped_by = curve(problem, prices, EngineOptions(
        time_limit=time_limit, seed=opts.seed, max_iterations=opts.max_iterations,
        max_dtime=opts.max_dtime, max_work=max_work, fixed_cost_mb=opts.fixed_cost_mb,
        frontier_fill=fill), ev, stop=stop)
    out = []
    limits = free.limits()
    for cp in pts:
        _, evp = reprice(problem, ev, cp.price, opts.fixed_cost_mb)
        hosts, _undone, room = drop_unpaid(problem, evp, cp.unit_hosts)
        placement = vm_placement(problem, [int(h) for h in hosts])
        errors = verify(snapshot, placement, limits)
        if errors:
            raise SolverError("internal error: frontier plan failed verification: "
                              + "; ".join(errors[:5]))
        obj = evp.objective(hosts)
        result = PlanResult(
            snapshot=snapshot, placement=placement,
            moves=explain_moves(problem, placement, evp, room),
            before=util_stats(snapshot, snapshot.placement()),
            after=util_stats(snapshot, placement),
            solver={"price": cp.price}, notes=problem.notes)
        out.append(FrontierPoint(price=cp.price, plan=result, bound=min(cp.bound, obj),
                                 objective=obj, kind=cp.kind))
    out.sort(key=lambda p: (p.plan.moved_mem, -p.price))
    return FrontierResult(
        snapshot=snapshot, before=util_stats(snapshot, snapshot.placement()), points=out,
        solver={"name": "cpsat-lns-price-curve", "points": len(out),
                "seconds": round(time.monotonic() - t0, 3), "stopped_by": stopped_by,
                "seed": opts.seed, "time_limit": time_limit, "max_work": max_work})
