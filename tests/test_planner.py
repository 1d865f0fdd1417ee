"""The planner: waves keep every host within memory, respect the limits, break cycles."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import defaultdict

import pytest

from balancer.errors import InputError
from balancer.migration_model import estimate
from balancer.model import ClusterSnapshot, Move
from balancer.planner import (
    PlannerLimits,
    UnplannableError,
    Waves,
    add_waves,
    make_waves,
    moves_from_plan,
    waves_from_plan,
)
from balancer.service import PlanOptions, plan
from balancer.snapshot import parse_snapshot
from simulator.generate import generate

from conftest import det, doc, host, snap, vm

GIB = 1024


def replay(s: ClusterSnapshot, waves: Waves, lim: PlannerLimits) -> dict[str, str]:
    """Independent check of a schedule: walk its start/end events in time order.

    At every start the destination must have room for the VM's configured memory (a migrating
    VM counts on both hosts), and no limit may be exceeded. Returns where each VM ends.
    """
    cap = {h.name: h.mem_capacity * lim.mem_overcommit for h in s.hosts}
    used: dict[str, float] = defaultdict(float)
    where = {v.name: v.host for v in s.vms}
    for v in s.vms:
        used[v.host] += v.mem
    events = []
    for m in waves.migrations:
        events.append((m.start_s + m.est_seconds, 0, m.id, m))  # ends first at equal times
        events.append((m.start_s, 1, m.id, m))
    events.sort(key=lambda e: e[:3])
    n_in: dict[str, int] = defaultdict(int)
    n_out: dict[str, int] = defaultdict(int)
    total = 0
    for _, kind, _, m in events:
        if kind == 1:
            assert where[m.vm] == m.source, f"{m.vm} starts from {m.source} but is on {where[m.vm]}"
            assert used[m.target] + m.mem_mb <= cap[m.target] + 1e-6, (
                f"{m.target} over capacity when {m.vm} starts: {used[m.target] + m.mem_mb} > "
                f"{cap[m.target]}")
            used[m.target] += m.mem_mb
            n_in[m.target] += 1
            n_out[m.source] += 1
            total += 1
            assert n_in[m.target] <= lim.max_incoming_per_host
            assert n_out[m.source] <= lim.max_outgoing_per_host
            assert total <= lim.max_concurrent
        else:
            used[m.source] -= m.mem_mb
            where[m.vm] = m.target
            n_in[m.target] -= 1
            n_out[m.source] -= 1
            total -= 1
    return where


def check(s: ClusterSnapshot, moves: list[Move], lim: PlannerLimits | None = None) -> Waves:
    lim = lim or PlannerLimits()
    waves = make_waves(s, moves, lim)
    end = replay(s, waves, lim)
    want = {v.name: v.host for v in s.vms} | {m.vm: m.target for m in moves}
    assert end == want
    assert waves.makespan_s == pytest.approx(max((m.end_s for m in waves.migrations), default=0))
    return waves


def random_target(s: ClusterSnapshot, n_moves: int, seed: int) -> list[Move]:
    """Moves to a random placement that fits every host (in the end, not necessarily mid-way)."""
    rng = random.Random(seed)
    cap = {h.name: h.mem_capacity for h in s.hosts}
    used: dict[str, int] = defaultdict(int)
    for v in s.vms:
        used[v.host] += v.mem
    moves = []
    for v in rng.sample(list(s.vms), min(n_moves, len(s.vms))):
        options = [h for h in cap if h != v.host and used[h] + v.mem <= cap[h]]
        if not options:
            continue
        t = rng.choice(options)
        used[t] += v.mem
        used[v.host] -= v.mem
        moves.append(Move(v.name, v.host, t, "random", v.mem))
    return moves


def test_swap_of_full_hosts_is_broken_by_parking_on_a_third_host():
    s = snap([host("a", mem=8 * GIB), host("b", mem=8 * GIB), host("c", mem=8 * GIB)],
             [vm("x", "a", mem=8 * GIB), vm("y", "b", mem=8 * GIB)])
    moves = [Move("x", "a", "b", "swap", 8 * GIB), Move("y", "b", "a", "swap", 8 * GIB)]
    waves = check(s, moves)
    assert waves.parked == ["x"]
    legs = [(m.vm, m.source, m.target, m.kind) for m in waves.migrations]
    assert legs == [("x", "a", "c", "park"), ("y", "b", "a", "move"), ("x", "c", "b", "unpark")]
    assert [m.wave for m in waves.migrations] == [0, 1, 2]


def test_swap_without_room_anywhere_is_unplannable_and_names_the_hosts():
    s = snap([host("a", mem=8 * GIB), host("b", mem=8 * GIB), host("c", mem=4 * GIB)],
             [vm("x", "a", mem=8 * GIB), vm("y", "b", mem=8 * GIB), vm("z", "c", mem=2 * GIB)])
    moves = [Move("x", "a", "b", "swap", 8 * GIB), Move("y", "b", "a", "swap", 8 * GIB)]
    with pytest.raises(UnplannableError) as info:
        make_waves(s, moves)
    assert sorted(info.value.culprits) == ["a", "b"]
    assert "a, b" in str(info.value) or "b, a" in str(info.value)


def test_parking_respects_mandatory_rules():
    hosts = [host(n, mem=8 * GIB) for n in "abcd"]
    vms = [vm("x", "a", mem=8 * GIB), vm("y", "b", mem=8 * GIB), vm("w", "c", mem=2 * GIB)]
    rules = [{"name": "keep-x", "type": "vm_host", "vms": ["x"], "hosts": ["a", "b", "d"]},
             {"name": "apart", "type": "anti_affinity", "vms": ["y", "w"]}]
    s = snap(hosts, vms, rules)
    moves = [Move("x", "a", "b", "swap", 8 * GIB), Move("y", "b", "a", "swap", 8 * GIB)]
    waves = check(s, moves)
    park = waves.migrations[0]
    assert park.kind == "park" and park.target == "d"  # c is not allowed for x, nor for y


def test_cycle_of_three_full_hosts():
    s = snap([host(n, mem=8 * GIB) for n in "abcd"],
             [vm("x", "a", mem=8 * GIB), vm("y", "b", mem=8 * GIB), vm("z", "c", mem=8 * GIB)])
    moves = [Move("x", "a", "b", "", 8 * GIB), Move("y", "b", "c", "", 8 * GIB),
             Move("z", "c", "a", "", 8 * GIB)]
    waves = check(s, moves)
    assert len(waves.parked) == 1


def test_limits_spread_moves_over_waves():
    hosts = [host("src", mem=64 * GIB)] + [host(f"d{i}", mem=64 * GIB) for i in range(4)]
    vms = [vm(f"v{i}", "src", mem=4 * GIB) for i in range(8)]
    s = snap(hosts, vms)
    moves = [Move(f"v{i}", "src", f"d{i % 4}", "", 4 * GIB) for i in range(8)]
    lim = PlannerLimits(max_outgoing_per_host=2, max_incoming_per_host=1, max_concurrent=16)
    waves = check(s, moves, lim)
    # all equal in size: the source sends two at a time, so four rounds
    assert len(waves.grouped()) == 4
    assert all(len(g) == 2 for g in waves.grouped())
    lim1 = PlannerLimits(max_outgoing_per_host=8, max_incoming_per_host=8, max_concurrent=3)
    waves1 = check(s, moves, lim1)
    assert max(len(g) for g in waves1.grouped()) <= 3


def test_estimates_come_from_the_migration_time_model():
    s = snap([host("a"), host("b")], [vm("x", "a", mem=16 * GIB, memd=4 * GIB)])
    lim = PlannerLimits(bandwidth_mbps=1000, dirty_rate_mbps=200, downtime_ms=100)
    waves = check(s, [Move("x", "a", "b", "", 16 * GIB)], lim)
    want = estimate(16 * GIB, 1000, dirty_rate_mbps=200, working_set_mb=4 * GIB,
                    downtime_ms=100).seconds
    assert waves.migrations[0].est_seconds == pytest.approx(want)
    assert waves.makespan_s == pytest.approx(want)
    fast = make_waves(s, [Move("x", "a", "b", "", 16 * GIB)], PlannerLimits(bandwidth_mbps=10000))
    assert fast.makespan_s < waves.makespan_s / 5


def test_a_migration_that_never_converges_is_unplannable():
    s = snap([host("a"), host("b")], [vm("x", "a", mem=16 * GIB, memd=8 * GIB)])
    with pytest.raises(UnplannableError, match="never converge") as info:
        make_waves(s, [Move("x", "a", "b", "", 16 * GIB)],
                   PlannerLimits(bandwidth_mbps=1000, dirty_rate_mbps=2000))
    assert info.value.culprits == ["x"]


@pytest.mark.parametrize("move,match", [
    (Move("nope", "a", "b", "", 1), "field 'vm': unknown VM 'nope'"),
    (Move("x", "b", "a", "", 1), "field 'from': the plan says b but the snapshot has the VM on a"),
    (Move("x", "a", "zz", "", 1), "field 'to': unknown host 'zz'"),
    (Move("x", "a", "m", "", 1), "field 'to': host m is maintenance"),
])
def test_bad_moves_name_the_field(move, match):
    s = snap([host("a"), host("b"), host("m", state="maintenance")], [vm("x", "a")])
    with pytest.raises(InputError, match=match):
        make_waves(s, [move])


def test_a_final_placement_over_capacity_is_refused():
    s = snap([host("a", mem=8 * GIB), host("b", mem=8 * GIB)],
             [vm("x", "a", mem=6 * GIB), vm("y", "b", mem=6 * GIB)])
    with pytest.raises(UnplannableError, match="host b: would hold 12288 MiB"):
        make_waves(s, [Move("x", "a", "b", "", 6 * GIB)])


def test_plan_json_round_trip():
    s = snap([host(n, mem=8 * GIB) for n in "abc"],
             [vm("x", "a", mem=8 * GIB), vm("y", "b", mem=8 * GIB)])
    plan_doc = {"migrations": [{"vm": "x", "from": "a", "to": "b", "reason": "r", "mem_mb": 8192},
                               {"vm": "y", "from": "b", "to": "a", "reason": "r", "mem_mb": 8192}],
                "efficacy": {}, "solver": {}, "notes": []}
    out = json.loads(json.dumps(add_waves(plan_doc, s)))
    assert out["migrations"] == plan_doc["migrations"]
    assert [w["wave"] for w in out["waves"]] == [0, 1, 2]
    first = out["waves"][0]["migrations"][0]
    assert set(first) == {"id", "vm", "from", "to", "mem_mb", "est_seconds", "start_s", "end_s",
                          "kind", "reason"}
    assert out["makespan_s"] == pytest.approx(out["waves"][-1]["migrations"][-1]["end_s"])
    assert out["planner"]["parked"] == ["x"]
    back = waves_from_plan(out, parse_snapshot(out["snapshot"]))
    assert [(m.vm, m.source, m.target, m.kind) for m in back.migrations] == [
        ("x", "a", "c", "park"), ("y", "b", "a", "move"), ("x", "c", "b", "unpark")]


def test_waves_from_plan_rejects_legs_that_do_not_chain():
    s = snap([host(n) for n in "abc"], [vm("x", "a")])
    bad = {"waves": [{"wave": 0, "migrations": [
        {"vm": "x", "from": "b", "to": "c", "mem_mb": 4096, "est_seconds": 1}]}]}
    with pytest.raises(InputError, match=r"waves\[0\].migrations\[0\]|migration 0 \(x\): "
                                         r"field 'from'"):
        waves_from_plan(bad, s)
    with pytest.raises(InputError, match="field 'est_seconds'"):
        waves_from_plan({"waves": [{"migrations": [
            {"vm": "x", "from": "a", "to": "c", "est_seconds": -1}]}]}, s)
    with pytest.raises(InputError, match="field 'migrations' must be a list"):
        moves_from_plan({"migrations": 3})


@pytest.mark.parametrize("seed", range(40))
def test_random_targets_are_planned_safely_or_reported(seed):
    rng = random.Random(seed)
    n_hosts = rng.randint(3, 7)
    hosts = [host(f"h{i}", mem=rng.choice([16, 24, 32]) * GIB) for i in range(n_hosts)]
    vms, used = [], defaultdict(int)
    for j in range(rng.randint(5, 60)):
        mem = rng.choice([2, 4, 8]) * GIB
        options = [h["name"] for h in hosts if used[h["name"]] + mem <= h["mem_capacity_mb"]]
        if not options:
            break
        h = rng.choice(options)
        used[h] += mem
        vms.append(vm(f"v{j:02d}", h, mem=mem))
    s = snap(hosts, vms)
    moves = random_target(s, rng.randint(1, len(vms)), seed)
    lim = PlannerLimits(max_incoming_per_host=rng.randint(1, 2),
                        max_outgoing_per_host=rng.randint(1, 2), max_concurrent=rng.randint(1, 6))
    try:
        check(s, moves, lim)
    except UnplannableError as exc:
        assert exc.culprits and "wait on each other" in str(exc)


@pytest.mark.parametrize("name,args,kw,solver", [
    ("16x200", (16, 200, 11), {}, "cpsat"),
    ("64x1000-rules", (64, 1000, 11), {"rules": True}, "cpsat"),
    ("500x10000", (500, 10000, 11), {}, "greedy"),
])
def test_engine_benchmark_clusters_never_go_over_memory(name, args, kw, solver):
    s = parse_snapshot(generate(*args, **kw))
    result = plan(s, det(threshold=5, solver=solver) if solver == "cpsat"
                  else PlanOptions(threshold=5, solver="greedy"))
    assert result.moves
    waves = check(s, result.moves)
    assert waves.makespan_s > 0


def test_random_targets_on_a_large_cluster():
    s = parse_snapshot(generate(64, 1000, 5))
    moves = random_target(s, 600, 5)
    waves = check(s, moves)
    assert len(waves.migrations) >= len(moves)


def test_cli_plan_waves_are_executable(tmp_path):
    """The documented one-line change in ``balancer plan``: ``add_waves`` on its output."""
    d = doc([host(n, mem=8 * GIB) for n in "abc"],
            [vm("x", "a", mem=4 * GIB), vm("y", "a", mem=4 * GIB, cpu=3.5),
             vm("z", "b", mem=2 * GIB)])
    (tmp_path / "s.json").write_text(json.dumps(d))
    out = subprocess.run([sys.executable, "-m", "balancer.cli", "plan", str(tmp_path / "s.json"),
                          "--solver", "greedy", "--threshold", "5"],
                         capture_output=True, text=True, check=True)
    plan_doc = json.loads(out.stdout)
    with_waves = add_waves(plan_doc, parse_snapshot(d))
    assert len(with_waves["waves"]) >= (1 if plan_doc["migrations"] else 0)
    assert sum(len(w["migrations"]) for w in with_waves["waves"]) >= len(plan_doc["migrations"])


def test_evacuations_go_first():
    s = snap([host("m", mem=64 * GIB, state="maintenance"), host("a", mem=64 * GIB),
              host("b", mem=64 * GIB)],
             [vm("small", "m", mem=2 * GIB), vm("big1", "a", mem=16 * GIB),
              vm("big2", "a", mem=16 * GIB)])
    moves = [Move("big1", "a", "b", "", 16 * GIB), Move("big2", "a", "b", "", 16 * GIB),
             Move("small", "m", "b", "evacuates m", 2 * GIB)]
    waves = check(s, moves, PlannerLimits(max_incoming_per_host=1))
    assert [m.vm for m in waves.migrations] == ["small", "big1", "big2"]
    assert waves.migrations[0].start_s == 0.0
