"""The composition root: snapshot -> policies -> problem -> solver -> verified, explained plan.

The CLI, the daemon, the API and the replay simulator all call ``plan()``; they differ only in
where the snapshot comes from and what happens to the plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from balancer.errors import SolverError
from balancer.model import ClusterSnapshot, Move, MoveKind, Placement, UtilStats, util_stats
from balancer.model.problem import Problem
from balancer.solver import EngineOptions, Status, solve
from balancer.solver.greedy import greedy
from balancer.solver.objective import Evaluator
from balancer.verify import Limits, verify
from policies import build_problem


@dataclass(frozen=True)
class PlanOptions:
    threshold: int = 3
    max_migrations: int | None = None
    max_moved_mem_gb: float | None = None
    mem_overcommit: float = 1.0
    cpu_headroom: float = 0.1
    time_limit: float | None = None  # None: scales with the cluster (see auto_time_limit)
    seed: int = 0
    max_iterations: int | None = None
    max_dtime: float | None = None
    solver: str = "cpsat"  # cpsat | greedy
    fixed_cost_mb: int = 1024  # every migration costs as if it moved this much more memory

    def policy_config(self) -> dict[str, dict[str, Any]]:
        return {
            "capacity": {"mem_overcommit": self.mem_overcommit, "cpu_headroom": self.cpu_headroom},
            "balance": {"threshold": self.threshold, "fixed_cost_mb": self.fixed_cost_mb},
            "budget": {"max_migrations": self.max_migrations,
                       "max_moved_mem_gb": self.max_moved_mem_gb},
        }

    def limits(self) -> Limits:
        return Limits(
            mem_overcommit=self.mem_overcommit,
            cpu_headroom=self.cpu_headroom,
            max_migrations=self.max_migrations,
            max_moved_mem_mb=None if self.max_moved_mem_gb is None
            else int(self.max_moved_mem_gb * 1024),
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


def explain_moves(problem: Problem, placement: Placement, ev: Evaluator | None = None,
                  ) -> list[Move]:
    """One ``Move`` per migrated VM, with the reason it is in the plan.

    Mandatory moves name what they fix (evacuation, the rule). Balancing moves say how much
    imbalance (CPU std + memory std of host utilisation) the plan would lose without them,
    and the loads of the two hosts before and after the plan.
    """
    snap = problem.snapshot
    start = problem.start
    ev = ev or Evaluator(problem)
    n_h = problem.n_hosts
    pl = np.array(placement, dtype=np.int64)
    st = np.array(start, dtype=np.int64)
    cpu = np.bincount(pl, weights=ev.vm_cpu, minlength=n_h)
    mem = np.bincount(pl, weights=ev.vm_memd, minlength=n_h)
    cpu0 = np.bincount(st, weights=ev.vm_cpu, minlength=n_h)
    mem0 = np.bincount(st, weights=ev.vm_memd, minlength=n_h)
    bal = np.array(problem.balanced, dtype=np.int64)

    def imbalance(c: np.ndarray, m: np.ndarray) -> float:
        if bal.size == 0:
            return 0.0
        return float(np.std(c[bal] / ev.cpu_cap[bal]) + np.std(m[bal] / ev.mem_cap[bal]))

    base = imbalance(cpu, mem)
    soft_broken_at_start: dict[int, list[str]] = {}
    for pref in problem.prefer:
        for u in pref.units:
            for v in problem.units[u].members:
                if start[v] not in pref.hosts and placement[v] in pref.hosts:
                    soft_broken_at_start.setdefault(v, []).append(pref.rule)
    moves = []
    for v, vm in enumerate(snap.vms):
        s, t = start[v], placement[v]
        if s == t:
            continue
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
        if not reasons:
            kind = MoveKind.BALANCE
            c, m = cpu.copy(), mem.copy()
            c[t] -= vm.cpu_demand
            m[t] -= vm.mem_demand
            c[s] += vm.cpu_demand
            m[s] += vm.mem_demand
            gain = imbalance(c, m) - base
            reasons.append(
                f"balance: lowers imbalance (cpu std + mem std) by {gain:.4f}; {src.name} cpu "
                f"{_pct(cpu0[s] / ev.cpu_cap[s])}->{_pct(cpu[s] / ev.cpu_cap[s])} mem "
                f"{_pct(mem0[s] / ev.mem_cap[s])}->{_pct(mem[s] / ev.mem_cap[s])}, {dst.name} cpu "
                f"{_pct(cpu0[t] / ev.cpu_cap[t])}->{_pct(cpu[t] / ev.cpu_cap[t])} mem "
                f"{_pct(mem0[t] / ev.mem_cap[t])}->{_pct(mem[t] / ev.mem_cap[t])}"
            )
        moves.append(Move(vm=vm.name, source=src.name, target=dst.name,
                          reason="; ".join(reasons), mem=vm.mem, kind=kind))
    return moves


def auto_time_limit(snapshot: ClusterSnapshot) -> float:
    """Default solver time: 3.5 s per 1,000 VMs, at least 3 s and at most 24 s (so that a
    10,000-VM plan, start-up and output included, stays within 30 s)."""
    return float(min(24.0, max(3.0, 3.5 * len(snapshot.vms) / 1000)))


def plan(snapshot: ClusterSnapshot, options: PlanOptions | None = None) -> PlanResult:
    """Plan the migrations that rebalance ``snapshot``; every answer passes the verifier."""
    opts = options or PlanOptions()
    t0 = time.monotonic()
    problem = build_problem(snapshot, opts.policy_config())
    ev = Evaluator(problem)
    if opts.solver == "greedy":
        unit_hosts = greedy(problem, ev)
        placement = tuple(int(unit_hosts[problem.unit_of[v]]) for v in range(len(snapshot.vms)))
        solver_info: dict[str, Any] = {
            "name": "greedy", "status": "FEASIBLE", "objective": ev.objective(unit_hosts),
            "bound": None, "seconds": round(time.monotonic() - t0, 3)}
    else:
        time_limit = opts.time_limit or auto_time_limit(snapshot)
        result = solve(problem, EngineOptions(
            time_limit=time_limit, seed=opts.seed, max_iterations=opts.max_iterations,
            max_dtime=opts.max_dtime), ev)
        placement = result.placement
        solver_info = {
            "name": "cpsat-lns",
            "status": result.status.value,
            "objective": result.objective,
            "bound": result.bound,
            "seconds": round(time.monotonic() - t0, 3),
            "iterations": result.iterations,
            "improvements": result.improvements,
            "start_objective": result.start_objective,
            "greedy_objective": result.greedy_objective,
            "seed": opts.seed,
            "time_limit": time_limit,
            "converged": bool(result.stats.get("converged", False)),
            "greedy_kept": bool(result.stats.get("greedy_kept", False)),
        }
        if result.status is Status.NO_SOLUTION_IN_TIME:
            raise SolverError(
                f"no feasible plan found within {time_limit:g} s; raise --time-limit")
    errors = verify(snapshot, placement, opts.limits())
    if errors:
        # A broken promise here is a bug in the engine; never hand such a plan out.
        raise SolverError("internal error: plan failed verification: " + "; ".join(errors[:5]))
    return PlanResult(
        snapshot=snapshot,
        placement=placement,
        moves=explain_moves(problem, placement, ev),
        before=util_stats(snapshot, snapshot.placement()),
        after=util_stats(snapshot, placement),
        solver=solver_info,
        notes=problem.notes,
        eligibility={snapshot.vms[v].name: why for v, why in sorted(problem.eligibility.items())},
    )
