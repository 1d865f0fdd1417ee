"""Ctrl-C and SIGTERM at any moment: ``balancer serve`` and ``balancer plan`` stop cleanly.

The daemon is started as a user starts it (``balancer serve --demo``, its own process); the
signal arrives while the first control cycle solves. Clean means: exit 0 or 130, no crash text
(an abort used to print ``terminate called ... std::bad_function_call``), the demo's temporary
folder removed, and no solver process left behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from simulator.generate import generate

CRASH = ("Traceback", "terminate called", "Aborted", "internal error", "core dumped")


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(p.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_solving(pid: int, timeout: float = 120.0) -> None:
    """Until ``balancer plan`` has started its solver worker (a machine under load may need
    several seconds to read the snapshot first)."""
    deadline = time.monotonic() + timeout
    while not _children(pid):
        assert time.monotonic() < deadline, "plan never started its solver worker"
        assert _alive(pid), "plan exited early"
        time.sleep(0.05)


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0])
def test_ctrl_c_while_the_first_cycle_solves(tmp_path: Path, delay: float) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "balancer.cli", "serve", "--demo", "--port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            m = re.search(r"listening on (http://\S+)", proc.stderr.readline())
            url = m.group(1) if m else None
            assert proc.poll() is None, "serve exited before listening"
        assert url is not None
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        kids = _children(proc.pid)  # the solver workers' fork server, at least
        assert kids, "solves should run in worker processes"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=20)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert code in (0, 130), err
    assert not any(c in err for c in CRASH), err
    assert "stopped" in err
    assert not list(tmp_path.glob("balancer-demo-*")), "the demo's temp folder is left behind"
    deadline = time.monotonic() + 10
    while any(_alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(k) for k in kids), "a solver process outlived the service"


def test_plan_first_ctrl_c_gives_the_best_plan_so_far(tmp_path: Path) -> None:
    snap = tmp_path / "c.json"
    snap.write_text(json.dumps(generate(64, 1000, seed=7, rules=True)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "balancer.cli", "plan", str(snap), "--threshold", "5",
         "--time-limit", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_solving(proc.pid)
        time.sleep(2.0)  # well into the search
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        stopped_after = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert stopped_after < 20  # not the 60 s time limit
    doc = json.loads(out)
    assert doc["solver"]["stopped_by"] == "stop"
    assert doc["migrations"], "the plan found so far is printed"
    assert doc["efficacy"]["after"]["imbalance"] < doc["efficacy"]["before"]["imbalance"]
    assert "best plan found so far" in err and not any(c in err for c in CRASH)


def test_plan_second_ctrl_c_gives_up_with_130(tmp_path: Path) -> None:
    snap = tmp_path / "c.json"
    snap.write_text(json.dumps(generate(64, 1000, seed=8, rules=True)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "balancer.cli", "plan", str(snap), "--threshold", "5",
         "--time-limit", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_solving(proc.pid)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, 130), err  # 0 if the plan was already on its way out
    assert not any(c in err for c in CRASH), err
    if proc.returncode == 130:
        assert out == ""


def test_serve_logs_json_lines(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "balancer.cli", "serve", "--demo", "--port", "0",
         "--log-format", "json", "--log-level", "info"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.stderr is not None
    lines: list[dict] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "serve exited"
            lines.append(json.loads(line))  # every line is one JSON object
            if lines[-1]["msg"].startswith("listening on http://"):
                break
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        lines += [json.loads(x) for x in proc.stderr.read().splitlines()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == 0
    assert all({"ts", "level", "logger", "msg"} <= set(x) for x in lines)
    assert any(x["msg"] == "stopped" for x in lines)
    assert any(x["level"] == "warning" and "no API token" in x["msg"] for x in lines)


def test_serve_refuses_a_bad_log_level() -> None:
    r = subprocess.run([sys.executable, "-m", "balancer.cli", "serve", "--demo",
                        "--log-level", "loud"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--log-level" in r.stderr
