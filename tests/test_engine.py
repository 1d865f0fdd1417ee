"""The CP-SAT engine through ``service.plan``: every answer passes the solver-free verifier."""

from __future__ import annotations

import pytest

from balancer.errors import InfeasibleError
from balancer.service import plan

from conftest import checked_plan, det, host, scenario, snap, vm, where


def test_hot_cold_is_balanced_and_optimal() -> None:
    s = scenario("hot-cold")
    r = checked_plan(s, det(threshold=5))
    assert r.after.imbalance < 0.5 * r.before.imbalance
    assert r.solver["status"] == "OPTIMAL"
    assert r.solver["bound"] <= r.solver["objective"]
    assert all(m.reason.startswith("balance") for m in r.moves)
    assert r.moves, "a cluster this lopsided must be rebalanced"


def test_balanced_cluster_gets_no_moves() -> None:
    s = snap([host("h1"), host("h2")], [vm("a", "h1", cpu=2), vm("b", "h2", cpu=2)])
    assert checked_plan(s, det(threshold=5)).moves == []


def test_maintenance_host_is_evacuated_manual_vm_stays() -> None:
    s = scenario("maintenance")
    for threshold in (1, 3):
        r = checked_plan(s, det(threshold=threshold))
        placed = where(r)
        assert placed["v3"] != "h3" and placed["v4"] != "h3"
        assert placed["m1"] == "h3"
        assert any("m1 is manual" in n for n in r.notes)
        assert {m.vm for m in r.moves} >= {"v3", "v4"}
        assert all("evacuates h3" in m.reason for m in r.moves if m.vm in ("v3", "v4"))
    # threshold 1: nothing but the evacuation
    r = checked_plan(s, det(threshold=1))
    assert {m.vm for m in r.moves} == {"v3", "v4"}


def test_overcommitted_start_is_valid_and_gets_fixed() -> None:
    s = scenario("overcommitted")
    r1 = checked_plan(s, det(threshold=1))
    assert r1.moves == []  # nothing mandatory: an overcommitted host may stay as it is
    r = checked_plan(s, det(threshold=5))
    assert r.moves
    assert r.after.mem_max < r.before.mem_max


def test_manual_vm_never_moves() -> None:
    s = snap([host("h1"), host("h2")],
             [vm("big", "h1", cpu=3.5, mem=32768, automation="manual"), vm("x", "h1", cpu=3.5)])
    r = checked_plan(s, det(threshold=5))
    assert where(r)["big"] == "h1"


# --- each rule as a feasible / infeasible pair ------------------------------------------------

def test_anti_affinity_feasible_spreads_vms() -> None:
    s = snap([host("h1"), host("h2"), host("h3")], [vm(f"w{i}", "h1") for i in range(3)],
             [{"name": "web", "type": "anti_affinity", "vms": ["w0", "w1", "w2"]}])
    for threshold in (1, 5):
        r = checked_plan(s, det(threshold=threshold))
        assert len(set(where(r).values())) == 3
        assert any("fixes rule web" in m.reason for m in r.moves)
    assert len(checked_plan(s, det(threshold=1)).moves) == 2  # the fewest moves that fix it


def test_anti_affinity_infeasible_names_rule() -> None:
    s = snap([host("h1"), host("h2")], [vm(f"w{i}", "h1") for i in range(3)],
             [{"name": "web", "type": "anti_affinity", "vms": ["w0", "w1", "w2"]}])
    with pytest.raises(InfeasibleError) as err:
        plan(s, det())
    assert "rule web" in err.value.culprits


def test_affinity_feasible_joins_vms() -> None:
    s = snap([host("h1"), host("h2")], [vm("app", "h1"), vm("db", "h2")],
             [{"name": "app-db", "type": "affinity", "vms": ["app", "db"]}])
    r = checked_plan(s, det(threshold=1))
    assert where(r)["app"] == where(r)["db"]
    assert len(r.moves) == 1 and "fixes rule app-db" in r.moves[0].reason


def test_affinity_infeasible_when_no_host_holds_the_pair() -> None:
    s = snap([host("h1", mem=16384), host("h2", mem=16384)],
             [vm("app", "h1", mem=12288), vm("db", "h2", mem=12288)],
             [{"name": "app-db", "type": "affinity", "vms": ["app", "db"]}])
    with pytest.raises(InfeasibleError) as err:
        plan(s, det())
    assert any("capacity" in c for c in err.value.culprits)


def test_vm_host_must_feasible() -> None:
    s = snap([host("h1"), host("h2"), host("h3")], [vm("lic", "h1"), vm("x", "h1")],
             [{"name": "licence", "type": "vm_host", "vms": ["lic"], "hosts": ["h3"],
               "mandatory": True}])
    r = checked_plan(s, det(threshold=1))
    assert where(r)["lic"] == "h3"
    assert [m.vm for m in r.moves] == ["lic"]


def test_vm_host_must_infeasible_when_its_hosts_are_down() -> None:
    s = snap([host("h1"), host("h2"), host("h3", state="maintenance")], [vm("lic", "h1")],
             [{"name": "licence", "type": "vm_host", "vms": ["lic"], "hosts": ["h3"]}])
    with pytest.raises(InfeasibleError, match="lic"):
        plan(s, det())


def test_vm_host_should_is_followed_when_possible() -> None:
    s = snap([host("h1"), host("h2")], [vm("a", "h1"), vm("b", "h1")],
             [{"name": "pref", "type": "vm_host", "vms": ["a"], "hosts": ["h2"],
               "mandatory": False}])
    r = checked_plan(s, det(threshold=3))
    assert where(r)["a"] == "h2"
    assert "should-rule pref" in next(m.reason for m in r.moves if m.vm == "a")


def test_vm_host_should_is_met_by_a_swap_when_that_is_the_only_way() -> None:
    s = snap([host("h1"), host("h2", mem=8192)],
             [vm("a", "h1", mem=8192), vm("fill", "h2", mem=4096)],
             [{"name": "pref", "type": "vm_host", "vms": ["a"], "hosts": ["h2"],
               "mandatory": False}])
    r = checked_plan(s, det(threshold=5))
    assert where(r) == {"a": "h2", "fill": "h1"}


def test_vm_host_should_yields_to_capacity() -> None:
    s = snap([host("h1"), host("h2", mem=8192)],
             [vm("a", "h1", mem=8192), vm("fill", "h2", mem=4096, automation="manual")],
             [{"name": "pref", "type": "vm_host", "vms": ["a"], "hosts": ["h2"],
               "mandatory": False}])
    r = checked_plan(s, det(threshold=5))  # no error: a should-rule is soft
    assert where(r)["a"] == "h1"


def test_soft_anti_affinity_spreads_when_it_can() -> None:
    s = snap([host("h1"), host("h2")], [vm("a", "h1"), vm("b", "h1")],
             [{"name": "spread", "type": "anti_affinity", "vms": ["a", "b"], "mandatory": False}])
    r = checked_plan(s, det(threshold=2))
    assert where(r)["a"] != where(r)["b"]


def test_capacity_feasible_and_infeasible_evacuation() -> None:
    hosts = [host("h1", mem=16384), host("h2", mem=16384), host("h3", state="maintenance")]
    ok = snap(hosts, [vm("a", "h3", mem=8192), vm("b", "h3", mem=8192)])
    r = checked_plan(ok, det(threshold=1))
    assert set(where(r).values()) <= {"h1", "h2"}
    # each VM fits somewhere alone, but not all three: room runs out
    full = snap(hosts, [vm("a", "h3", mem=12288), vm("b", "h3", mem=12288),
                        vm("c", "h1", mem=8192)])
    with pytest.raises(InfeasibleError) as err:
        plan(full, det(threshold=1))
    assert any("capacity" in c for c in err.value.culprits)


def test_cpu_headroom_is_kept_on_receiving_hosts() -> None:
    s = snap([host("h1", cpu=4), host("h2", cpu=4)],
             [vm("a", "h1", cpu=3.0), vm("b", "h1", cpu=0.9)])
    r = checked_plan(s, det(threshold=5, cpu_headroom=0.3))
    assert where(r)["a"] == "h1"  # a on h2 would be 3.0 > 4 x 0.7


def test_migration_count_budget() -> None:
    s = scenario("hot-cold")
    r = checked_plan(s, det(threshold=5, max_migrations=2))
    assert len(r.moves) == 2
    assert r.after.imbalance < r.before.imbalance


def test_memory_budget() -> None:
    s = scenario("hot-cold")
    r = checked_plan(s, det(threshold=5, max_moved_mem_gb=16))
    assert 0 < r.moved_mem <= 16 * 1024


def test_budget_too_small_for_mandatory_moves_is_infeasible() -> None:
    s = scenario("maintenance")
    with pytest.raises(InfeasibleError) as err:
        plan(s, det(max_migrations=1))
    assert "budget max_migrations" in err.value.culprits


def test_threshold_1_makes_only_mandatory_moves() -> None:
    assert checked_plan(scenario("hot-cold"), det(threshold=1)).moves == []


def test_higher_threshold_never_ends_with_worse_balance() -> None:
    for name in ("hot-cold", "medium-rules"):
        s = scenario(name)
        last = None
        for threshold in (1, 2, 3, 4, 5):
            imb = checked_plan(s, det(threshold=threshold)).after.imbalance
            if last is not None:
                assert imb <= last + 1e-9, (name, threshold)
            last = imb


def test_deterministic_with_seed() -> None:
    s = scenario("medium-rules")
    a = checked_plan(s, det(threshold=4))
    b = checked_plan(s, det(threshold=4))
    assert a.placement == b.placement
    assert a.solver["objective"] == b.solver["objective"]


def test_medium_cluster_with_rules_beats_greedy() -> None:
    s = scenario("medium-rules")
    g = checked_plan(s, det(threshold=5, solver="greedy"))
    r = checked_plan(s, det(threshold=5))
    assert r.after.imbalance <= 0.75 * g.after.imbalance
    for k in (3, 10):
        gk = checked_plan(s, det(threshold=5, solver="greedy", max_migrations=k))
        rk = checked_plan(s, det(threshold=5, max_migrations=k))
        assert len(rk.moves) <= k
        assert rk.after.imbalance <= gk.after.imbalance + 1e-9


def test_every_move_has_a_reason() -> None:
    r = checked_plan(scenario("medium-rules"), det(threshold=3))
    assert r.moves and all(m.reason for m in r.moves)


def test_threshold_1_moves_another_vm_to_make_room_for_an_evacuation() -> None:
    # c (12 GiB) fits on no host as they are; moving a next to b empties h1 for it.
    s = snap([host("h1", mem=16384), host("h2", mem=16384), host("h3", state="maintenance")],
             [vm("a", "h1", mem=8192), vm("b", "h2", mem=8192), vm("c", "h3", mem=12288)])
    r = checked_plan(s, det(threshold=1))
    placed = where(r)
    assert placed["c"] != "h3"
    assert len(r.moves) == 2
    room = next(m for m in r.moves if m.vm != "c")
    assert "makes room" in room.reason


def test_budget_iterated_local_search_never_worse_and_deterministic() -> None:
    """The budget path's last step (seeded kicks + local search) only ever keeps a better
    plan within the budget, and gives the same plan twice."""
    from dataclasses import replace

    from balancer.model import util_stats
    from balancer.snapshot import parse_snapshot
    from balancer.solver.engine import EngineOptions, solve
    from balancer.verify import verify
    from policies import build_problem
    from simulator.generate import generate

    s = parse_snapshot(generate(24, 300, 4, rules=True))
    opts = det(threshold=5, max_migrations=8)
    problem = build_problem(s, policies=opts.policies())
    base = EngineOptions(time_limit=120.0, max_iterations=40, seed=1, price=100.0)
    without = solve(problem, replace(base, kicks=0))
    # a count budget alone uses count_kicks (kicks of a third of K): none, no kicks at all
    assert solve(problem, replace(base, count_kicks=0)).placement == without.placement
    a = solve(problem, base)
    b = solve(problem, base)
    assert a.placement == b.placement
    assert verify(s, a.placement, opts.limits()) == []
    assert sum(x != y for x, y in zip(a.placement, s.placement(), strict=True)) <= 8
    assert (util_stats(s, a.placement).imbalance
            <= util_stats(s, without.placement).imbalance + 1e-12)
