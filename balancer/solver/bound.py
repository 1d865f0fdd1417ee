"""An honest lower bound on the engine's objective: the fluid relaxation, solved as an LP.

Relax the placement problem in three ways, each of which can only lower the optimum:

* a unit may leave its start host in part: ``s_u`` in [0, 1] is the share that leaves, and
  costs ``s_u`` x its migration cost;
* what leaves goes to a common pool, and the pool's CPU and memory demand are poured
  independently, in any shares, onto hosts that may receive VMs (no candidate lists, no
  capacity limits, no anti-affinity);
* should-rule penalties count zero.

Every real placement is a point of this relaxation (``s_u`` = 1 for a moved unit, the pool
going where the moved units went) with the same balance term and migration cost, so the LP
optimum is at most the best plan's objective. Budgets stay (migrations counted per member,
MiB moved per unit); units whose start host is not a candidate must leave (``s_u`` = 1); units
whose members start on different hosts are poured whole, at their cheapest cost.

Each host's penalty is the maximum of its tangent lines (``objective.Tangents``); the LP adds
them by cutting planes (a few to start with, then at each round the tangent that the LP point
breaks most, per host and dimension), and a subset of the tangents under-estimates the penalty,
so every round's optimum is a valid bound. GLOP solves it; the value is rounded down with a
relative margin of 1e-6 for floating-point error.
"""

from __future__ import annotations

import numpy as np
from ortools.linear_solver import pywraplp

from balancer.model.problem import Problem
from balancer.solver.objective import BREAKPOINTS, Evaluator

SCALE_DOWN = 1e-6  # objective units per LP unit (keeps GLOP's numbers near 1)
START_TANGENTS = (0.01, 0.05, 0.2, 0.8)  # breakpoints added before the first solve


def fluid_bound(problem: Problem, ev: Evaluator, rounds: int = 6) -> int | None:
    """The fluid lower bound on the objective (see the module doc); None if GLOP fails."""
    n_h = problem.n_hosts
    solver = pywraplp.Solver.CreateSolver("GLOP")
    if solver is None:  # pragma: no cover - GLOP ships with OR-Tools
        return None
    w_cpu, w_mem = problem.balance_weights
    receiving = np.zeros(n_h, dtype=bool)
    receiving[list(problem.receiving)] = True
    home = ev.unit_home
    n_members = np.bincount(ev.vm_unit, minlength=len(problem.units))
    constant = 0.0
    base_cpu = np.zeros(n_h)
    base_mem = np.zeros(n_h)
    pool_cpu = pool_mem = 0.0
    s_vars: list[tuple[int, pywraplp.Variable]] = []
    for u, unit in enumerate(problem.units):
        if unit.pinned:
            h = unit.candidates[0]
            base_cpu[h] += ev.u_cpu[u]
            base_mem[h] += ev.u_memd[u]
            continue
        if home[u] < 0:  # members started apart: poured whole, at the cheapest cost
            pool_cpu += float(ev.u_cpu[u])
            pool_mem += float(ev.u_memd[u])
            constant += min(
                sum(int(ev.move_cost[v]) for v in unit.members if ev.start[v] != h)
                for h in unit.candidates)
            continue
        h = int(home[u])
        base_cpu[h] += ev.u_cpu[u]
        base_mem[h] += ev.u_memd[u]
        must = not ev.cand_mask[u, h]
        s_vars.append((u, solver.NumVar(1.0 if must else 0.0, 1.0, f"s{u}")))
    objective = solver.Objective()
    objective.SetMinimization()
    for u, s in s_vars:
        objective.SetCoefficient(s, float(ev.u_move_cost[u]) * SCALE_DOWN)
    # pools: what leaves equals what is poured
    pool_rows = []
    for pool in (pool_cpu, pool_mem):
        pool_rows.append(solver.Constraint(pool, pool))
    dims = ((ev.u_cpu, base_cpu, ev.target_cpu, ev.tan_cpu, w_cpu),
            (ev.u_memd, base_mem, ev.target_mem, ev.tan_mem, w_mem))
    e_vars: dict[tuple[int, int], pywraplp.Variable] = {}
    y_vars: dict[tuple[int, int], pywraplp.Variable] = {}
    e_rows: dict[tuple[int, int], pywraplp.Constraint] = {}
    for d, (_dem, base, target, _tan, weight) in enumerate(dims):
        for h in range(n_h):
            if not receiving[h] and not ev.balanced_mask[h]:
                continue
            if receiving[h]:
                f = solver.NumVar(0.0, solver.infinity(), f"f{d},{h}")
                pool_rows[d].SetCoefficient(f, 1.0)
            else:
                f = None
            if not ev.balanced_mask[h] or weight == 0:
                continue
            # e = base - sum(dem_u s_u over units starting here) + f - target
            e = solver.NumVar(-solver.infinity(), solver.infinity(), f"e{d},{h}")
            row = solver.Constraint(float(base[h] - target[h]), float(base[h] - target[h]))
            row.SetCoefficient(e, 1.0)
            if f is not None:
                row.SetCoefficient(f, -1.0)
            e_vars[d, h], e_rows[d, h] = e, row
            y = solver.NumVar(0.0, solver.infinity(), f"y{d},{h}")
            y_vars[d, h] = y
            objective.SetCoefficient(y, float(weight) * SCALE_DOWN)
    for u, s in s_vars:
        h = int(home[u])
        for d, (dem, _b, _t, _tan, _w) in enumerate(dims):
            pool_rows[d].SetCoefficient(s, -float(dem[u]))
            if (d, h) in e_rows:
                e_rows[d, h].SetCoefficient(s, float(dem[u]))
    k_max, g_max = problem.max_migrations, problem.max_moved_mem
    if k_max is not None:
        row = solver.Constraint(-solver.infinity(), float(k_max))
        for u, s in s_vars:
            row.SetCoefficient(s, float(n_members[u]))
    if g_max is not None:
        row = solver.Constraint(-solver.infinity(), float(g_max))
        for u, s in s_vars:
            row.SetCoefficient(s, float(ev.u_mem[u]))
    # tangents by cutting planes
    pts = [p for b in BREAKPOINTS for p in (b, -b)]
    start_k = [pts.index(p) for b in START_TANGENTS for p in (b, -b)]
    added: set[tuple[int, int, int]] = set()

    def cut(d: int, h: int, k: int) -> None:
        tan = dims[d][3]
        row = solver.Constraint(-float(tan.icpt[k]), solver.infinity())
        row.SetCoefficient(y_vars[d, h], 1.0)
        row.SetCoefficient(e_vars[d, h], -float(tan.slope[h, k]))
        added.add((d, h, k))

    for (d, h) in y_vars:
        for k in start_k:
            cut(d, h, k)
    value = None
    for _ in range(max(1, rounds)):
        if solver.Solve() != pywraplp.Solver.OPTIMAL:
            return None
        value = objective.Value() / SCALE_DOWN
        # read the whole point first: adding a row invalidates the solution
        point = {key: (e.solution_value(), y_vars[key].solution_value())
                 for key, e in e_vars.items()}
        new = 0
        for (d, h), (e_val, y_val) in point.items():
            tan = dims[d][3]
            vals = tan.slope[h] * e_val - tan.icpt
            k = int(np.argmax(vals))
            if (d, h, k) not in added and vals[k] > y_val * (1 + 1e-9) + 1:
                cut(d, h, k)
                new += 1
        if new == 0:
            break
    if value is None:
        return None
    return max(0, int(np.floor((value + constant) * (1 - 1e-6))))
