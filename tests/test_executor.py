"""The runner through the simulated backend, the journal, and ``balancer execute``."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from balancer.errors import InputError
from balancer.executor.base import Backend, MigrationStatus
from balancer.executor.config import ExecutorConfig, load_config, parse_config
from balancer.executor.journal import Journal, Phase, State
from balancer.executor.runner import Runner, RunSummary, entries_for
from balancer.executor.simulated import SimulatedBackend
from balancer.model import ClusterSnapshot, Move
from balancer.planner import PlannerLimits, Waves, add_waves, make_waves, plan_fingerprint
from balancer.snapshot import to_dict
from simulator.generate import generate

from conftest import doc, host, snap, vm

GIB = 1024
ROOT = Path(__file__).parents[1]


def cfg(**sections: dict[str, Any]) -> ExecutorConfig:
    return parse_config(sections)


def spread_cluster(n_src: int = 2, n_dst: int = 4, per_src: int = 6) -> tuple[ClusterSnapshot,
                                                                                list[Move]]:
    hosts = [host(f"s{i}", mem=64 * GIB) for i in range(n_src)] + \
        [host(f"d{i}", mem=64 * GIB) for i in range(n_dst)]
    vms, moves = [], []
    for i in range(n_src):
        for j in range(per_src):
            name = f"v{i}-{j}"
            vms.append(vm(name, f"s{i}", mem=4 * GIB))
            moves.append(Move(name, f"s{i}", f"d{(i * per_src + j) % n_dst}", "", 4 * GIB))
    return snap(hosts, vms), moves


def limits_of(c: ExecutorConfig) -> PlannerLimits:
    return PlannerLimits(c.limits.max_incoming_per_host, c.limits.max_outgoing_per_host,
                         c.limits.max_concurrent, c.limits.mem_overcommit,
                         c.migration.bandwidth_mbps, c.migration.dirty_rate_mbps,
                         c.migration.downtime_ms)


def execute(s: ClusterSnapshot, waves: Waves, c: ExecutorConfig, tmp_path: Path,
            backend: Any = None, **kw: Any) -> tuple[RunSummary, Any, Journal]:
    backend = backend or SimulatedBackend.from_snapshot(s, c)
    journal = Journal(tmp_path / "journal.sqlite", synchronous="normal")
    runner = Runner(backend, journal, c, {h.name: float(h.mem_capacity) for h in s.hosts}, **kw)
    return runner.run(waves), backend, journal


def placement(backend: SimulatedBackend) -> dict[str, str]:
    return {v.name: v.host for v in backend.inventory()}


def max_overlap(backend: SimulatedBackend) -> tuple[dict[str, int], dict[str, int], int]:
    """Most migrations ever in flight at once: into each host, out of each, in all."""
    events = []
    for m in backend.migrations.values():
        events.append((m.ended, 0, m))
        events.append((m.start, 1, m))
    events.sort(key=lambda e: (e[0], e[1]))
    n_in: dict[str, int] = defaultdict(int)
    n_out: dict[str, int] = defaultdict(int)
    peak_in: dict[str, int] = defaultdict(int)
    peak_out: dict[str, int] = defaultdict(int)
    total = peak = 0
    for _, kind, m in events:
        d = 1 if kind else -1
        n_in[m.target] += d
        n_out[m.source] += d
        total += d
        peak_in[m.target] = max(peak_in[m.target], n_in[m.target])
        peak_out[m.source] = max(peak_out[m.source], n_out[m.source])
        peak = max(peak, total)
    return peak_in, peak_out, peak


def test_a_plan_runs_to_the_target_placement_within_the_limits(tmp_path):
    c = cfg(limits={"max_incoming_per_host": 2, "max_outgoing_per_host": 2,
                    "max_concurrent": 5})
    # many sources into two hosts: the incoming limit binds
    s, moves = spread_cluster(n_src=4, n_dst=2, per_src=3)
    waves = make_waves(s, moves, limits_of(c))
    summary, backend, journal = execute(s, waves, c, tmp_path)
    assert summary.ok and summary.counts["succeeded"] == len(moves)
    assert placement(backend) == {v.name: v.host for v in s.vms} | {m.vm: m.target for m in moves}
    peak_in, peak_out, peak = max_overlap(backend)
    assert max(peak_in.values()) == 2 and max(peak_out.values()) <= 2 and peak <= 5
    # one source into many hosts: the outgoing limit binds
    (tmp_path / "out").mkdir()
    s, moves = spread_cluster(n_src=1, n_dst=4, per_src=8)
    summary, backend, journal = execute(s, make_waves(s, moves, limits_of(c)), c,
                                        tmp_path / "out")
    assert summary.ok
    peak_in, peak_out, peak = max_overlap(backend)
    assert max(peak_out.values()) == 2 and max(peak_in.values()) <= 2
    # many sources into many hosts: the cluster-wide limit binds
    (tmp_path / "all").mkdir()
    s, moves = spread_cluster(n_src=4, n_dst=4, per_src=4)
    summary, backend, journal = execute(s, make_waves(s, moves, limits_of(c)), c,
                                        tmp_path / "all")
    assert summary.ok
    assert max_overlap(backend)[2] == 5
    # the simulated clock moved by the migrations' durations; nothing slept
    assert summary.clock_s >= waves.makespan_s * 0.9
    assert summary.wall_s < summary.clock_s


def test_the_journal_commits_every_step_in_order(tmp_path):
    s, moves = spread_cluster(1, 1, 2)
    c = cfg()
    waves = make_waves(s, moves)
    summary, _, journal = execute(s, waves, c, tmp_path)
    steps = [(state, phase) for _, _, state, phase, _, _ in journal.events(summary.plan_id, 0)]
    assert steps == [("planned", ""), ("running", "starting"), ("running", "migrating"),
                     ("succeeded", "")]
    mode = sqlite3.connect(tmp_path / "journal.sqlite").execute("PRAGMA journal_mode").fetchone()
    assert mode == ("wal",)
    # a second run of the same plan finds it done and starts nothing
    backend2 = SimulatedBackend.from_snapshot(s, c)
    again = Runner(backend2, journal, c, {h.name: float(h.mem_capacity) for h in s.hosts}).run(
        waves)
    assert again.counts["succeeded"] == len(moves) and backend2.starts == []


def test_parking_legs_run_in_order(tmp_path):
    s = snap([host(n, mem=8 * GIB) for n in "abc"],
             [vm("x", "a", mem=8 * GIB), vm("y", "b", mem=8 * GIB)])
    waves = make_waves(s, [Move("x", "a", "b", "", 8 * GIB), Move("y", "b", "a", "", 8 * GIB)])
    summary, backend, _ = execute(s, waves, cfg(), tmp_path)
    assert summary.ok and placement(backend) == {"x": "b", "y": "a"}
    assert [(vm_, src, dst) for _, vm_, src, dst, _ in backend.starts] == [
        ("x", "a", "c"), ("y", "b", "a"), ("x", "c", "b")]


def test_stale_moves_are_skipped_with_a_reason(tmp_path):
    s = snap([host("a"), host("b", mem=16 * GIB), host("c")],
             [vm("x", "a", mem=4 * GIB), vm("y", "a", mem=8 * GIB), vm("big", "c", mem=12 * GIB)])
    waves = make_waves(s, [Move("x", "a", "c", "", 4 * GIB), Move("y", "a", "b", "", 8 * GIB)])
    c = cfg()
    backend = SimulatedBackend.from_snapshot(s, c)
    # the world changes after planning: x is moved away by someone else, b fills up
    backend.vms["x"][0] = "b"
    backend.vms["big"][0] = "b"
    summary, backend, _ = execute(s, waves, c, tmp_path, backend=backend)
    by_vm = {e.vm: e for e in summary.entries}
    assert by_vm["x"].state is State.SKIPPED
    assert "VM x is on b, not on its source a" in by_vm["x"].reason
    assert by_vm["y"].state is State.SKIPPED
    assert "no room on b" in by_vm["y"].reason
    assert placement(backend)["y"] == "a" and backend.starts == []
    assert summary.ok  # stale moves are not failures


def test_failures_leave_vms_on_their_source_and_retries_recover(tmp_path):
    s, moves = spread_cluster(2, 4, 8)
    faults = {"failure_rate": 0.3, "dest_death_rate": 0.1}
    c0 = cfg(simulated={"seed": 2, "faults": faults})
    waves = make_waves(s, moves)
    (tmp_path / "no-retry").mkdir()
    summary, backend, _ = execute(s, waves, c0, tmp_path / "no-retry")
    failed = [e for e in summary.entries if e.state is State.FAILED]
    assert failed and not summary.ok
    where = placement(backend)
    for e in summary.entries:
        assert where[e.vm] == (e.target if e.state is State.SUCCEEDED else e.source)
    reasons = Counter("Broken pipe" in e.reason for e in failed)
    assert reasons[True] and reasons[False]  # both kinds of fault were injected
    assert all(e.attempts == 1 for e in summary.entries)

    c3 = cfg(simulated={"seed": 2, "faults": faults},
             retry={"attempts": 4, "backoff_s": 7, "backoff_factor": 2})
    (tmp_path / "retry").mkdir()
    summary3, backend3, journal3 = execute(s, waves, c3, tmp_path / "retry")
    n_failed3 = summary3.counts["failed"]
    assert n_failed3 < len(failed)
    assert max(e.attempts for e in summary3.entries) > 1
    # each retry waited its backoff: 7 s after the first failure, 14 s after the second
    ends = {m.token: m.ended for m in backend3.migrations.values()}
    by_vm: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for token, vm_, _, _, clock in backend3.starts:
        by_vm[vm_].append((clock, token))
    for starts in by_vm.values():
        for k in range(1, len(starts)):
            prev_end = ends[starts[k - 1][1]]
            assert starts[k][0] >= prev_end + 7 * 2 ** (k - 1) - 1e-9
    where3 = placement(backend3)
    assert len(where3) == len(s.vms) and set(where3.values()) <= {h.name for h in s.hosts}
    for e in summary3.entries:
        assert where3[e.vm] == (e.target if e.state is State.SUCCEEDED else e.source)


def test_timeouts_cancel_migrations_that_never_converge(tmp_path):
    s, moves = spread_cluster(1, 2, 3)
    c = cfg(simulated={"faults": {"nonconvergence_rate": 1.0}},
            migration={"timeout_min_s": 20, "timeout_factor": 2})
    summary, backend, _ = execute(s, make_waves(s, moves), c, tmp_path)
    assert summary.counts["failed"] == 3
    assert all("MigrationTimeout" in e.reason for e in summary.entries)
    assert all(m.status is MigrationStatus.CANCELLED for m in backend.migrations.values())
    assert all(20 <= m.ended - m.start <= 21 for m in backend.migrations.values())
    assert placement(backend) == {v.name: v.host for v in s.vms}


def test_cancel_stops_the_run_and_loses_nothing(tmp_path):
    s, moves = spread_cluster(2, 4, 6)
    c = cfg(limits={"max_concurrent": 3})
    runner_box: list[Runner] = []
    starts = []

    def on_event(kind, entry, progress):
        if kind == "start":
            starts.append(entry.id)
            if len(starts) == 4:
                runner_box[0].cancel()

    backend = SimulatedBackend.from_snapshot(s, c)
    journal = Journal(tmp_path / "j.sqlite")
    runner = Runner(backend, journal, c, {h.name: float(h.mem_capacity) for h in s.hosts},
                    on_event=on_event)
    runner_box.append(runner)
    summary = runner.run(make_waves(s, moves))
    assert summary.counts["cancelled"] >= len(moves) - 4
    assert summary.counts["planned"] == summary.counts["running"] == 0
    assert len(backend.starts) == 4
    assert sum(m.status is MigrationStatus.CANCELLED for m in backend.migrations.values()) >= 1
    where = placement(backend)
    for e in summary.entries:
        assert where[e.vm] == (e.target if e.state is State.SUCCEEDED else e.source)


def test_cancel_a_single_migration(tmp_path):
    s, moves = spread_cluster(1, 2, 2)
    c = cfg()
    box: list[Runner] = []

    def on_event(kind, entry, progress):
        if kind == "progress" and entry.id == 0 and progress.percent > 20:
            box[0].cancel(entry.plan_id, [0])

    backend = SimulatedBackend.from_snapshot(s, c)
    runner = Runner(backend, Journal(tmp_path / "j.sqlite"), c,
                    {h.name: float(h.mem_capacity) for h in s.hosts}, on_event=on_event)
    box.append(runner)
    summary = runner.run(make_waves(s, moves))
    states = {e.id: e.state for e in summary.entries}
    assert states[0] is State.CANCELLED and states[1] is State.SUCCEEDED


def test_runs_are_deterministic_with_a_seed(tmp_path):
    s, moves = spread_cluster(2, 4, 8)
    c = cfg(simulated={"seed": 9, "faults": {"failure_rate": 0.2, "slow_link_rate": 0.3}},
            retry={"attempts": 2, "backoff_s": 1})
    waves = make_waves(s, moves)
    out = []
    for k in range(2):
        (tmp_path / str(k)).mkdir()
        summary, backend, _ = execute(s, waves, c, tmp_path / str(k))
        d = summary.to_dict()
        d.pop("wall_s")
        out.append((d, backend.starts))
    assert out[0] == out[1]


class Blind:
    """A backend without ``find_migration``: recovery must fall back on ``locate``."""

    def __init__(self, inner: SimulatedBackend) -> None:
        self.inner = inner
        self.name = "blind"

    def __getattr__(self, name: str) -> Any:
        if name == "find_migration":
            raise AttributeError(name)
        return getattr(self.inner, name)


@pytest.mark.parametrize("finder", [True, False])
def test_recovery_of_a_start_whose_handle_was_never_recorded(tmp_path, finder):
    """Killed between ``start`` and the commit of its token: the migration is not started again."""
    s, moves = spread_cluster(1, 1, 1)
    c = cfg(migration={"timeout_min_s": 100})
    waves = make_waves(s, moves)
    backend = SimulatedBackend.from_snapshot(s, c)
    journal = Journal(tmp_path / "j.sqlite")
    plan_id = plan_fingerprint(waves)
    [e] = journal.open_plan(plan_id, entries_for(waves, plan_id), "")
    e.state, e.phase, e.attempts, e.started_at = State.RUNNING, Phase.STARTING, 1, 0.0
    journal.record(e, clock=0.0)
    backend.start(make_request(e))  # the backend started it; the journal never heard back
    b: Backend = backend if finder else Blind(backend)  # type: ignore[assignment]
    summary = Runner(b, journal, c, {h.name: float(h.mem_capacity) for h in s.hosts}).run(waves)
    assert summary.counts["succeeded"] == 1
    assert len(backend.starts) == 1


@pytest.mark.parametrize("finder", [True, False])
def test_recovery_of_a_start_that_never_reached_the_backend(tmp_path, finder):
    s, moves = spread_cluster(1, 1, 1)
    c = cfg(migration={"timeout_min_s": 50})
    waves = make_waves(s, moves)
    backend = SimulatedBackend.from_snapshot(s, c)
    journal = Journal(tmp_path / "j.sqlite")
    plan_id = plan_fingerprint(waves)
    [e] = journal.open_plan(plan_id, entries_for(waves, plan_id), "")
    e.state, e.phase, e.attempts, e.started_at = State.RUNNING, Phase.STARTING, 1, 0.0
    journal.record(e, clock=0.0)
    b: Backend = backend if finder else Blind(backend)  # type: ignore[assignment]
    summary = Runner(b, journal, c, {h.name: float(h.mem_capacity) for h in s.hosts}).run(waves)
    [e] = summary.entries
    if finder:
        # The backend says nothing ever started: not an attempt; planned again and run once.
        assert e.state is State.SUCCEEDED and e.attempts == 1
        assert len(backend.starts) == 1
        assert placement(backend)[e.vm] == e.target
        details = [ev[5] for ev in journal.events(plan_id, e.id)]
        assert any("never reached the backend" in d for d in details)
    else:  # cannot ask: watched until the timeout, then a failed attempt, never started
        assert e.state is State.FAILED and backend.starts == []
        assert "outcome unknown" in e.reason
        assert placement(backend)[e.vm] == e.source


def make_request(e):
    from balancer.executor.base import MigrationRequest

    return MigrationRequest(e.vm, e.source, e.target, e.mem_mb)


def test_a_new_plan_supersedes_an_unfinished_one(tmp_path):
    s, moves = spread_cluster(1, 2, 4)
    c = cfg()
    old = make_waves(s, moves[:2])
    backend = SimulatedBackend.from_snapshot(s, c)
    journal = Journal(tmp_path / "j.sqlite")
    old_id = plan_fingerprint(old)
    journal.open_plan(old_id, entries_for(old, old_id), "")
    new = make_waves(s, moves[2:])
    summary = Runner(backend, journal, c, {h.name: float(h.mem_capacity) for h in s.hosts}).run(
        new)
    assert summary.counts["succeeded"] == 2
    assert {e.state for e in journal.entries(old_id)} == {State.CANCELLED}
    assert all("superseded" in e.reason for e in journal.entries(old_id))


# -- config ------------------------------------------------------------------------------
@pytest.mark.parametrize("data,match", [
    ({"limits": {"max_incoming_per_host": 0}},
     "field 'limits.max_incoming_per_host': input should be greater than or equal to 1, got 0"),
    ({"limits": {"max_inbound": 2}}, "field 'limits.max_inbound': unknown field"),
    ({"retry": {"attempts": "x"}}, "field 'retry.attempts': input should be a valid integer"),
    ({"journal": {"synchronous": "off"}}, "field 'journal.synchronous'"),
    ({"simulated": {"faults": {"failure_rate": 0.8, "dest_death_rate": 0.5}}},
     "failure_rate \\+ dest_death_rate \\+ nonconvergence_rate must be <= 1"),
])
def test_config_errors_name_the_field(data, match):
    with pytest.raises(InputError, match=match):
        parse_config(data, source="exec.toml")


def test_the_example_config_is_valid_and_documented():
    path = ROOT / "configs/executor-simulated.toml"
    c = load_config(path)
    assert c.limits.max_incoming_per_host == 2 and c.retry.attempts == 1
    text = path.read_text()
    for key in ExecutorConfig.model_fields:
        if key != "backend":
            assert f"[{key}]" in text
    for section in ("limits", "migration", "retry", "journal", "simulated"):
        for key in type(getattr(c, section)).model_fields:
            assert f"{key} =" in text or f"[{section}.{key}]" in text, key


# -- CLI ---------------------------------------------------------------------------------
def cli(*args: str, stdin: str | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "balancer.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture
def small_plan(tmp_path) -> tuple[Path, Path]:
    s, moves = spread_cluster(1, 2, 4)
    snap_path = tmp_path / "snap.json"
    snap_path.write_text(json.dumps(to_dict(s)))
    plan_doc = {"migrations": [{"vm": m.vm, "from": m.source, "to": m.target, "reason": "",
                                "mem_mb": m.mem} for m in moves]}
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(add_waves(plan_doc, s)))
    return plan_path, snap_path


def test_cli_execute_runs_a_plan_and_keeps_a_journal(tmp_path, small_plan):
    plan_path, _ = small_plan
    out = cli("execute", str(plan_path), "--journal", str(tmp_path / "j.sqlite"),
              "--format", "json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["counts"]["succeeded"] == 4 and not summary["dry_run"]
    # live progress without a terminal: one line per event, no bar redrawn between them
    assert "start #0 v0-0 s0->d0 (wave 0, attempt 1)" in out.stderr
    assert "succeeded #0 v0-0 s0->d0" in out.stderr
    assert "\r" not in out.stderr and not re.search(r"#\d+ \d+% \d+Mb/s", out.stderr)
    rows = sqlite3.connect(tmp_path / "j.sqlite").execute(
        "SELECT state, count(*) FROM migrations GROUP BY state").fetchall()
    assert rows == [("succeeded", 4)]


def test_cli_progress_bar_on_a_terminal(tmp_path, small_plan):
    """On a terminal: the bar with the migrations in flight (percent, rate) and the events."""
    import pty

    plan_path, _ = small_plan
    (tmp_path / "slow.toml").write_text("[simulated]\ntime_scale = 0.05\n")
    master, slave = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "balancer.cli", "execute", str(plan_path),
                             "--config", str(tmp_path / "slow.toml"), "--journal",
                             str(tmp_path / "j.sqlite")], stdout=subprocess.PIPE,
                            stderr=slave, text=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    seen = b"".join(chunks).decode(errors="replace")
    assert "succeeded #0 v0-0 s0->d0" in seen and "mig" in seen
    assert re.search(r"#\d+ \d+% \d+Mb/s", seen)


def test_cli_dry_run_moves_nothing_and_writes_no_journal(tmp_path, small_plan):
    plan_path, _ = small_plan
    out = cli("execute", str(plan_path), "--dry-run", "--backend", "qemu", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "dry run: nothing moved" in out.stdout and "succeeded 4" in out.stdout
    assert not list(tmp_path.glob("*.sqlite*"))


def test_cli_plan_piped_into_execute(tmp_path):
    d = generate(6, 40, 2)
    (tmp_path / "s.json").write_text(json.dumps(d))
    planned = cli("plan", str(tmp_path / "s.json"), "--solver", "greedy", "--threshold", "5")
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout)["migrations"]
    out = cli("execute", "-", "--snapshot", str(tmp_path / "s.json"), "--quiet",
              "--journal", str(tmp_path / "j.sqlite"), stdin=planned.stdout)
    assert out.returncode == 0, out.stderr
    n = len(json.loads(planned.stdout)["migrations"])
    assert f"migrations {n}: succeeded {n}" in out.stdout
    assert out.stderr == ""


def test_cli_reports_failed_migrations_with_exit_4(tmp_path, small_plan):
    plan_path, _ = small_plan
    (tmp_path / "c.toml").write_text("[simulated.faults]\nfailure_rate = 1.0\n")
    out = cli("execute", str(plan_path), "--config", str(tmp_path / "c.toml"), "--quiet",
              "--journal", str(tmp_path / "j.sqlite"))
    assert out.returncode == 4
    assert "failed 4" in out.stdout and "MigrationFailed" in out.stdout


@pytest.mark.parametrize("setup,code,message", [
    (lambda p: ["--config", str(p / "bad.toml")], 2,
     "field 'limits.max_concurrent': input should be greater than or equal to 1, got 0"),
    (lambda p: ["--config", str(p / "missing.toml")], 2, "missing.toml: no such file"),
    (lambda p: ["--backend", "vmware"], 2, "invalid choice: 'vmware'"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, small_plan, setup, code, message):
    plan_path, _ = small_plan
    (tmp_path / "bad.toml").write_text("[limits]\nmax_concurrent = 0\n")
    out = cli("execute", str(plan_path), *setup(tmp_path))
    assert out.returncode == code
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_cli_plan_without_snapshot_or_waves(tmp_path, small_plan):
    plan_path, snap_path = small_plan
    bare = {"migrations": json.loads(plan_path.read_text())["migrations"]}
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    out = cli("execute", str(tmp_path / "bare.json"), "--quiet")
    assert out.returncode == 2 and "field 'snapshot' is missing" in out.stderr
    out = cli("execute", str(tmp_path / "bare.json"), "--snapshot", str(snap_path), "--quiet",
              "--journal", str(tmp_path / "j.sqlite"))
    assert out.returncode == 0 and "succeeded 4" in out.stdout  # waves planned on the fly
    (tmp_path / "junk.json").write_text("{not json")
    out = cli("execute", str(tmp_path / "junk.json"))
    assert out.returncode == 2 and "not valid JSON" in out.stderr


def test_cli_unplannable_swap_exits_3(tmp_path):
    d = doc([host("a", mem=8 * GIB), host("b", mem=8 * GIB)],
            [vm("x", "a", mem=8 * GIB), vm("y", "b", mem=8 * GIB)])
    (tmp_path / "s.json").write_text(json.dumps(d))
    plan_doc = {"migrations": [{"vm": "x", "from": "a", "to": "b"},
                               {"vm": "y", "from": "b", "to": "a"}]}
    (tmp_path / "p.json").write_text(json.dumps(plan_doc))
    out = cli("execute", str(tmp_path / "p.json"), "--snapshot", str(tmp_path / "s.json"))
    assert out.returncode == 3
    assert "hosts a, b wait on each other" in out.stderr


def test_cli_sigint_cancels_the_run_and_reports_it(tmp_path):
    s, moves = spread_cluster(2, 4, 8)
    plan_doc = {"migrations": [{"vm": m.vm, "from": m.source, "to": m.target, "mem_mb": m.mem}
                               for m in moves]}
    (tmp_path / "plan.json").write_text(json.dumps(add_waves(plan_doc, s)))
    (tmp_path / "c.toml").write_text(
        f'[simulated]\ntime_scale = 0.2\nstate_path = "{tmp_path / "cluster.sqlite"}"\n'
        f'[journal]\npath = "{tmp_path / "j.sqlite"}"\n')
    p = subprocess.Popen([sys.executable, "-m", "balancer.cli", "execute",
                          str(tmp_path / "plan.json"), "--config", str(tmp_path / "c.toml"),
                          "--format", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until migrations are in flight
        time.sleep(0.1)
        try:
            running = sqlite3.connect(tmp_path / "j.sqlite").execute(
                "SELECT count(*) FROM migrations WHERE state='running'").fetchone()[0]
        except sqlite3.OperationalError:  # not created yet
            continue
        if running:
            break
    p.send_signal(2)  # SIGINT
    out, err = p.communicate(timeout=60)
    assert p.returncode == 4, err
    summary = json.loads(out)
    assert summary["counts"]["cancelled"] > 0
    assert summary["counts"]["planned"] == summary["counts"]["running"] == 0
    cluster = sqlite3.connect(tmp_path / "cluster.sqlite")
    where = dict(cluster.execute("SELECT name, host FROM vms"))
    assert cluster.execute("SELECT count(*) FROM migrations WHERE status='active'").fetchone() \
        == (0,)
    for m in summary["migrations"]:
        assert where[m["vm"]] == (m["to"] if m["state"] == "succeeded" else m["from"])


@pytest.mark.parametrize("backend", ["qemu", "libvirt"])
def test_cli_real_backends_are_wired_and_want_their_hosts(tmp_path, small_plan, backend):
    plan_path, _ = small_plan
    out = cli("execute", str(plan_path), "--backend", backend, "--quiet",
              "--journal", str(tmp_path / "j.sqlite"))
    assert out.returncode == 2, out.stderr
    assert f"backend.{backend}" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_a_file_that_is_not_a_journal_is_refused(tmp_path):
    bad = tmp_path / "not-a-journal.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(InputError, match="not a usable journal"):
        Journal(bad)


def test_a_slow_link_stretches_migrations(tmp_path):
    s, moves = spread_cluster(1, 1, 1)
    waves = make_waves(s, moves)
    durations = []
    for k, faults in enumerate([{}, {"slow_link_rate": 1.0, "slow_link_factor": 0.1}]):
        (tmp_path / str(k)).mkdir()
        c = cfg(simulated={"faults": faults}, migration={"timeout_min_s": 1000})
        summary, backend, _ = execute(s, waves, c, tmp_path / str(k))
        assert summary.ok
        [m] = backend.migrations.values()
        durations.append(m.ended - m.start)
    assert durations[1] == pytest.approx(10 * durations[0], rel=0.05)
