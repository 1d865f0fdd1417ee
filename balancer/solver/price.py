"""Budgets by price: the migration price as the Lagrange multiplier of a budget.

A budget (at most K migrations, at most G MiB moved) is a hard constraint on the plan's size;
its Lagrangian relaxation moves it into the objective as a price per unit of budget used. The
unbudgeted engine already has such a price: ``move_cost = price * (mem + fixed)`` per VM
moved. Raising the price moves less; so the engine searches the price at which the
unbudgeted optimum just fits the budget: it walks the price down from a high one, each step
warm-started from the plan before it, until a plan breaks the budget, then bisects in
log-price between the last two (``descend_budget``; ``search_budget`` is the older upward
bisection from the best plan within the budget). Every over-budget plan is also trimmed to
the budget. The same machinery, swept over a grid of prices from high to low (each point
warm-started from the one before), gives the whole balance / migration-cost curve (``frontier``).

Price shape
    Memory budget: ``price * (mem_mb + fixed_cost_mb)``, the shape the thresholds use.
    Count budget: ``price * (COUNT_FIXED x mean VM memory + mem_mb)`` so each move costs
    mostly the same, as one unit of a count budget does.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from balancer.model import util_stats
from balancer.model.problem import WEIGHT_ONE, Problem, vm_placement
from balancer.solver.greedy import trim_to_budget
from balancer.solver.objective import Evaluator

if TYPE_CHECKING:  # pragma: no cover
    from balancer.solver.engine import _Search

COUNT_FIXED = 4.0  # count budgets: the fixed part of a move's price, in mean VM memories
PRICE_MAX = 3_000_000.0  # per MiB: above every threshold's price, balance rarely pays
PRICE_MIN = 3.0


@dataclass
class Priced:
    """One plan of the price search or the frontier."""

    price: float
    unit_hosts: np.ndarray
    imbalance: float
    migrations: int
    moved_mem: int
    within_budget: bool


def reprice(problem: Problem, ev: Evaluator, price: float, fixed_mb: float,
            keep_budget: bool = False) -> tuple[Problem, Evaluator]:
    """The problem without budgets (unless ``keep_budget``) and with
    ``price * (mem + fixed_mb)`` per VM moved.

    Mandatory moves keep their cost shape; only the price changes. The evaluator is shared
    but for the move costs (cheap at any size)."""
    cost = np.rint(WEIGHT_ONE * price * (ev.vm_mem.astype(float) + fixed_mb)).astype(np.int64)
    p2 = replace(problem, move_cost=cost.tolist())
    if not keep_budget:
        p2 = replace(p2, max_migrations=None, max_moved_mem=None)
    ev2 = copy.copy(ev)
    ev2.problem = p2
    ev2.move_cost = cost
    ev2.u_move_cost = np.bincount(ev.vm_unit, weights=cost, minlength=len(problem.units)
                                  ).astype(np.int64)
    return p2, ev2


def fixed_part(problem: Problem, ev: Evaluator, fixed_cost_mb: float) -> float:
    """The fixed part of the price shape: the threshold's for a memory budget, a few mean
    VM memories for a count budget (so the price is mostly per move)."""
    if problem.max_migrations is not None and problem.max_moved_mem is None:
        return COUNT_FIXED * float(ev.vm_mem.mean() if len(ev.vm_mem) else 1024.0)
    return fixed_cost_mb


def measure(problem: Problem, ev: Evaluator, price: float, unit_hosts: np.ndarray,
            ) -> Priced:
    migrations, moved = ev.moved(unit_hosts)
    snap = problem.snapshot
    imb = util_stats(snap, vm_placement(problem, [int(h) for h in unit_hosts])).imbalance
    k, g = problem.max_migrations, problem.max_moved_mem
    within = (k is None or migrations <= k) and (g is None or moved <= g)
    return Priced(price, unit_hosts.copy(), imb, migrations, moved, within)


def measured(problem: Problem, ev: Evaluator, price: float, fixed_mb: float,
             hosts: np.ndarray) -> list[Priced]:
    """The plan measured, and if it breaks the budget, also trimmed to it (undo the moves
    whose undoing costs least at ``price`` per unit of budget freed)."""
    m = measure(problem, ev, price, hosts)
    out = [m]
    if not m.within_budget:
        p2, ev2 = reprice(problem, ev, price, fixed_mb, keep_budget=True)
        fixed = trim_to_budget(p2, ev2, hosts)
        if fixed is not None:
            out.append(measure(problem, ev, price, fixed))
    return out


def improve_at(s: _Search, problem: Problem, price: float, fixed_mb: float,
               start: np.ndarray, work: int | None, iterations: int | None = None,
               until: float | None = None) -> np.ndarray:
    """Run the unbudgeted LNS at ``price`` from ``start`` for about ``work`` units (or until
    the search has made ``iterations`` steps in all, or spent ``until`` of its effort)."""
    p2, ev2 = reprice(problem, s.ev, price, fixed_mb)
    saved = s.p, s.ev, s.converged
    s.p, s.ev, s.converged = p2, ev2, False
    try:
        target = None if work is None else s.work + work
        inc, _, _ = s.lns(start, ev2.objective(start), until=until, work_until=target,
                          iterations_until=iterations)
    finally:
        s.p, s.ev, s.converged = saved
    return inc


def search_budget(s: _Search, problem: Problem, start: np.ndarray, over: np.ndarray,
                  price0: float, fixed_cost_mb: float, steps: int, step_work: int,
                  ) -> list[Priced]:
    """Bisect the price between ``price0`` (whose plan ``over`` breaks the budget) and a price
    whose plan fits; every plan met is kept (over-budget ones repaired by the exact model over
    their moved units). ``start`` is a plan within the budget (warm start)."""
    ev = s.ev
    fixed_mb = fixed_part(problem, ev, fixed_cost_mb)
    out: list[Priced] = []

    def keep(price: float, hosts: np.ndarray) -> Priced:
        got = measured(problem, ev, price, fixed_mb, hosts)
        out.extend(got)
        return got[0]

    keep(price0, over)
    lo, hi = math.log(price0), None
    best_start = start
    price = price0 * 8.0
    for _ in range(steps):
        if s.exhausted():
            break
        hosts = improve_at(s, problem, price, fixed_mb, best_start, step_work)
        m = keep(price, hosts)
        if m.within_budget:
            hi = math.log(price)
            best_start = hosts
        else:
            lo = math.log(price)
        if hi is None:
            price = min(PRICE_MAX, price * 8.0)
        else:
            price = math.exp((lo + hi) / 2)
    return out


def descend_budget(s: _Search, problem: Problem, start: np.ndarray, price_hi: float,
                   price_lo: float, ratio: float, fixed_cost_mb: float, bisect: int,
                   until: float = 1.0) -> tuple[list[Priced], np.ndarray | None]:
    """Walk the price down from ``price_hi`` by ``ratio`` per step (each step the unbudgeted
    search from the plan before it, the first from ``start``, which makes only the forced
    moves) until a plan breaks the budget; then bisect (log space, ``bisect`` steps) between
    the last price whose plan fits and the first that does not, warm-started from the last
    plan that fits. Each step gets an even share of the effort left until ``until`` (a
    share of the search's effort, ``_Search.effort``) among the steps that may still come,
    so the steps near the budget, where the plans kept are found, get the most.

    Returns every plan met (over-budget ones also trimmed to the budget) and, if the price
    reached ``price_lo`` with every plan within the budget (the budget does not bind there),
    the last plan, for the caller to go on searching with the budget in force."""
    ev = s.ev
    fixed_mb = fixed_part(problem, ev, fixed_cost_mb)
    out: list[Priced] = []
    n_descent = max(1, math.ceil(math.log(price_lo / price_hi) / math.log(ratio) - 1e-9) + 1)

    def step(price: float, hosts: np.ndarray, left: int) -> tuple[np.ndarray, Priced]:
        e = s.effort()
        new = improve_at(s, problem, price, fixed_mb, hosts, None,
                         until=e + max(0.0, until - e) / max(1, left))
        got = measured(problem, ev, price, fixed_mb, new)
        out.extend(got)
        return new, got[0]

    price, cur = price_hi, start
    hi = lo = None  # log prices: the last whose plan fits, the first whose plan does not
    i = 0
    while not s.exhausted():
        hosts, m = step(price, cur, n_descent - i + bisect)
        i += 1
        if not m.within_budget:
            lo = math.log(price)
            break
        hi, cur = math.log(price), hosts
        if price <= price_lo * (1 + 1e-9):
            return out, cur
        price = max(price_lo, price * ratio)
    if hi is None or lo is None:
        return out, None
    for j in range(bisect):
        if s.exhausted():
            break
        price = math.exp((lo + hi) / 2)
        hosts, m = step(price, cur, bisect - j)
        if m.within_budget:
            hi, cur = math.log(price), hosts
        else:
            lo = math.log(price)
    return out, None


def best_within(cands: list[Priced]) -> Priced | None:
    ok = [c for c in cands if c.within_budget]
    if not ok:
        return None
    return min(ok, key=lambda c: (c.imbalance, c.moved_mem, c.price))


def frontier_prices(points: int, high: float = 60_000.0, low: float = 10.0) -> list[float]:
    """``points`` prices per MiB, geometric from ``high`` down to ``low``."""
    if points <= 1:
        return [high]
    r = (low / high) ** (1.0 / (points - 1))
    return [high * r ** i for i in range(points)]
