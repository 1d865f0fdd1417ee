"""The budgeted local search (swap.py) and the fleet-scale pairs pass (pairs.py)."""

from __future__ import annotations

import numpy as np
import pytest

from balancer.model import util_stats
from balancer.model.problem import vm_placement
from balancer.service import PlanOptions, build_problem, plan
from balancer.snapshot import parse_snapshot
from balancer.solver import pairs, swap
from balancer.solver.engine import EngineOptions, mandatory_violations, solve
from balancer.solver.greedy import greedy, initial_unit_hosts
from balancer.solver.objective import Evaluator
from balancer.verify import verify
from simulator.generate import generate, generate_skewed

from conftest import det


def _problem(snap, **kw):  # type: ignore[no-untyped-def]
    opts = PlanOptions(threshold=5, **kw)
    problem = build_problem(snap, policies=opts.policies())
    return opts, problem, Evaluator(problem)


def _imbalance(snap, problem, hosts) -> float:  # type: ignore[no-untyped-def]
    return util_stats(snap, vm_placement(problem, [int(h) for h in hosts])).imbalance


@pytest.mark.parametrize(("gen", "seed", "budget"), [
    (generate, 31, {"max_migrations": 12}),
    (generate_skewed, 32, {"max_migrations": 20}),
    (generate, 33, {"max_moved_mem_gb": 300}),
])
def test_swap_keeps_budget_and_rules_and_beats_its_start(gen, seed, budget) -> None:  # type: ignore[no-untyped-def]
    snap = parse_snapshot(gen(24, 360, seed, rules=True))
    opts, problem, ev = _problem(snap, **budget)
    g = greedy(problem, ev)
    out = swap.improve(problem, ev, g)
    assert verify(snap, vm_placement(problem, [int(h) for h in out]), opts.limits()) == []
    assert not mandatory_violations(problem, ev, out)
    before, after = _imbalance(snap, problem, g), _imbalance(snap, problem, out)
    assert after < before, (before, after)
    # deterministic: the same input gives the same plan
    assert np.array_equal(out, swap.improve(problem, ev, g))


def test_swap_pair_values_are_exact() -> None:
    snap = parse_snapshot(generate(10, 120, 5))
    _, problem, ev = _problem(snap)
    imb = swap.Imbalance.of(problem, ev)
    st = initial_unit_hosts(problem)
    cpu, memd, _ = ev.loads(st)
    u = np.array([0, 1, 2, 3, 4, 5])
    src = st[u]
    dst = (src + np.array([1, 2, 3, 1, 2, 3])) % 10
    got = swap._pair_values(imb, cpu.astype(float), memd.astype(float), ev, u, src, dst,
                            np.arange(6), np.arange(6))
    for j in range(6):
        for i in range(6):
            if u[i] == u[j]:
                continue
            hosts = st.copy()
            hosts[u[j]] = dst[j]
            hosts[u[i]] = dst[i]
            c, m, _ = ev.loads(hosts)
            assert got[j, i] == pytest.approx(imb.value(c.astype(float), m.astype(float)),
                                              abs=1e-9)


def test_pairs_pass_lowers_the_objective_and_keeps_every_constraint() -> None:
    snap = parse_snapshot(generate_skewed(40, 500, 9, rules=True))
    _, problem, ev = _problem(snap)
    start = initial_unit_hosts(problem)
    out, n = pairs.pair_rounds(problem, ev, start, rounds=30)
    assert n > 0
    assert ev.objective(out) < ev.objective(start)
    assert not mandatory_violations(problem, ev, out)
    again, _ = pairs.pair_rounds(problem, ev, start, rounds=30)
    assert np.array_equal(out, again)


def test_fleet_mode_plan_is_verified_and_balances() -> None:
    snap = parse_snapshot(generate(30, 450, 7, rules=True))
    opts, problem, ev = _problem(snap)
    r = solve(problem, EngineOptions(time_limit=120, max_iterations=20, pairs_min_hosts=10,
                                     price=100.0), ev)
    assert r.stats.get("pair_moves", 0) > 0
    assert r.greedy_objective is None  # the pairs pass replaced the greedy hint
    placement = vm_placement(problem, [int(h) for h in r.unit_hosts])
    assert verify(snap, placement, opts.limits()) == []
    assert util_stats(snap, placement).imbalance < 0.5 * util_stats(
        snap, snap.placement()).imbalance


def test_count_budget_by_price_not_worse_than_greedy_on_both_generators() -> None:
    for gen, seed in ((generate, 41), (generate_skewed, 42)):
        snap = parse_snapshot(gen(16, 240, seed, rules=True))
        for k in (5, 15):
            g = plan(snap, det(threshold=5, solver="greedy", max_migrations=k))
            c = plan(snap, det(threshold=5, max_migrations=k, max_iterations=60))
            assert len(c.moves) <= k
            assert c.after.imbalance <= g.after.imbalance + 1e-9, (gen.__name__, k)


def test_fluid_bound_is_below_the_proven_optimum_and_in_the_solver_block() -> None:
    from balancer.solver.bound import fluid_bound

    for gen, seed, kw in ((generate, 3, {}), (generate, 4, {"max_migrations": 3}),
                          (generate_skewed, 5, {})):
        snap = parse_snapshot(gen(6, 40, seed))
        opts, problem, ev = _problem(snap, **kw)
        r = solve(problem, EngineOptions(time_limit=120, full_dtime=60.0, price=100.0), ev)
        b = fluid_bound(problem, ev)
        assert b is not None and b > 0
        assert b <= r.objective
        if r.status.value == "OPTIMAL":
            assert b <= r.bound == r.objective
    snap = parse_snapshot(generate(24, 360, 8, rules=True))
    out = plan(snap, det(threshold=5))
    s = out.solver
    assert s["bound_kind"] == "fluid" and 0 < s["bound"] <= s["objective"]
    assert 0 <= s["gap"] < 1
