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


@dataclass
class _Ctx:
    """What the constraint families share while one model is built."""

    p: Problem
    ev: Evaluator
    m: cp_model.CpModel
    unit_hosts: np.ndarray
    free: list[int]
    cands: dict[int, list[int]]
    explain: bool
    free_set: set[int] = field(default_factory=set)
    x: dict[tuple[int, int], cp_model.IntVar] = field(default_factory=dict)
    by_host: dict[int, list[int]] = field(default_factory=dict)
    moves_of: dict[tuple[int, int], tuple[int, int, int]] = field(default_factory=dict)
    objective: list[cp_model.LinearExprT] = field(default_factory=list)
    coefs: list[int] = field(default_factory=list)
    assumption_lits: dict[str, cp_model.IntVar] = field(default_factory=dict)
    # fixed part: loads of the units that stay, VMs received, budget used
    f_cpu: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    f_memd: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    f_mem: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    f_received: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    f_migrations: int = 0
    f_moved_mem: int = 0

    def switch(self, name: str) -> list[cp_model.IntVar]:
        """The assumption literal that turns constraint ``name`` on (explain mode only)."""
        if not self.explain:
            return []
        if name not in self.assumption_lits:
            self.assumption_lits[name] = self.m.NewBoolVar(f"on[{name}]")
        return [self.assumption_lits[name]]

    def minimise(self, term: cp_model.LinearExprT, coef: int) -> None:
        self.objective.append(term)
        self.coefs.append(coef)


def build(problem: Problem, ev: Evaluator, unit_hosts: np.ndarray, free: list[int],
          cands: dict[int, list[int]], *, explain: bool = False) -> SubModel:
    """Build the model of ``free`` units over their ``cands``; the others stay in ``unit_hosts``.

    With ``explain``, each mandatory rule, each host's capacity and each budget is switched on
    by an assumption literal, so an infeasible model can name a sufficient set of culprits.
    One function per constraint family, in this order.
    """
    c = _Ctx(p=problem, ev=ev, m=cp_model.CpModel(), unit_hosts=unit_hosts, free=free,
             cands=cands, explain=explain, free_set=set(free))
    _fixed_part(c)
    _assignment(c)
    _hosts(c)  # capacity and balance, per host
    _migration_cost(c)
    _budgets(c)
    _anti_affinity(c)
    _soft_affinity(c)
    _host_preferences(c)
    if c.objective:
        c.m.Minimize(cp_model.LinearExpr.WeightedSum(c.objective, c.coefs))
    sub = SubModel(model=c.m, x=c.x, free=list(free), cands=cands)
    if explain:
        sub.assumptions = {lit.Index(): name for name, lit in c.assumption_lits.items()}
        c.m.AddAssumptions(list(c.assumption_lits.values()))
    return sub


def _fixed_part(c: _Ctx) -> None:
    """Loads of the units that stay, VMs they brought to each host, budget they use."""
    p, ev = c.p, c.ev
    fixed_mask = np.ones(len(p.units), dtype=bool)
    fixed_mask[c.free] = False
    hosts = c.unit_hosts[fixed_mask]
    c.f_cpu = np.bincount(hosts, weights=ev.u_cpu[fixed_mask], minlength=p.n_hosts
                          ).astype(np.int64)
    c.f_memd = np.bincount(hosts, weights=ev.u_memd[fixed_mask], minlength=p.n_hosts
                           ).astype(np.int64)
    c.f_mem = np.bincount(hosts, weights=ev.u_mem[fixed_mask], minlength=p.n_hosts
                          ).astype(np.int64)
    vm_fixed = fixed_mask[ev.vm_unit]
    vm_hosts = c.unit_hosts[ev.vm_unit]
    moved_fixed = vm_fixed & (vm_hosts != ev.start)
    c.f_received = np.bincount(vm_hosts[moved_fixed], minlength=p.n_hosts)
    c.f_migrations = int(moved_fixed.sum())
    c.f_moved_mem = int(ev.vm_mem[moved_fixed].sum())


def _assignment(c: _Ctx) -> None:
    """x[u, h]: exactly one host per free unit, hinted at the incumbent; what each move costs."""
    m, ev, start = c.m, c.ev, c.ev.start
    for u in c.free:
        members = c.p.units[u].members
        lits = []
        for h in c.cands[u]:
            b = m.NewBoolVar(f"x[{u},{h}]")
            c.x[u, h] = b
            lits.append(b)
            c.by_host.setdefault(h, []).append(u)
            cnt = mem = cost = 0
            for v in members:
                if start[v] != h:
                    cnt += 1
                    mem += int(ev.vm_mem[v])
                    cost += int(ev.move_cost[v])
            c.moves_of[u, h] = (cnt, mem, cost)
        m.AddExactlyOne(lits)
        for h in c.cands[u]:
            m.AddHint(c.x[u, h], int(h == int(c.unit_hosts[u])))


def _hosts(c: _Ctx) -> None:
    p, ev = c.p, c.ev
    s_cpu = np.bincount(ev.start, weights=ev.vm_cpu, minlength=p.n_hosts)
    s_mem = np.bincount(ev.start, weights=ev.vm_mem, minlength=p.n_hosts)
    hinted_cpu = c.f_cpu.copy()
    hinted_memd = c.f_memd.copy()
    for u in c.free:
        h = int(c.unit_hosts[u])
        hinted_cpu[h] += ev.u_cpu[u]
        hinted_memd[h] += ev.u_memd[u]
    for h in sorted(c.by_host):
        units_h = c.by_host[h]
        xs = [c.x[u, h] for u in units_h]
        cpu_expr = cp_model.LinearExpr.WeightedSum(xs, [int(ev.u_cpu[u]) for u in units_h])
        memd_expr = cp_model.LinearExpr.WeightedSum(xs, [int(ev.u_memd[u]) for u in units_h])
        mem_expr = cp_model.LinearExpr.WeightedSum(xs, [int(ev.u_mem[u]) for u in units_h])
        over_at_start = s_mem[h] > p.mem_limit[h] or s_cpu[h] > p.cpu_limit[h]
        _capacity(c, h, units_h, cpu_expr, mem_expr, over_at_start)
        _balance(c, h, units_h, cpu_expr, memd_expr, hinted_cpu[h], hinted_memd[h])


def _capacity(c: _Ctx, h: int, units_h: list[int], cpu_expr: cp_model.LinearExprT,
              mem_expr: cp_model.LinearExprT, over_at_start: bool) -> None:
    """Capacity on a host, binding once it receives a VM (a host that starts over a limit
    may stay so while it receives nothing)."""
    p, m = c.p, c.m
    incoming = [c.x[u, h] for u in units_h if c.moves_of[u, h][0] > 0]
    enforce: list[cp_model.IntVar] = c.switch(f"capacity of host {p.snapshot.hosts[h].name}")
    if not incoming and c.f_received[h] == 0:
        return
    if over_at_start and c.f_received[h] == 0:
        r = m.NewBoolVar(f"recv[{h}]")
        for lit in incoming:
            m.AddImplication(lit, r)
        enforce = enforce + [r]
    c1 = m.Add(mem_expr + int(c.f_mem[h]) <= p.mem_limit[h])
    c2 = m.Add(cpu_expr + int(c.f_cpu[h]) <= p.cpu_limit[h])
    if enforce:
        c1.OnlyEnforceIf(enforce)
        c2.OnlyEnforceIf(enforce)


def _balance(c: _Ctx, h: int, units_h: list[int], cpu_expr: cp_model.LinearExprT,
             memd_expr: cp_model.LinearExprT, hinted_cpu: int, hinted_memd: int) -> None:
    """The balance term of a host: per dimension, tangents of the squared deviation."""
    p, ev, m = c.p, c.ev, c.m
    if not ev.balanced_mask[h] or p.balance_weights == (0, 0):
        return
    w_cpu, w_mem = p.balance_weights
    for dim, expr, fixed, target, tan, hinted, weight in (
        ("c", cpu_expr, c.f_cpu[h], ev.target_cpu[h], ev.tan_cpu, hinted_cpu, w_cpu),
        ("m", memd_expr, c.f_memd[h], ev.target_mem[h], ev.tan_mem, hinted_memd, w_mem),
    ):
        if weight == 0:
            continue
        lo = int(fixed - target)
        hi = lo + sum(int(v) for v in (ev.u_cpu if dim == "c" else ev.u_memd)[units_h])
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
        c.minimise(y, weight)


def _migration_cost(c: _Ctx) -> None:
    for (u, h), (_cnt, _mem, cost) in c.moves_of.items():
        if cost:
            c.minimise(c.x[u, h], cost)


def _budgets(c: _Ctx) -> None:
    """Migrations counted, configured memory moved."""
    p = c.p
    for limit, used, field_ix, name in (
        (p.max_migrations, c.f_migrations, 0, "budget max_migrations"),
        (p.max_moved_mem, c.f_moved_mem, 1, "budget max_moved_mem_gb"),
    ):
        terms = [(c.x[k], v[field_ix]) for k, v in c.moves_of.items() if v[field_ix]]
        if limit is None or not terms:
            continue
        ct = c.m.Add(cp_model.LinearExpr.WeightedSum([t for t, _ in terms],
                                                     [w for _, w in terms]) <= limit - used)
        if c.explain:
            ct.OnlyEnforceIf(c.switch(name))


def _anti_affinity(c: _Ctx) -> None:
    """Mandatory anti-affinity (at most one per host) and the should kind (penalised)."""
    m = c.m
    for g in c.p.apart:
        members = [u for u in g.units if u in c.free_set]
        if not members:
            continue
        fixed_on: dict[int, int] = {}
        for u in g.units:
            if u not in c.free_set:
                h = int(c.unit_hosts[u])
                fixed_on[h] = fixed_on.get(h, 0) + 1
        hosts = sorted({h for u in members for h in c.cands[u]})
        for h in hosts:
            lits = [c.x[u, h] for u in members if (u, h) in c.x]
            if len(lits) + fixed_on.get(h, 0) <= 1:
                continue
            if g.weight is None:
                ct = m.Add(sum(lits) + fixed_on.get(h, 0) <= 1)
                if c.explain:
                    ct.OnlyEnforceIf(c.switch(f"rule {g.rule}"))
            else:
                z = m.NewIntVar(0, len(lits), f"apart[{g.rule},{h}]")
                m.Add(z >= sum(lits) + fixed_on.get(h, 0) - 1)
                c.minimise(z, g.weight)


def _soft_affinity(c: _Ctx) -> None:
    """Should-affinity: a penalty per extra host used (mandatory ones are units)."""
    m = c.m
    for g in c.p.together:
        members = [u for u in g.units if u in c.free_set]
        if not members or g.weight is None:
            continue
        fixed_used = {int(c.unit_hosts[u]) for u in g.units if u not in c.free_set}
        hosts = sorted({h for u in members for h in c.cands[u]} - fixed_used)
        for h in hosts:
            used = m.NewBoolVar(f"used[{g.rule},{h}]")
            for u in members:
                if (u, h) in c.x:
                    m.AddImplication(c.x[u, h], used)
            c.minimise(used, g.weight)


def _host_preferences(c: _Ctx) -> None:
    """Should VM-host rules: a penalty for each unit off its preferred hosts."""
    for pref in c.p.prefer:
        for u in pref.units:
            if u not in c.free_set:
                continue
            for h in c.cands[u]:
                if h not in pref.hosts:
                    c.minimise(c.x[u, h], pref.weight)


def read_solution(sub: SubModel, solver: cp_model.CpSolver, unit_hosts: np.ndarray) -> np.ndarray:
    out = unit_hosts.copy()
    for u in sub.free:
        for h in sub.cands[u]:
            if solver.BooleanValue(sub.x[u, h]):
                out[u] = h
                break
    return out
