"""The greedy baseline behaves as its definition says (it is the yardstick)."""

from __future__ import annotations

from conftest import checked_plan, det, scenario


def test_greedy_lowers_combined_load_std_and_respects_budget() -> None:
    s = scenario("medium-rules")
    r = checked_plan(s, det(solver="greedy", threshold=5))
    assert r.after.imbalance < r.before.imbalance
    r5 = checked_plan(s, det(solver="greedy", threshold=5, max_migrations=5))
    assert len(r5.moves) == 5
    # the first five moves of the unbudgeted run are the budgeted run (one move at a time)
    assert r5.after.imbalance >= r.after.imbalance


def test_greedy_evacuates_and_never_moves_manual() -> None:
    r = checked_plan(scenario("maintenance"), det(solver="greedy", threshold=1))
    assert {m.vm for m in r.moves} >= {"v3", "v4"}
    assert "m1" not in {m.vm for m in r.moves}
