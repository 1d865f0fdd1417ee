"""Solving in worker processes (balancer.solving): same plans, stops, caps, errors, restarts."""

from __future__ import annotations

import threading
import time

import pytest

from balancer.errors import InfeasibleError, SolverError
from balancer.service import PlanOptions, plan
from balancer.snapshot import parse_snapshot
from balancer.solving import Busy, SolverPool, SolverProcess
from simulator.generate import generate


@pytest.fixture(scope="module")
def pool() -> SolverPool:
    p = SolverPool(2)
    yield p
    p.close()


def _moves(result) -> list[tuple[str, str, str]]:  # noqa: ANN001
    return [(m.vm, m.source, m.target) for m in result.moves]


def test_worker_plan_equals_in_process_plan(pool: SolverPool) -> None:
    snap = parse_snapshot(generate(16, 200, seed=3, rules=True))
    opts = PlanOptions(threshold=4, seed=1)
    here = plan(snap, opts)
    there = pool.plan(snap, opts)
    assert _moves(there) and _moves(there) == _moves(here)
    assert there.after == here.after


def test_wall_limit_stops_the_solve_with_the_best_plan(pool: SolverPool) -> None:
    snap = parse_snapshot(generate(64, 1000, seed=4))
    t0 = time.monotonic()
    # 20x the default effort: far more search than 3 s holds on any machine, so the cap ends it
    result = pool.plan(snap, PlanOptions(threshold=5, time_limit=120.0, effort=20.0),
                       wall_limit=3.0)
    took = time.monotonic() - t0
    assert took < 30  # far from the 120 s limit: stopped at the cap
    assert result.solver["stopped_by"] == "stop"
    assert result.after.imbalance < result.before.imbalance


def test_errors_come_back_with_their_type(pool: SolverPool) -> None:
    doc = generate(4, 20, seed=5)
    doc["hosts"][0]["state"] = "maintenance"
    snap = parse_snapshot(doc)
    with pytest.raises(InfeasibleError) as info:
        pool.plan(snap, PlanOptions(max_migrations=0))
    assert info.value.culprits  # the conflict set survives the trip


def test_a_killed_worker_is_replaced() -> None:
    w = SolverProcess("t")
    try:
        snap = parse_snapshot(generate(64, 1000, seed=6))
        threading.Timer(2.0, w.kill).start()
        with pytest.raises(SolverError, match="died"):
            w.plan(snap, PlanOptions(threshold=5, time_limit=60.0))
        small = parse_snapshot(generate(8, 40, seed=6))
        assert w.plan(small, PlanOptions()).after is not None  # a new worker answers
    finally:
        w.close()


def test_busy_when_every_worker_solves() -> None:
    p = SolverPool(1)
    try:
        snap = parse_snapshot(generate(64, 1000, seed=9))
        t = threading.Thread(target=p.plan, args=(snap, PlanOptions(threshold=5,
                                                                     time_limit=60.0)),
                             kwargs={"wall_limit": 4.0})
        t.start()
        time.sleep(0.5)
        with pytest.raises(Busy):
            p.plan(snap, PlanOptions(), wait=0.1)
        t.join(timeout=60)
    finally:
        p.close()


def test_the_cycle_estimates_and_plans_in_a_worker(tmp_path, pool: SolverPool,  # noqa: ANN001
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve`` hands each cycle's estimate and plan to a solver worker (their CPU stays out
    of the process that answers the API): with both broken in this process, a cycle through
    the pool still gives the recommendations of an in-process cycle."""
    import balancer.cycle
    from tests.test_daemon import make, scenario_doc
    from tests.test_daemon_state import feed

    doc = scenario_doc("hot-cold")

    def recommend(controller) -> list[tuple[str, str, str]]:  # noqa: ANN001
        controller.set_inventory(doc)
        feed(controller, doc)
        report = controller.run_cycle()
        assert not any(n.startswith("cycle failed") for n in report.notes), report.notes
        controller.close()
        return sorted((r["vm"], r["source"], r["target"]) for r in report.recommendations)

    here, _, _ = make(tmp_path / "here", time_limit_s=120.0)
    want = recommend(here)
    assert want

    def broken(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("estimated or planned in the API's process")

    monkeypatch.setattr(balancer.cycle, "estimated", broken)
    monkeypatch.setattr(balancer.cycle, "plan", broken)
    there, _, _ = make(tmp_path / "there", time_limit_s=120.0, solvers=pool)
    assert recommend(there) == want

