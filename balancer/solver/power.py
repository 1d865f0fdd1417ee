"""Power mode of the placement model: which hosts stay on is a decision of the CP-SAT model.

Description
    Consolidation as optimisation. Over a set of hosts (the whole cluster or a neighbourhood of
    it) the model decides, at once, which hosts are on and where the movable VMs run, so that
    the power drawn plus the price of the migrations is least:

    * ``on[h]`` (bool) per host; ``x[u, h]`` (bool) per free unit and candidate host, exactly
      one per unit; a unit may only sit on a host that is on (``x[u, h] <= on[h]``).
    * Power of a host (centiwatts, integer): ``P[h] >= A_k * on[h] + B_k * load[h]`` for each
      segment ``k`` of the lower convex hull of its SPECpower points (watts at 0, 10, ..., 100 %
      CPU), i.e. idle watts when on plus the piecewise-linear load curve; exact where the table
      is convex, the hull below it elsewhere. A host that is off draws 0.
    * Capacity at a target utilisation: the forecast CPU load of a host above
      ``target_util x capacity`` is allowed but priced (``over_w_per_core`` per core over, per
      host) so that a forecast that cannot fit still yields a plan; the real capacity is a hard
      limit; configured memory is a hard limit (``Problem.mem_limit``) on hosts that are on.
    * Migrations: each moved VM costs ``migration_w`` watts in the objective (the price of a
      migration, expressed as the power it must save to be worth it), and the problem's budget
      (``max_migrations``) holds.
    * Switching: at most ``max_switch`` hosts change state (on -> off or off -> on) per call;
      a host holding a pinned VM stays on; mandatory anti-affinity holds.

    The greedy/DPM rule of the caller is passed as a hint (``hint_on``, ``hint_hosts``) and is
    also the fallback: if CP-SAT finds nothing better within its deterministic time, the hint is
    returned when it is feasible (status ``hint``), else the start (status ``unchanged``).
Requirements
    A ``Problem`` (units, candidates, limits) built by the policies from a snapshot whose hosts
    that may be switched on are listed as ACTIVE, the per-host ``HostPower`` and which hosts are
    on now. VM CPU demand in the snapshot is the (forecast) demand to place.
Limitations
    Non-convex parts of a power table are under-estimated by its hull (a few watts on SPECpower
    tables). Should-rules and the balance term are not part of the power objective. Boot time
    is not modelled here (the caller wakes hosts before they are needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ortools.sat.python import cp_model

from balancer.model.problem import Problem

CW = 100  # centiwatts per watt


@dataclass(frozen=True)
class HostPower:
    """Watts at 0, 10, ..., 100 % CPU (SPECpower style, 11 points); or idle/peak (linear)."""

    table_w: tuple[float, ...]

    @classmethod
    def linear(cls, idle_w: float, peak_w: float) -> HostPower:
        return cls(tuple(idle_w + (peak_w - idle_w) * i / 10 for i in range(11)))

    @property
    def idle_w(self) -> float:
        return float(self.table_w[0])

    def watts(self, util: float) -> float:
        return float(np.interp(min(max(util, 0.0), 1.0), np.linspace(0, 1, len(self.table_w)),
                               self.table_w))

    def hull(self, capacity: int) -> list[tuple[int, int, int]]:
        """Lower convex hull segments as integer cuts ``D * P >= A * on + B * load``
        (P in centiwatts, load in millicores): list of (A, B, D)."""
        n = len(self.table_w) - 1
        pts = [(capacity * i / n, self.table_w[i] * CW) for i in range(n + 1)]
        hull: list[tuple[float, float]] = []
        for p in pts:  # monotone chain, lower hull
            while len(hull) >= 2:
                (x1, y1), (x2, y2) = hull[-2], hull[-1]
                if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                    hull.pop()
                else:
                    break
            hull.append(p)
        cuts = []
        for (x1, y1), (x2, y2) in zip(hull, hull[1:], strict=False):
            d = max(1, int(round(x2 - x1)))
            b = int(round(y2 - y1))
            a = int(math.floor(y1 * d - b * x1))
            cuts.append((a, b, d))
        return cuts


@dataclass(frozen=True)
class PowerOptions:
    target_util: float = 0.8  # forecast CPU load a host on should carry, share of capacity
    migration_w: float = 10.0  # watts a migration must save to be worth it
    over_w_per_core: float = 400.0  # price of forecast load above target, watts per core
    max_switch: int = 4  # hosts switched on or off per call
    max_dtime: float = 0.5  # CP-SAT deterministic time (deterministic stop)
    # no answer within max_dtime: return the hint if the model accepts it (status "hint")
    hint_fallback: bool = False
    time_limit: float = 30.0  # safety net only
    seed: int = 0

    def __post_init__(self) -> None:
        from balancer.errors import InputError

        if not 0 < self.target_util <= 1:
            raise InputError(f"power: field 'target_util' must be in (0, 1], "
                             f"got {self.target_util}")
        for name in ("migration_w", "over_w_per_core", "max_dtime", "time_limit"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise InputError(f"power: field '{name}' must be >= 0, got {v}")
        if self.max_switch < 0:
            raise InputError(f"power: field 'max_switch' must be >= 0, got {self.max_switch}")


@dataclass
class PowerResult:
    status: str  # optimal | feasible | hint | unchanged
    on: list[bool]  # per host of the problem
    unit_hosts: list[int]  # per unit
    moved_vms: list[int]
    switched_on: list[int]
    switched_off: list[int]
    watts_before: float  # model power of the start (hosts on now, VMs where they are)
    watts_after: float
    notes: list[str] = field(default_factory=list)


def model_watts(problem: Problem, power: list[HostPower], cpu: np.ndarray, on: list[bool],
                vm_hosts: list[int]) -> float:
    """Power (W) of hosts ``on`` with VM CPU ``cpu`` placed on ``vm_hosts`` (table, linear
    interpolation: what the hosts really draw)."""
    caps = [h.cpu_capacity for h in problem.snapshot.hosts]
    load = np.bincount(np.asarray(vm_hosts, dtype=np.int64), weights=cpu,
                       minlength=problem.n_hosts)
    return float(sum(power[h].watts(load[h] / caps[h]) for h in range(problem.n_hosts)
                     if on[h]))


def solve(problem: Problem, power: list[HostPower], was_on: list[bool],
          options: PowerOptions | None = None, *, hosts: list[int] | None = None,
          hint_on: list[bool] | None = None, hint_hosts: list[int] | None = None,
          locked: set[int] | None = None, vm_var: list[float] | None = None,
          z: float = 0.0, movable_from: set[int] | None = None) -> PowerResult:
    """Decide on/off and placement over ``hosts`` (default: every host); units on other hosts
    stay where they are. ``hint_*`` (per host / per unit) is the greedy rule's answer; hosts in
    ``locked`` keep their power state (e.g. in maintenance: powered, evacuated, not switched).

    ``movable_from`` (host indices): only units on these hosts may move (the others stay,
    their load counted); the model then stays small on a large cluster.

    ``vm_var`` (per VM, millicores squared) and ``z`` add a margin per host to the load the
    target applies to: ``z x sqrt(sum of the variances of its VMs)``, linearised at the hint's
    placement (``sqrt(V) <= (V / s + s) / 2`` for any ``s > 0``, equal at ``V = s^2``): exact
    for the hint, an over-estimate elsewhere, so the model never packs a host riskier than
    the margin allows."""
    o = options or PowerOptions()
    p = problem
    snap = p.snapshot
    n_h = p.n_hosts
    caps = [h.cpu_capacity for h in snap.hosts]
    vm_cpu = np.array([v.cpu_demand for v in snap.vms], dtype=np.int64)
    vm_mem = np.array([v.mem for v in snap.vms], dtype=np.int64)
    start_units = [p.start[u.members[0]] for u in p.units]
    scope = sorted(set(range(n_h) if hosts is None else hosts))
    in_scope = set(scope)
    u_cpu = [int(vm_cpu[list(u.members)].sum()) for u in p.units]
    u_mem = [int(vm_mem[list(u.members)].sum()) for u in p.units]
    free = [i for i, u in enumerate(p.units) if start_units[i] in in_scope
            and (movable_from is None or start_units[i] in movable_from)
            and len(set(u.candidates) & in_scope) > 0
            and not (u.pinned and start_units[i] in u.candidates)]
    free_set = set(free)
    fixed_cpu = np.zeros(n_h, dtype=np.int64)
    fixed_mem = np.zeros(n_h, dtype=np.int64)
    for i in range(len(p.units)):
        if i not in free_set:
            fixed_cpu[start_units[i]] += u_cpu[i]
            fixed_mem[start_units[i]] += u_mem[i]
    m = cp_model.CpModel()
    on = {h: m.NewBoolVar(f"on[{h}]") for h in scope}
    x: dict[tuple[int, int], cp_model.IntVar] = {}
    for i in free:
        # the policies' candidates: a unit that must leave its host (evacuation, a rule) has
        # not its start host among them
        cands = [h for h in p.units[i].candidates if h in in_scope]
        for h in cands:
            x[i, h] = m.NewBoolVar(f"x[{i},{h}]")
            m.AddImplication(x[i, h], on[h])
        m.AddExactlyOne(x[i, h] for h in cands)
    by_host: dict[int, list[tuple[int, cp_model.IntVar]]] = {h: [] for h in scope}
    for (i, h), var in x.items():
        by_host[h].append((i, var))
    obj = []
    over_price = int(round(o.over_w_per_core * CW))  # per core = per 1000 millicores
    # the margin per host, linearised at the hint's placement (tangent point s[h])
    h_hosts0 = hint_hosts if hint_hosts is not None else start_units
    u_var = ([float(sum(vm_var[v] for v in u.members)) for u in p.units] if vm_var is not None
             and z > 0 else None)
    tangent: dict[int, float] = {}
    fixed_var = np.zeros(n_h)
    if u_var is not None:
        hint_var = np.zeros(n_h)
        for i in range(len(p.units)):
            if i not in free_set:
                fixed_var[start_units[i]] += u_var[i]
            hint_var[h_hosts0[i] if i in free_set else start_units[i]] += u_var[i]
        floor = math.sqrt(max([u_var[i] for i in free] + [1.0]))
        tangent = {h: max(math.sqrt(max(hint_var[h], 0.0)), floor) for h in scope}
    for h in scope:
        if fixed_cpu[h] > 0 or fixed_mem[h] > 0:
            m.Add(on[h] == 1)  # a host with VMs that stay cannot go off
        if locked and h in locked:
            m.Add(on[h] == int(bool(was_on[h])))
        cpu_terms = [u_cpu[i] * var for i, var in by_host[h]]
        mem_terms = [u_mem[i] * var for i, var in by_host[h]]
        load = m.NewIntVar(0, int(fixed_cpu[h] + sum(u_cpu[i] for i, _ in by_host[h])),
                           f"load[{h}]")
        m.Add(load == int(fixed_cpu[h]) + sum(cpu_terms))
        hard = max(int(p.cpu_limit[h]), int(fixed_cpu[h]), caps[h])
        m.Add(load <= hard)
        mem_lim = max(int(p.mem_limit[h]), int(fixed_mem[h]))
        if mem_terms:
            m.Add(int(fixed_mem[h]) + sum(mem_terms) <= mem_lim)
        if u_var is not None:
            sh = tangent[h]
            coef = z / (2.0 * sh)
            mc = [(int(round(coef * u_var[i])), var) for i, var in by_host[h]]
            margin = [c * var for c, var in mc]
            const = int(math.ceil(coef * fixed_var[h] + z * sh / 2.0))
            over = m.NewIntVar(0, max(hard, 1) + const + sum(c for c, _ in mc), f"over[{h}]")
            m.Add(over >= load + sum(margin) + const * on[h] - int(o.target_util * caps[h]))
        else:
            over = m.NewIntVar(0, max(hard, 1), f"over[{h}]")
            m.Add(over >= load - int(o.target_util * caps[h]))
        top = int(math.ceil(max(power[h].table_w) * CW))
        pw = m.NewIntVar(0, top, f"P[{h}]")
        for a, b, d in power[h].hull(caps[h]):
            m.Add(d * pw >= a * on[h] + b * load)
        # objective in centiwatts x 1000: over is in millicores, its price is per core
        obj.append(1000 * pw)
        if over_price:
            obj.append(over_price * over)
    # migrations
    mig_price = int(round(o.migration_w * CW))
    moves = []
    for i in free:
        stay = x.get((i, start_units[i]), 0)  # 0: it must move
        n = len(p.units[i].members)
        moves.append((n, stay))
        if mig_price:
            obj.append(1000 * mig_price * n * (1 - stay))
    if p.max_migrations is not None:
        m.Add(sum(n * (1 - s) for n, s in moves) <= p.max_migrations)
    for g in p.apart:
        if g.weight is not None:
            continue
        for h in scope:
            lits = [x[i, h] for i in g.units if (i, h) in x]
            fixed_here = sum(1 for i in g.units if i not in free_set and start_units[i] == h)
            if lits:
                m.Add(sum(lits) <= 1 - fixed_here)
    switch = []
    for h in scope:
        switch.append(on[h] if not was_on[h] else 1 - on[h])
    m.Add(sum(switch) <= o.max_switch)
    m.Minimize(sum(obj))
    # hint: the greedy rule's answer, else the start
    h_on = hint_on if hint_on is not None else was_on
    h_hosts = hint_hosts if hint_hosts is not None else start_units
    for h in scope:
        m.AddHint(on[h], bool(h_on[h]))
    for (i, h), var in x.items():
        m.AddHint(var, h_hosts[i] == h)
    solver = cp_model.CpSolver()
    prm = solver.parameters
    prm.num_workers = 1
    prm.random_seed = o.seed
    prm.max_deterministic_time = o.max_dtime
    prm.max_time_in_seconds = o.time_limit
    status = solver.Solve(m)
    cpu_f = vm_cpu.astype(float)
    before = model_watts(p, power, cpu_f, list(was_on), list(p.start))
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        uh = list(start_units)
        for (i, h), var in x.items():
            if solver.Value(var):
                uh[i] = h
        new_on = list(was_on)
        for h in scope:
            new_on[h] = bool(solver.Value(on[h]))
        st = "optimal" if status == cp_model.OPTIMAL else "feasible"
    elif o.hint_fallback and (hint_on is not None or hint_hosts is not None) and \
            _accepts_hint(m, on, x, h_on, h_hosts, o):
        uh = list(start_units)
        for i in free:
            uh[i] = h_hosts[i]
        new_on = list(was_on)
        for h in scope:
            new_on[h] = bool(h_on[h])
        st = "hint"
    else:
        uh, new_on, st = list(start_units), list(was_on), "unchanged"
    vm_hosts = list(p.start)
    for i, u in enumerate(p.units):
        for v in u.members:
            vm_hosts[v] = uh[i]
    after = model_watts(p, power, cpu_f, new_on, vm_hosts)
    moved = [v for v in range(len(vm_hosts)) if vm_hosts[v] != p.start[v]]
    return PowerResult(
        status=st, on=new_on, unit_hosts=uh, moved_vms=moved,
        switched_on=[h for h in scope if new_on[h] and not was_on[h]],
        switched_off=[h for h in scope if was_on[h] and not new_on[h]],
        watts_before=before, watts_after=after)


def _accepts_hint(m: cp_model.CpModel, on: dict[int, Any], x: dict[tuple[int, int], Any],
                  h_on: list[bool], h_hosts: list[int], o: PowerOptions) -> bool:
    """Whether the model has a solution with every decision at its hinted value (a solve
    with them fixed: propagation alone decides it)."""
    for h, var in on.items():
        m.Add(var == int(bool(h_on[h])))
    for (i, h), var in x.items():
        m.Add(var == int(h_hosts[i] == h))
    m.ClearHints()
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = o.seed
    solver.parameters.max_deterministic_time = max(o.max_dtime, 1.0)
    return solver.Solve(m) in (cp_model.OPTIMAL, cp_model.FEASIBLE)


__all__ = ["HostPower", "PowerOptions", "PowerResult", "model_watts", "solve"]
