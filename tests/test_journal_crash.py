"""Crash test: ``balancer execute`` killed with SIGKILL at 20 seeded points of a 50-migration
plan, then restarted. After each restart: no migration lost or run twice, every VM on exactly
one host, and the journal agrees with where the VMs are.

The executor runs as a real subprocess; the simulated cluster lives in a SQLite file
(``simulated.state_path``) so the restarted executor sees where the VMs really are, and
migrations in flight carry on in simulated time while it is down. The kill comes from the
simulated backend's ``kill_executor_at_call`` fault (SIGKILL of the executor's own process at
its N-th backend call, just before or just after the call takes effect), so each point is
exact and reproducible; a second test kills from outside at seeded wall-clock moments.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from balancer.executor.config import parse_config
from balancer.executor.journal import Journal
from balancer.executor.runner import Runner
from balancer.executor.simulated import SimulatedBackend
from balancer.model import Move
from balancer.planner import add_waves, waves_from_plan
from balancer.snapshot import parse_snapshot
from simulator.generate import generate

N_MIGRATIONS = 50
KILLS = 20
RETRY = 2  # attempts per migration
CONFIG = {
    "limits": {"max_concurrent": 6},
    "migration": {"bandwidth_mbps": 5000, "timeout_min_s": 60},
    "retry": {"attempts": RETRY, "backoff_s": 3},
    "journal": {"synchronous": "normal"},
    "simulated": {"seed": 5, "faults": {"failure_rate": 0.1, "dest_death_rate": 0.05}},
}


def toml(d: dict, prefix: str = "") -> str:
    out, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            out.append(f"{k} = {json.dumps(v)}")
    text = "\n".join(out) + "\n"
    for k, v in tables:
        name = f"{prefix}{k}"
        text += f"[{name}]\n" + toml(v, name + ".")
    return text


@pytest.fixture(scope="module")
def plan_doc() -> dict:
    """A 50-migration plan on a 10-host cluster (random moves that fit in the end)."""
    s = parse_snapshot(generate(10, 120, 4))
    rng = random.Random(4)
    cap = {h.name: h.mem_capacity for h in s.hosts}
    used = Counter()
    for v in s.vms:
        used[v.host] += v.mem
    moves: list[Move] = []
    for v in rng.sample(list(s.vms), len(s.vms)):
        options = [h for h in cap if h != v.host and used[h] + v.mem <= cap[h]]
        if options and len(moves) < N_MIGRATIONS:
            t = rng.choice(options)
            used[t] += v.mem
            used[v.host] -= v.mem
            moves.append(Move(v.name, v.host, t, "", v.mem))
    d = {"migrations": [{"vm": m.vm, "from": m.source, "to": m.target, "mem_mb": m.mem}
                        for m in moves]}
    out = add_waves(d, s)
    assert sum(len(w["migrations"]) for w in out["waves"]) == N_MIGRATIONS
    return out


def config(tmp: Path, **faults: object) -> Path:
    c = json.loads(json.dumps(CONFIG))
    c["simulated"]["state_path"] = str(tmp / "cluster.sqlite")
    c["simulated"]["faults"].update(faults)
    c["journal"]["path"] = str(tmp / "journal.sqlite")
    path = tmp / f"exec-{len(list(tmp.glob('exec-*')))}.toml"
    path.write_text(toml(c))
    return path


def execute(plan: Path, cfg: Path, **kw: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "balancer.cli", "execute", str(plan),
                             "--config", str(cfg), "--quiet", "--format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


class Counting(SimulatedBackend):
    """Notes the call number of every ``start``."""

    start_calls: list[int]

    def start(self, request):  # type: ignore[no-untyped-def]
        self.start_calls.append(self.calls + 1)
        return super().start(request)


def backend_calls(plan_doc: dict, tmp: Path) -> tuple[int, list[int]]:
    """How many backend calls an uninterrupted run makes, and which of them are ``start``
    (the runs are deterministic, so a subprocess makes the same calls)."""
    c = parse_config(json.loads(json.dumps(CONFIG)))
    s = parse_snapshot(plan_doc["snapshot"])
    backend = Counting.from_snapshot(s, c, persist=False)
    backend.start_calls = []
    runner = Runner(backend, Journal(tmp / "count.sqlite"), c,
                    {h.name: float(h.mem_capacity) for h in s.hosts})
    runner.run(waves_from_plan(plan_doc, s))
    return backend.calls, backend.start_calls


def check_promises(plan_doc: dict, tmp: Path) -> dict:
    s = parse_snapshot(plan_doc["snapshot"])
    cluster = sqlite3.connect(tmp / "cluster.sqlite")
    hosts = {h for (h,) in cluster.execute("SELECT name FROM hosts")}
    vms = dict(cluster.execute("SELECT name, host FROM vms"))
    # every VM on exactly one known host; none lost
    assert sorted(vms) == sorted(v.name for v in s.vms)
    assert set(vms.values()) <= hosts
    active = cluster.execute("SELECT count(*) FROM migrations WHERE status='active'").fetchone()
    assert active == (0,)
    starts = Counter(cluster.execute("SELECT vm, source, target FROM starts").fetchall())
    completed = Counter(cluster.execute(
        "SELECT vm, source, target FROM migrations WHERE status='completed'").fetchall())
    journal = sqlite3.connect(tmp / "journal.sqlite")
    rows = journal.execute("SELECT vm, source, target, state, attempts, reason FROM migrations"
                           ).fetchall()
    assert len(rows) == N_MIGRATIONS
    states = Counter()
    for vm, src, dst, state, attempts, reason in rows:
        states[state] += 1
        # nothing forgotten: every entry reached a final state
        assert state in ("succeeded", "failed", "skipped", "cancelled"), (vm, state)
        # nothing run twice: no more starts than recorded attempts, never above the limit
        assert starts[(vm, src, dst)] <= attempts <= RETRY, (vm, starts[(vm, src, dst)], attempts)
        # the journal agrees with the cluster
        assert completed[(vm, src, dst)] == (1 if state == "succeeded" else 0), (vm, state, reason)
        assert vms[vm] == (dst if state == "succeeded" else src), (vm, state, vms[vm])
    return dict(states)


def test_killed_at_20_points_and_restarted_nothing_lost_or_duplicated(plan_doc, tmp_path):
    total, start_calls = backend_calls(plan_doc, tmp_path)
    assert len(start_calls) >= N_MIGRATIONS
    rng = random.Random(2026)
    # half anywhere (mostly polls and waits), half at a start: the riskiest moment, when the
    # backend has or has not begun a migration the journal has no handle for yet
    points = sorted(rng.sample(range(1, total + 1), KILLS // 2)
                    + rng.sample(start_calls, KILLS // 2))
    outcomes = Counter()
    for i, k in enumerate(points):
        tmp = tmp_path / f"kill-{i:02d}-at-{k}"
        tmp.mkdir()
        plan = tmp / "plan.json"
        plan.write_text(json.dumps(plan_doc))
        phase = rng.choice(["before", "after"])
        p = execute(plan, config(tmp, kill_executor_at_call=k, kill_phase=phase))
        p.communicate(timeout=120)
        assert p.returncode == -signal.SIGKILL, f"not killed at call {k} ({phase})"
        if i % 4 == 3:  # killed again during recovery, at a later point of the restarted run
            p = execute(plan, config(tmp, kill_executor_at_call=rng.randint(1, 40),
                                     kill_phase=phase))
            p.communicate(timeout=120)
            assert p.returncode in (-signal.SIGKILL, 0, 4)
        p = execute(plan, config(tmp))
        out, err = p.communicate(timeout=120)
        assert p.returncode in (0, 4), err
        summary = json.loads(out)
        assert summary["counts"]["planned"] == summary["counts"]["running"] == 0
        states = check_promises(plan_doc, tmp)
        outcomes.update(states)
    # the faults and the kills did not turn the run into a no-op
    assert outcomes["succeeded"] > KILLS * N_MIGRATIONS * 0.7


def test_killed_from_outside_at_wall_clock_moments(plan_doc, tmp_path):
    """SIGKILL from another process while simulated time runs at wall speed x 0.03."""
    rng = random.Random(7)
    for i in range(3):
        tmp = tmp_path / f"outside-{i}"
        tmp.mkdir()
        plan = tmp / "plan.json"
        plan.write_text(json.dumps(plan_doc))
        cfg = config(tmp)
        text = cfg.read_text().replace("time_scale = 0.0", "")
        cfg.write_text(text.replace("[simulated]\n", "[simulated]\ntime_scale = 0.03\n"))
        p = execute(plan, cfg)
        time.sleep(0.8 + rng.random() * 1.2)
        os.kill(p.pid, signal.SIGKILL)
        p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL  # it was still running
        p = execute(plan, config(tmp))
        out, err = p.communicate(timeout=120)
        assert p.returncode in (0, 4), err
        check_promises(plan_doc, tmp)
