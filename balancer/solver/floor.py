"""A certified floor under the judged imbalance: no plan can go below it.

Plans are judged by ``cpu std + mem std`` of active-host utilisation (``util_stats``). The
fluid bound (``bound.py``) bounds the engine's objective and lets every VM split; where a few
VMs are large next to a host (``generate_skewed``: 60 cores of demand on 96-core hosts), it
says nothing. This module gives a lower bound on each standard deviation of *any* placement
that keeps the hard constraints, with the largest units kept whole:

* per dimension (CPU demand, memory demand), the ``big`` movable units with the largest demand
  stay indivisible; every other unit's demand, pinned ones included, is a fluid that may be
  poured in any shares onto the active hosts (no candidate lists, capacity or rules);
* a big unit may sit on an active host of any capacity class where it fits alone under the
  receiving limits (``cpu_limit``, ``mem_limit``), or of its start host's class (a unit that
  stays needs no room); big units may share a host; a class holds at most as many occupied
  hosts as it has hosts.

Every real placement is a point of this relaxation, so its minimum is a floor. Hosts of one
class are interchangeable once the small load is fluid, so the relaxation is solved exactly by
enumerating the big units' placements up to that symmetry (each set partition of the big
units into hosts, each host given a class: 12,351 placements for 6 units and 3 classes). For
one placement, with ``l_h`` the big units' utilisation on host ``h``, ``k_h`` its capacity and
``T`` the dimension's total demand, the smallest ``sum_h (u_h - mean(u))^2`` is

    min over u >= l, c of  sum_h (u_h - c)^2   subject to  sum_h k_h u_h = T,

a convex problem whose Lagrangian dual is evaluated exactly: for a multiplier ``nu`` the
minimum over ``u`` is per host (``u_h = max(l_h, c + nu k_h)``) and the minimum over ``c`` of
the resulting convex piecewise quadratic is found interval by interval between its
breakpoints. By weak duality every ``nu`` gives a valid lower bound; the best ``nu`` is found
by golden-section search on the concave dual. The standard deviation's floor is
``sqrt(min / n)``, rounded down with a relative margin of 1e-6 for floating-point error;
``cpu std + mem std >= cpu floor + mem floor``. Budgets are not taken into account (a floor
for plans of any size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from balancer.model.problem import Problem
from balancer.solver.objective import Evaluator

BIG_UNITS = 6  # indivisible units per dimension (placements grow like the Touchard numbers)
MARGIN = 1e-6


@dataclass(frozen=True)
class Floor:
    """Lower bounds on ``cpu_std``, ``mem_std`` and their sum for every feasible placement."""

    cpu_std: float
    mem_std: float
    placements: int  # big-unit placements enumerated (both dimensions)

    @property
    def imbalance(self) -> float:
        return self.cpu_std + self.mem_std


def imbalance_floor(problem: Problem, ev: Evaluator | None = None, big: int = BIG_UNITS,
                    ) -> Floor:
    """The certified floor of ``cpu std + mem std`` (see the module doc)."""
    ev = ev or Evaluator(problem)
    out = []
    count = 0
    for dem, cap in ((ev.u_cpu, ev.cpu_cap), (ev.u_memd, ev.mem_cap)):
        value, n = _dimension_floor(problem, ev, dem.astype(float), cap.astype(float), big)
        out.append(value)
        count += n
    return Floor(cpu_std=out[0], mem_std=out[1], placements=count)


def _dimension_floor(problem: Problem, ev: Evaluator, dem: np.ndarray, cap: np.ndarray,
                     big: int) -> tuple[float, int]:
    snap = problem.snapshot
    active = np.array([h.active for h in snap.hosts], dtype=bool)
    n = int(active.sum())
    if n == 0:
        return 0.0, 0
    # demand that ends on active hosts in every plan: all but pinned units elsewhere
    total = 0.0
    movable = []
    for u, unit in enumerate(problem.units):
        if unit.pinned:
            if active[unit.candidates[0]]:
                total += dem[u]
        else:
            total += dem[u]
            movable.append(u)
    mov = np.array(movable, dtype=np.int64)
    order = mov[np.lexsort((mov, -dem[mov]))] if len(mov) else mov
    bigs = [int(u) for u in order[:big] if dem[u] > 0]
    # capacity classes of active hosts: (capacity in this dimension, receiving limits)
    keys = sorted({(cap[h], problem.cpu_limit[h], problem.mem_limit[h])
                   for h in np.nonzero(active)[0]})
    cls_of = {key: i for i, key in enumerate(keys)}
    host_cls = {int(h): cls_of[(cap[h], problem.cpu_limit[h], problem.mem_limit[h])]
                for h in np.nonzero(active)[0]}
    n_cls = np.bincount(list(host_cls.values()), minlength=len(keys))
    kap = np.array([k[0] for k in keys], dtype=float)
    scale = float(kap.max())
    kap_n = kap / scale
    t_n = total / scale
    # classes each big unit may sit on
    allowed = []
    for u in bigs:
        home = int(ev.unit_home[u])
        ok = set()
        for i, (_c, cpu_lim, mem_lim) in enumerate(keys):
            if ev.u_cpu[u] <= cpu_lim and ev.u_mem[u] <= mem_lim:
                ok.add(i)
        if home >= 0 and home in host_cls:
            ok.add(host_cls[home])
        allowed.append(ok)
    if any(not a for a in allowed):  # a big unit fits nowhere active: no plan; no floor
        return 0.0, 0
    # enumerate placements up to symmetry: blocks (hosts) in order of creation, each with
    # a class; a unit joins an existing block of a class it may use or opens a new one
    configs: list[tuple[list[int], list[float]]] = []  # (block classes, block loads)

    def rec(i: int, blocks_cls: list[int], blocks_load: list[float], used: list[int]) -> None:
        if i == len(bigs):
            configs.append((list(blocks_cls), list(blocks_load)))
            return
        d = dem[bigs[i]] / scale
        for b in range(len(blocks_cls)):
            if blocks_cls[b] in allowed[i]:
                blocks_load[b] += d
                rec(i + 1, blocks_cls, blocks_load, used)
                blocks_load[b] -= d
        for c in sorted(allowed[i]):
            if used[c] < n_cls[c]:
                used[c] += 1
                blocks_cls.append(c)
                blocks_load.append(d)
                rec(i + 1, blocks_cls, blocks_load, used)
                blocks_cls.pop()
                blocks_load.pop()
                used[c] -= 1

    rec(0, [], [], [0] * len(keys))
    # groups per placement: its blocks (weight 1), then each class's free hosts
    n_cfg = len(configs)
    g = len(bigs) + len(keys)
    w = np.zeros((n_cfg, g))
    kk = np.ones((n_cfg, g))
    ll = np.zeros((n_cfg, g))
    for j, (bc, bl) in enumerate(configs):
        m = len(bc)
        w[j, :m] = 1.0
        kk[j, :m] = kap_n[bc]
        ll[j, :m] = np.array(bl) / kap_n[bc]
        free = n_cls - np.bincount(bc, minlength=len(keys))
        w[j, len(bigs):] = free
        kk[j, len(bigs):] = kap_n
    best = _dual_max(w, kk, ll, t_n)
    value = float(best.min()) if n_cfg else 0.0
    value = max(0.0, value * (1 - MARGIN) - 1e-12)
    return float(np.sqrt(value / n)) * (1 - MARGIN), n_cfg


def _dual(nu: np.ndarray, w: np.ndarray, k: np.ndarray, low: np.ndarray, t: float) -> np.ndarray:
    """The Lagrangian dual at ``nu`` (one per placement, rows of w/k/low), evaluated exactly:
    min over c of sum_g w_g phi_g(c) + 2 nu t, phi_g(c) = (l_g - c)^2 - 2 nu k_g l_g below
    the breakpoint b_g = l_g - nu k_g and -nu^2 k_g^2 - 2 nu k_g c above it."""
    nu_c = nu[:, None]
    b = low - nu_c * k
    order = np.argsort(b, axis=1, kind="stable")
    bs = np.take_along_axis(b, order, 1)
    ws = np.take_along_axis(w, order, 1)
    ks = np.take_along_axis(k, order, 1)
    ls = np.take_along_axis(low, order, 1)
    n_cfg, g = w.shape
    zero = np.zeros((n_cfg, 1))
    # prefix sums over groups at or below c (the first i sorted ones) for i = 0..g
    p_wk = np.concatenate([zero, np.cumsum(ws * ks, 1)], 1)
    p_wk2 = np.concatenate([zero, np.cumsum(ws * ks * ks, 1)], 1)
    # suffix sums over groups above c
    def suffix(a: np.ndarray) -> np.ndarray:
        return np.concatenate([np.cumsum(a[:, ::-1], 1)[:, ::-1], zero], 1)
    s_w = suffix(ws)
    s_wl = suffix(ws * ls)
    s_wq = suffix(ws * (ls * ls - 2 * nu_c * ks * ls))
    a = s_w
    bb = -2 * s_wl - 2 * nu_c * p_wk
    cc = s_wq - nu_c * nu_c * p_wk2
    lo = np.concatenate([np.full((n_cfg, 1), -np.inf), bs], 1)
    hi = np.concatenate([bs, np.full((n_cfg, 1), np.inf)], 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        c_star = np.where(a > 0, -bb / (2 * a), np.where(bb >= 0, lo, hi))
    c_star = np.clip(c_star, lo, hi)
    finite = np.isfinite(c_star)
    cs = np.where(finite, c_star, 0.0)
    val = np.where(finite, a * cs * cs + bb * cs + cc, -np.inf)
    # an interval with a == 0 and an unbounded side where the line falls: -inf
    unbounded = (a <= 0) & (((bb > 0) & ~np.isfinite(lo)) | ((bb < 0) & ~np.isfinite(hi)))
    val = np.where(unbounded, -np.inf, val)
    return val.min(axis=1) + 2 * nu * t


def _dual_max(w: np.ndarray, k: np.ndarray, low: np.ndarray, t: float,
              iters: int = 40) -> np.ndarray:
    """max over nu of the dual, per placement: a grid, then golden-section search around its
    best point (the dual is concave; any nu gives a valid bound). A positive nu gives minus
    infinity (the last piece falls without end as c grows), so the grid is nu <= 0."""
    n_cfg = w.shape[0]
    if n_cfg == 0:
        return np.zeros(0)
    grid = np.concatenate([-np.geomspace(1e-4, 16, 40)[::-1], [0.0]])
    vals = np.stack([_dual(np.full(n_cfg, x), w, k, low, t) for x in grid], 1)
    i = np.argmax(vals, 1)
    best = vals[np.arange(n_cfg), i]
    lo = grid[np.maximum(i - 1, 0)]
    hi = grid[np.minimum(i + 1, len(grid) - 1)]
    r = (np.sqrt(5) - 1) / 2
    x1 = hi - r * (hi - lo)
    x2 = lo + r * (hi - lo)
    f1 = _dual(x1, w, k, low, t)
    f2 = _dual(x2, w, k, low, t)
    for _ in range(iters):
        left = f1 > f2
        hi = np.where(left, x2, hi)
        lo = np.where(left, lo, x1)
        x2n = np.where(left, x1, lo + r * (hi - lo))
        x1n = np.where(left, hi - r * (hi - lo), x2)
        f1n = np.where(left, _dual(x1n, w, k, low, t), f2)
        f2n = np.where(left, f1, _dual(x2n, w, k, low, t))
        x1, x2, f1, f2 = x1n, x2n, f1n, f2n
        best = np.maximum(best, np.maximum(f1, f2))
    return best


def budget_floor(problem: Problem, ev: Evaluator | None = None,
                 max_migrations: int | None = None, max_moved_mem: int | None = None,
                 rounds: int = 30) -> Floor:
    """A certified floor of ``cpu std + mem std`` for plans within a budget (at most
    ``max_migrations`` VMs moved, at most ``max_moved_mem`` MiB): the fluid relaxation of
    ``bound.py`` on the judged measure, an LP per dimension.

    A unit may leave its start host in part (``s_u`` in [0, 1], counted in the budgets as
    ``s_u`` x its members and x its memory; units whose start host is not a candidate leave
    whole); what leaves is poured in any shares onto the active hosts; pinned units stay.
    Minimised: ``sum_h (u_h - c)^2`` over the shares, the pouring and ``c``, with the square
    replaced by tangent lines added by cutting planes (each at the LP point, per host, up to
    ``rounds`` rounds; any set of tangents under-estimates the square, so every round's
    optimum is a valid bound). GLOP solves it; the result is rounded down by a relative 1e-5.
    Every plan within the budget is a point of this LP, so ``sqrt(optimum / n)`` is a floor
    of its standard deviation in that dimension. Whole VMs are not kept whole here: with a
    budget the shares, not the VM sizes, are what binds."""
    from ortools.linear_solver import pywraplp

    ev = ev or Evaluator(problem)
    snap = problem.snapshot
    active = np.array([h.active for h in snap.hosts], dtype=bool)
    n = int(active.sum())
    if n == 0:
        return Floor(0.0, 0.0, 0)
    n_members = np.bincount(ev.vm_unit, minlength=len(problem.units))
    out = []
    for dem, cap in ((ev.u_cpu.astype(float), ev.cpu_cap.astype(float)),
                     (ev.u_memd.astype(float), ev.mem_cap.astype(float))):
        solver = pywraplp.Solver.CreateSolver("GLOP")
        if solver is None:  # pragma: no cover - GLOP ships with OR-Tools
            out.append(0.0)
            continue
        inf = solver.infinity()
        base = np.zeros(len(active))
        pool_const = 0.0
        used_k = used_g = 0.0
        s_vars: list[tuple[int, int, object]] = []
        for u, unit in enumerate(problem.units):
            home = int(ev.unit_home[u])
            if unit.pinned:
                base[unit.candidates[0]] += dem[u]
                continue
            if home < 0:  # members started apart: poured whole, at the least budget
                pool_const += dem[u]
                used_k += min(sum(1 for v in unit.members if ev.start[v] != h)
                               for h in unit.candidates)
                used_g += min(sum(int(ev.vm_mem[v]) for v in unit.members if ev.start[v] != h)
                              for h in unit.candidates)
                continue
            base[home] += dem[u]
            must = not ev.cand_mask[u, home] or not active[home]
            s_vars.append((u, home, solver.NumVar(1.0 if must else 0.0, 1.0, f"s{u}")))
        pool = solver.Constraint(pool_const, pool_const)
        c = solver.NumVar(-inf, inf, "c")
        e_rows = {}
        e_vars = {}
        y_vars = {}
        obj = solver.Objective()
        obj.SetMinimization()
        for h in np.nonzero(active)[0].tolist():
            f = solver.NumVar(0.0, inf, f"f{h}")
            pool.SetCoefficient(f, 1.0)  # poured = what leaves (+ units poured whole)
            e = solver.NumVar(-inf, inf, f"e{h}")
            # e = (base - out + f) / cap - c, written e - f / cap + c + out / cap = base / cap
            row = solver.Constraint(base[h] / cap[h], base[h] / cap[h])
            row.SetCoefficient(e, 1.0)
            row.SetCoefficient(f, -1.0 / cap[h])
            row.SetCoefficient(c, 1.0)
            e_rows[h], e_vars[h] = row, e
            y_vars[h] = solver.NumVar(0.0, inf, f"y{h}")
            obj.SetCoefficient(y_vars[h], 1.0)
        for u, home, s in s_vars:
            pool.SetCoefficient(s, -dem[u])
            if home in e_rows:
                e_rows[home].SetCoefficient(s, dem[u] / cap[home])
        if max_migrations is not None:
            row = solver.Constraint(-inf, float(max_migrations) - used_k)
            for u, _h, s in s_vars:
                row.SetCoefficient(s, float(n_members[u]))
        if max_moved_mem is not None:
            row = solver.Constraint(-inf, float(max_moved_mem) - used_g)
            for u, _h, s in s_vars:
                row.SetCoefficient(s, float(ev.u_mem[u]))

        for h in e_vars:
            for p in (-0.4, -0.2, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2, 0.4):
                _tangent(solver, y_vars[h], e_vars[h], p)
        value = 0.0
        for _ in range(max(1, rounds)):
            if solver.Solve() != pywraplp.Solver.OPTIMAL:
                value = 0.0  # no bound from a failed solve
                break
            value = obj.Value()
            point = {h: (e.solution_value(), y_vars[h].solution_value())
                     for h, e in e_vars.items()}
            new = 0
            for h, (e_val, y_val) in point.items():
                if e_val * e_val > y_val + 1e-9 * max(1.0, abs(y_val)):
                    _tangent(solver, y_vars[h], e_vars[h], e_val)
                    new += 1
            if new == 0:
                break
        value = max(0.0, value * (1 - 1e-5))
        out.append(float(np.sqrt(value / n)))
    return Floor(cpu_std=out[0], mem_std=out[1], placements=0)


def _tangent(solver: object, y: object, e: object, p: float) -> None:
    """y >= 2 p e - p^2: the tangent of e^2 at p (an LP row)."""
    row = solver.Constraint(-p * p, solver.infinity())  # type: ignore[attr-defined]
    row.SetCoefficient(y, 1.0)
    row.SetCoefficient(e, -2.0 * p)
