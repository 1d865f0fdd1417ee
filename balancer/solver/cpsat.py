"""CP-SAT model of one neighbourhood of the placement problem.

The model is built for a set of *free* units, each with its candidate hosts; every other unit is
fixed where the incumbent placement has it and only contributes constant load. Built over all
units this is the whole problem; built over a few hosts' units it is one step of the large
neighbourhood search in ``balancer.solver.engine``.

Variables
    ``x[u, h]`` (bool) for each free unit and candidate host; exactly one per unit.
    ``e[h]`` (int) host demand minus its target, per dimension; ``y[h]`` (int) its penalty,
    bounded below by integer tangents of ``SCALE * (e/cap)^2`` (see ``objective.py``).
Constraints
    capacity on hosts that receive a VM (an enforcement literal where the host starts over a
    limit), mandatory anti-affinity, budgets; mandatory affinity and VM-host rules, evacuation
    and manual VMs are already in the units and their candidates.
Objective
    balance + migration cost + should-rule penalties, equal to ``Evaluator.objective`` up to
    the fixed part's constant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from ortools.sat.python import cp_model

from balancer.model.problem import Problem
from balancer.solver.objective import Evaluator


@dataclass
class SubModel:
    model: cp_model.CpModel
    x: dict[tuple[int, int], cp_model.IntVar]
    free: list[int]
    cands: dict[int, list[int]]
    # assumption literal -> what it stands for (only when built with explain=True)
    assumptions: dict[int, str] = field(default_factory=dict)


def build(problem: Problem, ev: Evaluator, unit_hosts: np.ndarray, free: list[int],
          cands: dict[int, list[int]], *, explain: bool = False) -> SubModel:
    """Build the model of ``free`` units over their ``cands``; the others stay in ``unit_hosts``.

    With ``explain``, each mandatory rule, each host's capacity and each budget is switched on
    by an assumption literal, so an infeasible model can name a sufficient set of culprits.
    """
    p = problem
    m = cp_model.CpModel()
    start = ev.start
    free_set = set(free)
    fixed_hosts = unit_hosts.copy()
    assumption_lits: dict[str, cp_model.IntVar] = {}

    def switch(name: str) -> list[cp_model.IntVar]:
        if not explain:
            return []
        if name not in assumption_lits:
            assumption_lits[name] = m.NewBoolVar(f"on[{name}]")
        return [assumption_lits[name]]

    # Fixed part: loads of the units that stay, received VMs, migrations used.
    fixed_mask = np.ones(len(p.units), dtype=bool)
    fixed_mask[free] = False
    f_cpu = np.bincount(fixed_hosts[fixed_mask], weights=ev.u_cpu[fixed_mask],
                        minlength=p.n_hosts).astype(np.int64)
    f_memd = np.bincount(fixed_hosts[fixed_mask], weights=ev.u_memd[fixed_mask],
                         minlength=p.n_hosts).astype(np.int64)
    f_mem = np.bincount(fixed_hosts[fixed_mask], weights=ev.u_mem[fixed_mask],
                        minlength=p.n_hosts).astype(np.int64)
    vm_unit = np.array(p.unit_of, dtype=np.int64)
    vm_fixed = fixed_mask[vm_unit]
    vm_hosts = fixed_hosts[vm_unit]
    moved_fixed = vm_fixed & (vm_hosts != start)
    f_received = np.bincount(vm_hosts[moved_fixed], minlength=p.n_hosts)
    f_migrations = int(moved_fixed.sum())
    f_moved_mem = int(ev.vm_mem[moved_fixed].sum())

    # start load per host (to know which hosts start over a limit)
    s_cpu = np.bincount(start, weights=ev.vm_cpu, minlength=p.n_hosts)
    s_mem = np.bincount(start, weights=ev.vm_mem, minlength=p.n_hosts)

    x: dict[tuple[int, int], cp_model.IntVar] = {}
    by_host: dict[int, list[int]] = {}
    moves_of: dict[tuple[int, int], tuple[int, int, int]] = {}  # (count, MiB, cost)
    for u in free:
        members = p.units[u].members
        lits = []
        for h in cands[u]:
            b = m.NewBoolVar(f"x[{u},{h}]")
            x[u, h] = b
            lits.append(b)
            by_host.setdefault(h, []).append(u)
            cnt = mem = cost = 0
            for v in members:
                if start[v] != h:
                    cnt += 1
                    mem += int(ev.vm_mem[v])
                    cost += int(ev.move_cost[v])
            moves_of[u, h] = (cnt, mem, cost)
        m.AddExactlyOne(lits)
        for h in cands[u]:
            m.AddHint(x[u, h], int(h == int(unit_hosts[u])))

    objective: list[cp_model.LinearExprT] = []
    obj_coefs: list[int] = []
    hinted_cpu = f_cpu.copy()
    hinted_memd = f_memd.copy()
    for u in free:
        h = int(unit_hosts[u])
        hinted_cpu[h] += ev.u_cpu[u]
        hinted_memd[h] += ev.u_memd[u]

    for h in sorted(by_host):
        units_h = by_host[h]
        xs = [x[u, h] for u in units_h]
        cpu_expr = cp_model.LinearExpr.WeightedSum(xs, [int(ev.u_cpu[u]) for u in units_h])
        memd_expr = cp_model.LinearExpr.WeightedSum(xs, [int(ev.u_memd[u]) for u in units_h])
        mem_expr = cp_model.LinearExpr.WeightedSum(xs, [int(ev.u_mem[u]) for u in units_h])
        # capacity, binding once the host receives a VM
        incoming = [x[u, h] for u in units_h if moves_of[u, h][0] > 0]
        over_at_start = s_mem[h] > p.mem_limit[h] or s_cpu[h] > p.cpu_limit[h]
        enforce: list[cp_model.IntVar] = switch(f"capacity of host {p.snapshot.hosts[h].name}")
        if incoming or f_received[h] > 0:
            if over_at_start and f_received[h] == 0:
                r = m.NewBoolVar(f"recv[{h}]")
                for lit in incoming:
                    m.AddImplication(lit, r)
                enforce = enforce + [r]
            c1 = m.Add(mem_expr + int(f_mem[h]) <= p.mem_limit[h])
            c2 = m.Add(cpu_expr + int(f_cpu[h]) <= p.cpu_limit[h])
            if enforce:
                c1.OnlyEnforceIf(enforce)
                c2.OnlyEnforceIf(enforce)
        if not ev.balanced_mask[h] or p.balance_weights == (0, 0):
            continue
        w_cpu, w_mem = p.balance_weights
        for dim, expr, fixed, target, tan, hinted, weight in (
            ("c", cpu_expr, f_cpu[h], ev.target_cpu[h], ev.tan_cpu, hinted_cpu[h], w_cpu),
            ("m", memd_expr, f_memd[h], ev.target_mem[h], ev.tan_mem, hinted_memd[h], w_mem),
        ):
            if weight == 0:
                continue
            lo = int(fixed - target)
            hi = lo + sum(int(c) for c in (ev.u_cpu if dim == "c" else ev.u_memd)[units_h])
            e = m.NewIntVar(lo, hi, f"e{dim}[{h}]")
            m.Add(e == expr + int(fixed - target))
            slopes = tan.slope[h]
            ub = int(max(abs(int(s)) * max(abs(lo), abs(hi)) for s in slopes)) + 1
            y = m.NewIntVar(0, ub, f"y{dim}[{h}]")
            for k in range(len(slopes)):
                m.Add(y >= int(slopes[k]) * e - int(tan.icpt[k]))
            e_val = int(hinted - target)
            m.AddHint(e, e_val)
            m.AddHint(y, max(0, int((slopes * e_val - tan.icpt).max())))
            objective.append(y)
            obj_coefs.append(weight)

    # migration cost
    for (u, h), (_cnt, _mem, cost) in moves_of.items():
        if cost:
            objective.append(x[u, h])
            obj_coefs.append(cost)

    # budgets: migrations counted, configured memory moved
    for limit, used, field_ix, name in (
        (p.max_migrations, f_migrations, 0, "budget max_migrations"),
        (p.max_moved_mem, f_moved_mem, 1, "budget max_moved_mem_gb"),
    ):
        terms = [(x[k], v[field_ix]) for k, v in moves_of.items() if v[field_ix]]
        if limit is None or not terms:
            continue
        ct = m.Add(cp_model.LinearExpr.WeightedSum([t for t, _ in terms], [c for _, c in terms])
                   <= limit - used)
        if explain:
            ct.OnlyEnforceIf(switch(name))

    # rules over units
    for g in p.apart:
        members = [u for u in g.units if u in free_set]
        if not members:
            continue
        fixed_on: dict[int, int] = {}
        for u in g.units:
            if u not in free_set:
                fixed_on[int(fixed_hosts[u])] = fixed_on.get(int(fixed_hosts[u]), 0) + 1
        hosts = sorted({h for u in members for h in cands[u]})
        for h in hosts:
            lits = [x[u, h] for u in members if (u, h) in x]
            if g.weight is None:
                if len(lits) + fixed_on.get(h, 0) > 1:
                    ct = m.Add(sum(lits) + fixed_on.get(h, 0) <= 1)
                    if explain:
                        ct.OnlyEnforceIf(switch(f"rule {g.rule}"))
            else:
                if len(lits) + fixed_on.get(h, 0) > 1:
                    z = m.NewIntVar(0, len(lits), f"apart[{g.rule},{h}]")
                    m.Add(z >= sum(lits) + fixed_on.get(h, 0) - 1)
                    objective.append(z)
                    obj_coefs.append(g.weight)
    for g in p.together:  # soft only; mandatory ones are units
        members = [u for u in g.units if u in free_set]
        if not members or g.weight is None:
            continue
        fixed_used = {int(fixed_hosts[u]) for u in g.units if u not in free_set}
        hosts = sorted({h for u in members for h in cands[u]} - fixed_used)
        for h in hosts:
            used = m.NewBoolVar(f"used[{g.rule},{h}]")
            for u in members:
                if (u, h) in x:
                    m.AddImplication(x[u, h], used)
            objective.append(used)
            obj_coefs.append(g.weight)
    for pref in p.prefer:
        for u in pref.units:
            if u not in free_set:
                continue
            for h in cands[u]:
                if h not in pref.hosts:
                    objective.append(x[u, h])
                    obj_coefs.append(pref.weight)

    if objective:
        m.Minimize(cp_model.LinearExpr.WeightedSum(objective, obj_coefs))
    sub = SubModel(model=m, x=x, free=list(free), cands=cands)
    if explain:
        sub.assumptions = {lit.Index(): name for name, lit in assumption_lits.items()}
        m.AddAssumptions(list(assumption_lits.values()))
    return sub


def read_solution(sub: SubModel, solver: cp_model.CpSolver, unit_hosts: np.ndarray) -> np.ndarray:
    out = unit_hosts.copy()
    for u in sub.free:
        for h in sub.cands[u]:
            if solver.BooleanValue(sub.x[u, h]):
                out[u] = h
                break
    return out
