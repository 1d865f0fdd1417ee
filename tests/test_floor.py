"""The certified floor of the judged imbalance (``balancer.solver.floor``): never above a real
plan, exact where the relaxation is, and its dual tight against the primal."""

from __future__ import annotations

import numpy as np

from balancer.service import PlanOptions
from balancer.snapshot import parse_snapshot
from balancer.solver.floor import _dual_max, budget_floor, imbalance_floor
from policies import build_problem
from simulator.generate import generate, generate_skewed

from conftest import checked_plan, det, doc, host, vm


def _floor(snapshot, **kw):  # noqa: ANN001, ANN202
    return imbalance_floor(build_problem(snapshot, policies=PlanOptions(**kw).policies()))


def test_floor_is_exact_when_the_small_load_divides_evenly() -> None:
    # one 60-core VM and six 5-core VMs on three 100-core hosts: the best plan puts the big
    # VM alone and 10 cores on each other host... but the six small ones total 30 cores, so
    # utilisations 0.60 / 0.15 / 0.15: cpu std = sqrt(((0.3)^2 + 2 (0.15)^2) / 3)
    hosts = [host(f"h{i}", cpu=100, mem=400_000) for i in range(3)]
    vms = [vm("big", "h0", cpu=60, mem=4096, memd=0, vcpus=64)]
    vms += [vm(f"s{i}", "h0", cpu=5, mem=4096, memd=0, vcpus=8) for i in range(6)]
    s = parse_snapshot(doc(hosts, vms))
    f = _floor(s, threshold=5)
    expected = float(np.sqrt((0.3 ** 2 + 2 * 0.15 ** 2) / 3))
    assert expected * (1 - 1e-5) <= f.cpu_std <= expected
    r = checked_plan(s, det(threshold=5, max_iterations=200))
    assert f.cpu_std <= r.after.cpu_std + 1e-12
    assert abs(r.after.cpu_std - expected) < 1e-9  # the engine reaches the floor here


def test_floor_never_above_real_plans_on_skewed_clusters() -> None:
    s = parse_snapshot(generate_skewed(24, 300, 5, rules=True))
    f = _floor(s, threshold=5)
    assert f.cpu_std > 0  # the generator's large VMs leave a floor
    for opts in (det(threshold=5), det(threshold=5, solver="greedy"),
                 det(threshold=3, max_migrations=10)):
        r = checked_plan(s, opts)
        assert f.cpu_std <= r.after.cpu_std + 1e-12
        assert f.mem_std <= r.after.mem_std + 1e-12
        assert f.imbalance <= r.after.imbalance + 1e-12
    assert f.imbalance <= checked_plan(s, det(threshold=5)).before.imbalance


def test_dual_matches_the_primal_on_small_instances() -> None:
    """Weak duality (the dual never exceeds the primal) and tightness (within 1e-3)."""
    rng = np.random.default_rng(7)
    for _ in range(60):
        g = int(rng.integers(2, 7))
        w = rng.integers(1, 5, g).astype(float)
        k = rng.uniform(0.3, 1.0, g)
        lo_b = np.where(rng.random(g) < 0.5, rng.uniform(0, 1.2, g), 0.0)
        t = float((w * k * lo_b).sum() + rng.uniform(0.5, 3))
        dual = float(_dual_max(w[None], k[None], lo_b[None], t)[0])
        # primal: for each c on a grid, u_h = max(l_h, c + nu k_h), nu bisected to the total
        c = np.linspace(-1, 4, 5001)[:, None]
        lo, hi = np.full((len(c), 1), -100.0), np.full((len(c), 1), 100.0)
        for _ in range(60):
            nu = (lo + hi) / 2
            over = (w * k * np.maximum(lo_b, c + nu * k)).sum(1, keepdims=True) > t
            hi, lo = np.where(over, nu, hi), np.where(over, lo, nu)
        u = np.maximum(lo_b, c + lo * k)
        primal = float((w * (u - c) ** 2).sum(1).min())
        assert dual <= primal + 1e-9
        assert primal - dual <= 1e-3 * primal + 1e-5  # the grid in c is 1e-3 wide


def test_budget_floor_is_the_start_with_no_moves_allowed() -> None:
    s = parse_snapshot(generate_skewed(16, 160, 3))
    f = budget_floor(build_problem(s, policies=PlanOptions(threshold=5).policies()),
                     max_migrations=0)
    before = checked_plan(s, det(threshold=5)).before
    assert before.cpu_std * (1 - 1e-3) <= f.cpu_std <= before.cpu_std + 1e-12
    assert before.mem_std * (1 - 1e-3) <= f.mem_std <= before.mem_std + 1e-12


def test_budget_floor_never_above_budgeted_plans() -> None:
    for gen in (generate, generate_skewed):
        s = parse_snapshot(gen(24, 300, 11, rules=True))
        problem = build_problem(s, policies=PlanOptions(threshold=5).policies())
        for kw, budget in (({"max_migrations": 6}, {"max_migrations": 6}),
                           ({"max_moved_mem_gb": 64.0}, {"max_moved_mem": 64 * 1024})):
            f = budget_floor(problem, **budget)
            for solver in ("cpsat", "greedy"):
                r = checked_plan(s, det(threshold=5, solver=solver, **kw))
                assert f.cpu_std <= r.after.cpu_std + 1e-12
                assert f.mem_std <= r.after.mem_std + 1e-12
            assert f.imbalance > 0  # six moves cannot balance 24 skewed hosts
