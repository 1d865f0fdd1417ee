"""The balance / migration-cost curve, and budgets searched by price."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from balancer.model import util_stats
from balancer.service import PlanOptions, frontier, plan
from balancer.snapshot import parse_snapshot
from balancer.verify import Limits, verify
from simulator.generate import generate, generate_skewed

from conftest import det

CLI = [sys.executable, "-m", "balancer.cli"]


def test_frontier_points_are_verified_plans_sorted_by_memory_moved() -> None:
    snap = parse_snapshot(generate(12, 120, 4, rules=True))
    opts = PlanOptions(time_limit=300, max_iterations=60, seed=1)
    priced = frontier(snap, opts, points=5, fill=0)
    assert len(priced.points) == 5 and {p.kind for p in priced.points} == {"price"}
    f = frontier(snap, opts, points=5)  # two points by memory budget between neighbours
    assert 5 < len(f.points) <= 5 + 2 * 4
    assert {p.kind for p in f.points} == {"price", "memory budget"}
    # the price points are the same search (the filled ones come after it)
    assert sorted(p.plan.moved_mem for p in f.points if p.kind == "price") == \
        [p.plan.moved_mem for p in priced.points]
    moved = [p.plan.moved_mem for p in f.points]
    assert moved == sorted(moved)
    for p in f.points:
        assert verify(snap, p.plan.placement, Limits()) == []
        assert p.plan.after.imbalance == util_stats(snap, p.plan.placement).imbalance
        assert p.bound <= p.objective
        assert all(m.reason for m in p.plan.moves)
    # more memory moved buys balance: the curve ends far below where it starts
    assert f.points[-1].plan.after.imbalance < 0.5 * f.before.imbalance
    assert f.points[0].plan.moved_mem < f.points[-1].plan.moved_mem
    doc = f.to_dict()
    assert set(doc["frontier"][0]) >= {"price", "moved_mem_gb", "moves", "imbalance", "cpu_std",
                                       "mem_std", "migrations", "bound", "gap", "solved_by"}


def test_filled_points_beat_the_price_points_at_their_memory() -> None:
    """A point solved by memory budget between two price points balances no worse than every
    price point that moves no more memory, and most balance better (they add to the curve)."""
    for gen, seed in ((generate, 21), (generate_skewed, 22)):
        snap = parse_snapshot(gen(24, 360, seed, rules=True))
        f = frontier(snap, PlanOptions(time_limit=300, max_iterations=120, seed=1), points=5)
        filled = [p for p in f.points if p.kind == "memory budget"]
        assert len(filled) >= 4
        for p in filled:
            below = [q for q in f.points if q.kind == "price"
                     and q.plan.moved_mem <= p.plan.moved_mem]
            if below:
                best = min(q.plan.after.imbalance for q in below)
                assert p.plan.after.imbalance <= best, (gen.__name__, p.to_dict()["price"])
        # and most do strictly better: they add to the curve
        assert sum(p.plan.after.imbalance < min(
            [q.plan.after.imbalance for q in f.points if q.kind == "price"
             and q.plan.moved_mem <= p.plan.moved_mem] or [9.0]) for p in filled) \
            >= len(filled) // 2


def test_frontier_from_the_command_line_json_table_and_plot(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(generate(8, 80, 2)))
    p = subprocess.run([*CLI, "plan", str(path), "--frontier", "--points", "3", "--fill", "0",
                        "--format", "json", "--time-limit", "120"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert len(doc["frontier"]) == 3
    assert {q["solved_by"] for q in doc["frontier"]} == {"price"}
    assert set(doc["frontier"][0]["migrations"][0] if doc["frontier"][0]["migrations"] else
               {"vm": 1, "from": 1, "to": 1, "reason": 1}) >= {"vm", "from", "to", "reason"}
    png = tmp_path / "f.png"
    p = subprocess.run([*CLI, "plan", str(path), "--frontier", "--points", "3", "--format",
                        "table", "--plot", str(png), "--time-limit", "120"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "price/MiB" in p.stdout and "GiB moved" in p.stdout and "budget" in p.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([*CLI, "plan", str(path), "--plot", str(png)], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--frontier" in bad.stderr


def test_memory_budget_by_price_beats_greedy_at_greedys_memory() -> None:
    for gen, seed in ((generate, 11), (generate_skewed, 12)):
        snap = parse_snapshot(gen(16, 240, seed, rules=True))
        g = plan(snap, det(threshold=5, solver="greedy"))
        budget = g.moved_mem / 1024
        c = plan(snap, det(threshold=5, max_moved_mem_gb=budget, max_iterations=120))
        assert c.moved_mem <= g.moved_mem
        assert c.after.imbalance <= 0.9 * g.after.imbalance, (gen.__name__, c.solver)


def test_budget_price_walks_down_from_a_high_price_then_bisects() -> None:
    """The price search starts high (almost nothing pays), falls by the ratio per step until
    a plan breaks the budget, then bisects between the last two prices; every plan it keeps
    as a candidate fits the budget or is the trim of one that does not."""
    import math

    from balancer.solver.engine import EngineOptions, _Search
    from balancer.solver.greedy import initial_unit_hosts
    from balancer.solver.price import descend_budget
    from policies import build_problem

    snap = parse_snapshot(generate_skewed(24, 360, 7, rules=True))
    g = plan(snap, det(threshold=5, solver="greedy"))
    opts = det(threshold=5, max_moved_mem_gb=g.moved_mem / 1024)
    problem = build_problem(snap, policies=opts.policies())
    search = _Search(problem, EngineOptions(time_limit=120.0, max_iterations=60, seed=1,
                                            price=100.0))
    try:
        got, last = descend_budget(search, problem, initial_unit_hosts(problem), 60_000.0,
                                   100.0, 0.45, 1024.0, 3)
    finally:
        search.watcher.close()
    assert last is None  # the budget binds above the threshold's price
    steps = []  # (price, within) per step; a trim follows its over-budget plan at its price
    for c in got:
        if steps and c.price == steps[-1][0]:
            assert c.within_budget  # the trim
            continue
        steps.append((c.price, c.within_budget))
    first_over = next(i for i, (_, ok) in enumerate(steps) if not ok)
    assert first_over >= 1
    for i in range(first_over + 1):
        assert math.isclose(steps[i][0], 60_000.0 * 0.45 ** i)
        assert steps[i][1] == (i < first_over)
    hi, lo = steps[first_over - 1][0], steps[first_over][0]
    assert len(steps) == first_over + 1 + 3
    for price, ok in steps[first_over + 1:]:
        assert lo < price < hi
        assert math.isclose(price, math.sqrt(lo * hi))
        hi, lo = (price, lo) if ok else (hi, price)


def test_memory_budget_walking_the_price_down_beats_the_upward_bisection() -> None:
    """At greedy's memory, the budgeted plan of the price walked down from a high price
    balances better than the second pass's search (threshold's price, then bisection up from
    greedy's plan), on both generators, for the same effort."""
    from dataclasses import replace

    from balancer.model import util_stats
    from balancer.solver.engine import EngineOptions, solve
    from policies import build_problem

    for gen, seed in ((generate, 31), (generate_skewed, 32)):
        snap = parse_snapshot(gen(24, 360, seed, rules=True))
        g = plan(snap, det(threshold=5, solver="greedy"))
        opts = det(threshold=5, max_moved_mem_gb=g.moved_mem / 1024)
        problem = build_problem(snap, policies=opts.policies())
        base = EngineOptions(time_limit=120.0, max_iterations=80, seed=1, price=100.0)
        down = solve(problem, base)
        up = solve(problem, replace(base, budget_descent=False))
        imb_down = util_stats(snap, down.placement).imbalance
        imb_up = util_stats(snap, up.placement).imbalance
        assert verify(snap, down.placement, opts.limits()) == []
        assert imb_down < imb_up, (gen.__name__, imb_down, imb_up)
        assert imb_down <= 0.75 * g.after.imbalance, (gen.__name__, imb_down)


def test_filling_the_frontier_stops_when_interrupted() -> None:
    """The points between prices check the stop (event or wall clock) before each one: what
    was filled so far comes back."""
    from balancer.solver.engine import EngineOptions, _fill, curve
    from balancer.solver.objective import Evaluator
    from balancer.solver.price import frontier_prices
    from policies import build_problem

    snap = parse_snapshot(generate(16, 200, 5, rules=True))
    problem = build_problem(snap, policies=PlanOptions(threshold=5).policies())
    ev = Evaluator(problem)
    opts = EngineOptions(time_limit=120.0, max_iterations=40, seed=1, frontier_fill=0)
    pts, _ = curve(problem, frontier_prices(4), opts, ev)
    assert len(pts) == 4
    fill = EngineOptions(frontier_fill=2)
    every = _fill(problem, ev, pts, fill)
    assert len(every) > 3
    asked = []

    def interrupted() -> bool:
        asked.append(1)
        return len(asked) > 3

    some = _fill(problem, ev, pts, fill, interrupted)
    assert len(some) <= 3 < len(every)
    for p, q in zip(some, every, strict=False):
        assert (p.unit_hosts == q.unit_hosts).all() and p.price == q.price
