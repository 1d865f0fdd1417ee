"""``balancer sweep`` on a real Dask cluster: a ``dask scheduler`` and two ``dask worker``
processes on 127.0.0.1 (free ports, bounded waits, always torn down)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("distributed")

ROOT = Path(__file__).resolve().parents[1]
# the bundled PlanetLab days (simulator/data/traces), by name: workers resolve them themselves
DAYS = ["planetlab:20110303", "planetlab:20110306"]
CONFIG = ROOT / "configs" / "beloglazov-planetlab.toml"
BIN = Path(sys.executable).parent
COMPARED = ("energy_kwh", "migrations", "slatah", "pdm", "slav", "esv", "moved_gb",
            "mean_active_hosts", "mean_imbalance", "unmet_share", "plan_calls", "steps")


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def _client_script(address: str, code: str, timeout: float = 60) -> str:
    """Run ``code`` with ``c`` a Client of ``address`` in a separate process; its stdout."""
    src = ("import sys\nfrom distributed import Client\n"
           f"with Client({address!r}, timeout='20s') as c:\n"
           + "".join(f"    {line}\n" for line in code.splitlines()))
    r = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real scheduler and two single-thread workers; yields the scheduler address."""
    tmp = tmp_path_factory.mktemp("dask")
    sched_file = tmp / "scheduler.json"
    procs: list[subprocess.Popen] = []
    logs = []

    def start(args: list[str], name: str) -> None:
        log = open(tmp / f"{name}.log", "w")  # noqa: SIM115
        logs.append(log)
        procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
                                      start_new_session=True))
    try:
        start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
               "--no-dashboard", "--scheduler-file", str(sched_file)], "scheduler")
        deadline = time.monotonic() + 60
        while not sched_file.exists() or not sched_file.read_text().strip():
            assert procs[0].poll() is None, (tmp / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "scheduler did not start in 60 s"
            time.sleep(0.2)
        time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        for i in range(2):
            start([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                   "--host", "127.0.0.1", "--no-dashboard", "--name", f"w{i}",
                   "--local-directory", str(tmp / f"w{i}")], f"worker{i}")
        _client_script(address, "c.wait_for_workers(2, timeout=90)", timeout=120)
        yield address
    finally:
        _stop(procs)
        for log in logs:
            log.close()


def sweep(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "balancer"), "sweep", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def replay_json(day: str, *policies: str, steps: int) -> dict:
    r = subprocess.run([str(BIN / "balancer"), "replay", "--trace", day,
                        "--config", str(CONFIG), "--policy", *policies, "--steps", str(steps),
                        "--format", "json", "--no-progress"], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_sweep_equals_serial_replays_and_uses_both_workers(cluster: str, tmp_path: Path) -> None:
    steps = 5
    args = []
    for d in DAYS:
        args += ["--trace", d]
    rep = tmp_path / "report"
    r = sweep(*args, "--policy", "none", "--policy", "consolidate", "--config", str(CONFIG),
              "--steps", str(steps), "--scheduler", cluster, "--format", "json",
              "--report", str(rep))
    assert r.returncode == 0, r.stderr
    runs = json.loads(r.stdout)["runs"]
    assert [(x["trace"], x["policy"]) for x in runs] == [
        (DAYS[0], "none"), (DAYS[0], "consolidate"), (DAYS[1], "none"), (DAYS[1], "consolidate")]
    for x in runs:
        assert x["params"] == {} and x["attempts"] == 1 and x["seconds"] > 0
    # the four runs were spread over both workers of the cluster
    assert len({x["worker"] for x in runs}) == 2, [x["worker"] for x in runs]
    assert all(x["worker"].startswith("tcp://127.0.0.1:") for x in runs)
    # and each equals the serial balancer replay of the same day, config and seed
    for d in DAYS:
        serial = {p["policy"]: p for p in replay_json(d, "none", "consolidate",
                                                      steps=steps)["policies"]}
        for x in (x for x in runs if x["trace"] == d):
            want = serial[x["policy"]]
            assert {k: x[k] for k in COMPARED} == {k: want[k] for k in COMPARED}, x["policy"]
    cons = [x for x in runs if x["policy"] == "consolidate"]
    assert all(x["migrations"] > 0 for x in cons)  # a run that did something
    # the report: policies compared across the days, each run's own replay report linked
    page = (rep / "index.html").read_text()
    for x in runs:
        day = x["trace"].split(":")[1]
        link = f"runs/{day}_{x['policy']}/index.html"
        assert f'href="{link}"' in page
        assert "What-if replay" in (rep / link).read_text()
        own = json.loads((rep / link).with_name("summary.json").read_text())["policies"][0]
        assert {k: own[k] for k in COMPARED} == {k: x[k] for k in COMPARED}
    for png in ("tradeoff.png", "spread.png", "by-trace.png"):
        assert (rep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="{png}"' in page
    assert "Spread over the traces, per policy" in page and "2 traces" in page
    # each trace's size, from its runs
    vms = {x["trace"]: x["vms"] for x in runs}
    for d in DAYS:
        assert f"{d}</code>: {vms[d]:,} VMs, {steps} steps, " in page
    assert json.loads((rep / "runs.json").read_text())["runs"] == runs


def test_param_values_are_runs_and_match_a_policy_file(cluster: str, tmp_path: Path) -> None:
    pol = tmp_path / "cons.toml"
    pol.write_text('policy = "consolidate"\n[args]\ntarget_util = 0.75\n')
    r = sweep("--trace", DAYS[0], "--policy", "consolidate",
              "--param", "target_util=0.75,0.9", "--config", str(CONFIG), "--steps", "4",
              "--scheduler", cluster, "--format", "json")
    assert r.returncode == 0, r.stderr
    runs = json.loads(r.stdout)["runs"]
    assert [x["params"] for x in runs] == [{"target_util": 0.75}, {"target_util": 0.9}]
    assert runs[0]["mean_active_hosts"] != runs[1]["mean_active_hosts"]
    serial = replay_json(DAYS[0], str(pol), steps=4)["policies"][0]
    assert {k: runs[0][k] for k in COMPARED} == {k: serial[k] for k in COMPARED}


def test_table_compares_policies_across_days(cluster: str) -> None:
    r = sweep("--trace", DAYS[0], "--trace", DAYS[1],
              "--policy", "none", "--policy", "balance", "--config", str(CONFIG),
              "--steps", "2", "--scheduler", cluster)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("4 runs on 2 workers")
    assert "spread over traces per policy: median (min .. max)" in out
    spread = out.split("spread over traces")[1].splitlines()
    assert spread[1].split() == ["metric", "none", "[2]", "balance", "[2]"]  # 2 traces each
    energy = next(line for line in spread if line.startswith("energy kWh"))
    assert energy.count(" .. ") == 2
    assert "20110303" in out and "20110306" in out


def test_a_failing_run_is_retried_once_and_reported(cluster: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-day"
    r = sweep("--trace", DAYS[0], "--trace", f"planetlab:{missing}",
              "--policy", "none", "--config", str(CONFIG), "--steps", "2",
              "--scheduler", cluster, "--format", "json")
    assert r.returncode == 1
    runs = json.loads(r.stdout)["runs"]
    good, bad = runs
    assert good["attempts"] == 1 and "error" not in good and good["energy_kwh"] > 0
    assert bad["attempts"] == 2 and "no such file or directory" in bad["error"]
    assert str(missing) in bad["error"]
    assert "failed after 2 attempts" in r.stderr
    assert "Traceback" not in r.stderr


def test_retry_recovers_a_transient_failure(cluster: str, tmp_path: Path) -> None:
    """The client side of the retry, with a task that fails on its first attempt only."""
    out = _client_script(cluster, f"""
import cloudpickle, json, pathlib
from balancer import tasks
marker = pathlib.Path({str(tmp_path)!r})
def flaky(n):
    m = marker / f"tried-{{n}}"
    if n == 1 and not m.exists():
        m.write_text("x")
        raise OSError("transient")
    return {{"value": n * 10}}
print(json.dumps(tasks.execute(c, [0, 1, 2], flaky, progress=False)))
""")
    res = json.loads(out.strip().splitlines()[-1])
    assert res == [{"value": 0, "attempts": 1}, {"value": 10, "attempts": 2},
                   {"value": 20, "attempts": 1}]


def test_ctrl_c_cancels_the_runs_and_exits_130(cluster: str) -> None:
    p = subprocess.Popen([str(BIN / "balancer"), "sweep", "--trace", DAYS[0],
                          "--trace", DAYS[1], "--policy", "balance",
                          "--policy", "consolidate", "--config", str(CONFIG),
                          "--scheduler", cluster, "--format", "json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        # wait until the runs are on the scheduler (full days: minutes of work each): one per
        # worker thread, the other two wait in the client
        deadline = time.monotonic() + 60
        while True:
            n = int(_client_script(cluster, "print(c.run_on_scheduler("
                                   "lambda dask_scheduler: len(dask_scheduler.tasks)))"))
            if n >= 2:
                break
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 130, err
    assert "interrupted: cancelled 4 unfinished runs" in err
    assert "Traceback" not in err and out == ""
    # nothing of the sweep is left on the scheduler
    deadline = time.monotonic() + 30
    while int(_client_script(cluster, "print(c.run_on_scheduler("
                             "lambda dask_scheduler: len(dask_scheduler.tasks)))")):
        assert time.monotonic() < deadline, "cancelled runs still on the scheduler"
        time.sleep(0.5)


def test_bad_input_is_one_line_exit_2() -> None:
    for args, needle in (
            (["--trace", "nope:/x"], "--trace: kind 'nope' is unknown"),
            (["--trace", DAYS[0], "--param", "x"], "--param: expected NAME="),
            (["--trace", DAYS[0], "--policy", "none", "--param",
              "target_util=0.8"], "--param target_util: no swept policy has this field"),
            (["--trace", DAYS[0], "--policy", "consolidate", "--param",
              "target_util=7"], "target_util"),
            (["--trace", DAYS[0], "--scheduler", "http://x"], "--scheduler"),
            (["--trace", DAYS[0], "--policy", "nosuch"], "'nosuch' is unknown"),
    ):
        r = sweep(*args, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_embedded_local_cluster_by_default() -> None:
    r = sweep("--trace", DAYS[0], "--trace", DAYS[1],
              "--policy", "none", "--config", str(CONFIG), "--steps", "2", "--format", "json")
    assert r.returncode == 0, r.stderr
    runs = json.loads(r.stdout)["runs"]
    assert len(runs) == 2 and all(x["worker"].startswith("tcp://127.0.0.1:") for x in runs)
    assert all(x["energy_kwh"] > 0 and x["attempts"] == 1 for x in runs)


# the ordering test's tasks: estimated cost, and each runs 0.3 s per unit of it, so that the two
# first runs end 0.3 s apart and the next two start in a definite order
COSTS = {0: 1.0, 1: 5.0, 2: 3.0, 3: 4.0}


def _started(n: int) -> dict:
    """A task that notes when and where it ran (for the ordering test)."""
    t0 = time.time()
    time.sleep(0.3 * COSTS[n])
    import dask
    from distributed import get_worker

    w = get_worker()
    return {"n": n, "start": t0, "worker": w.address,
            "env": {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")},
            # Dask's background work beside the run (balancer.tasks.QUIET_CONFIG)
            "profiler": dask.config.get("distributed.worker.profile.enabled"),
            "tick": dask.config.get("distributed.admin.tick.interval")}


def test_local_cluster_runs_the_longest_first_on_single_thread_workers() -> None:
    """Four tasks on the embedded cluster (2 workers): by estimated cost, longest first, so
    the cheapest starts last whatever the order they were given in."""
    from balancer import tasks

    res = tasks.run_tasks("local", [0, 1, 2, 3], _started, progress=False,
                          cost=COSTS.__getitem__)
    assert [r["n"] for r in res] == [0, 1, 2, 3]  # results in the order given
    by_start = [r["n"] for r in sorted(res, key=lambda r: r["start"])]
    assert set(by_start[:2]) == {1, 3} and by_start[2:] == [2, 0], by_start
    assert len({r["worker"] for r in res}) == 2
    # one thread per numerical library, glibc's own malloc trimming (not Dask's 64 KiB)
    assert all(r["env"] == {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"}
               for r in res), res
    # no statistical profiler sampling the run's thread, the event loop ticking once a second
    assert all(r["profiler"] is False and r["tick"] == "1s" for r in res), res


def test_estimated_cost_orders_days_by_size_and_none_last() -> None:
    import argparse

    from simulator.sweep import estimated_cost, plan_runs

    ns = argparse.Namespace(trace=DAYS, policy=["none", "balance"], param=[], config=None,
                            seed=None, steps=None)
    cost = {(s.trace, s.policy): estimated_cost(s) for s in plan_runs(ns)}
    # 2011-03-03 (1,052 VMs) is the larger file; `none` never asks the engine
    assert cost[(DAYS[0], "balance")] > cost[(DAYS[1], "balance")] > cost[(DAYS[0], "none")] \
        > cost[(DAYS[1], "none")] > 0
