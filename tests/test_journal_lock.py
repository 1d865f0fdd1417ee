"""One executor per journal: a second ``balancer execute`` on the same journal is refused with
one line naming the holder (exit 2) or, with ``--wait``, waits and then finds nothing to do;
no migration is ever started twice. Plus the CLI's output polish (units, dry-run wording,
empty input, JSON reasons, default journal folder, no progress bar without a terminal)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.test_journal_crash import CONFIG, N_MIGRATIONS, plan_doc, toml  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def slow_config(tmp: Path, time_scale: float = 0.02) -> Path:
    c = json.loads(json.dumps(CONFIG))
    c["simulated"]["faults"] = {}
    c["simulated"]["time_scale"] = time_scale
    c["simulated"]["state_path"] = str(tmp / "cluster.sqlite")
    c["journal"]["path"] = str(tmp / "journal.sqlite")
    path = tmp / "exec.toml"
    path.write_text(toml(c))
    return path


def execute(*args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "balancer.cli", "execute", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env, **kw)


def wait_for_lock(journal: Path, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        lock = journal.with_name(journal.name + ".lock")
        if lock.exists() and b"pid" in lock.read_bytes():
            return
        time.sleep(0.05)
    raise AssertionError("the first executor never took the journal")


def test_second_executor_is_refused_then_waits_and_nothing_runs_twice(plan_doc, tmp_path):  # noqa: F811
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(plan_doc))
    cfg = slow_config(tmp_path)
    first = execute(str(plan), "--config", str(cfg), "--quiet")
    try:
        wait_for_lock(tmp_path / "journal.sqlite")
        second = execute(str(plan), "--config", str(cfg), "--quiet")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, (out, err)
        assert len(err.strip().splitlines()) == 1
        assert f"is in use by balancer execute (pid {first.pid} on " in err
        assert "--wait" in err
        assert first.poll() is None, "the refused executor must not disturb the first"
        waiting = execute(str(plan), "--config", str(cfg), "--quiet", "--wait")
        out1, err1 = first.communicate(timeout=300)
        out2, err2 = waiting.communicate(timeout=300)
    finally:
        for p in (first,):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert first.returncode == 0, err1
    assert f"migrations {N_MIGRATIONS}: succeeded {N_MIGRATIONS}" in out1
    assert waiting.returncode == 0, err2
    assert "waiting for it" in err2
    assert f"nothing to do: {N_MIGRATIONS} of {N_MIGRATIONS} already done" in out2
    cluster = sqlite3.connect(tmp_path / "cluster.sqlite")
    starts = Counter(cluster.execute("SELECT vm, source, target FROM starts").fetchall())
    cluster.close()
    assert len(starts) == N_MIGRATIONS and max(starts.values()) == 1  # 0 started twice


def test_execute_output_units_dry_run_wording_and_json_reasons(plan_doc, tmp_path):  # noqa: F811
    plan = tmp_path / "plan.json"
    plan_doc = json.loads(json.dumps(plan_doc))
    for w in plan_doc["waves"]:
        for m in w["migrations"]:
            m["reason"] = f"balance: test move of {m['vm']}"
    plan.write_text(json.dumps(plan_doc))
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    dry = execute(str(plan), "--dry-run", env=env)
    out, err = dry.communicate(timeout=120)
    assert dry.returncode == 0, err
    moved = sum(e["mem_mb"] for w in plan_doc["waves"] for e in w["migrations"])
    assert f"would move {moved / 1024:.1f} GiB" in out or f"would move {moved / 1024:.0f} GiB" \
        in out
    assert "MiB;" not in out and "moved " not in out.replace("would move", "")
    # without a terminal: event lines only, no progress bar redrawn over them
    assert "\r" not in err and "mig/s" not in err and "succeeded #0 " in err
    assert not (tmp_path / "state").exists()  # a dry run keeps no journal

    real = execute(str(plan), "--format", "json", "--quiet", env=env)
    out, err = real.communicate(timeout=300)
    assert real.returncode == 0, err
    doc = json.loads(out)
    default = tmp_path / "state" / "balancer" / "journal.sqlite"
    assert doc["journal"] == str(default) and default.exists()
    reasons = {m["vm"]: m.get("reason", "") for w in plan_doc["waves"] for m in w["migrations"]}
    assert all(m["plan_reason"] == reasons[m["vm"]] for m in doc["migrations"])
    assert all(m["plan_reason"].startswith("balance: test move") for m in doc["migrations"])

    again = execute(str(plan), "--quiet", env=env)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert f"nothing to do: {N_MIGRATIONS} of {N_MIGRATIONS} already done" in out


def test_empty_stdin_is_named_as_such(tmp_path):
    p = execute("-", "--quiet", stdin=subprocess.PIPE)
    out, err = p.communicate(input="\n", timeout=60)
    assert p.returncode == 2
    assert err.strip() == ("balancer: error: stdin: empty input: expected the JSON plan of "
                           "`balancer plan`")


@pytest.mark.parametrize("mib,text", [(512, "512 MiB"), (1536, "1.5 GiB"),
                                      (851968, "832 GiB"), (3 * 1024 * 1024, "3.0 TiB")])
def test_human_units(mib, text):
    from balancer.executor.cli import human_mib

    assert human_mib(mib) == text
