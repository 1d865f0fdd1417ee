"""Sweep benchmark: ``balancer sweep`` of 4 replays on the embedded LocalCluster against the
same 4 replays one after the other in one process, as ``balancer replay`` runs them.

    python3 bench/sweep.py [--repeat 3] [--steps N] [--policy balance]
                           [--param cpu_headroom=0.1,0.15]
                           [--config configs/beloglazov-planetlab.toml]

The 4 tasks: both bundled PlanetLab days (whole: 288 five-minute steps each, unless --steps) x
``--policy`` with the two ``--param`` values. They are chosen comparable in length: the same
number of steps, and ``balance`` stops each cycle's search after a fixed number of LNS steps
(``max_iterations``), so the two runs of a day cost about the same and the two workers end
together whatever the order.

Both sides are whole processes, timed from their start to their exit, interpreter start-up and
imports included:

* serial: ``python bench/sweep.py --serial SPEC.json``, one process that calls
  ``simulator.replay.run`` (what ``balancer replay`` runs) once per task, each loading its trace
  (``balancer replay --trace DAY --config C --policy VARIANT.toml --format json``);
* sweep: ``balancer sweep --trace DAY1 --trace DAY2 --policy P --param ... --config C
  --format json`` on ``--scheduler local`` (2 single-thread worker processes on 2 cores, the
  longest runs first), cluster start-up and shutdown included.

and, as the machine's own ceiling for any scheduler, two plain processes started at once
(``--serial`` each, one run of each day apiece: no Dask at all), timed until both have exited.

All must give the same figures (checked). None is niced: run this when the machine is
otherwise quiet. Prints one row per repetition (wall seconds of each, speed-up, CPU seconds of
each process tree, the load average before, between and after) and min/median/max of the
speed-ups. The target: sweep >= 1.8x on 2 cores. The two-process row says how much of a
shortfall is the machine's (two CPU-bound processes slow each other down on a shared cache and
memory bus) and how much is Dask's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DAYS = ["planetlab:20110303", "planetlab:20110306"]
COMPARED = ("energy_kwh", "migrations", "slatah", "pdm", "slav", "esv", "moved_gb",
            "mean_active_hosts", "mean_imbalance", "unmet_share", "plan_calls", "steps")


def serial(spec_file: str) -> int:
    """The serial side (a process of its own): ``balancer replay`` once per task, in turn."""
    from simulator import replay

    spec = json.loads(Path(spec_file).read_text())
    out = []
    for task in spec["tasks"]:
        p = argparse.ArgumentParser()
        replay.add_arguments(p)
        argv = ["--trace", task["trace"], "--config", spec["config"], "--policy",
                task["policy_file"], "--format", "json", "--no-progress"]
        if spec["steps"]:
            argv += ["--steps", str(spec["steps"])]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert replay.run(p.parse_args(argv)) == 0
        doc = json.loads(buf.getvalue())
        out.append({"trace": task["trace"], "params": task["params"],
                    **{k: doc["policies"][0][k] for k in COMPARED}})
    json.dump(out, sys.stdout)
    return 0


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the process and its children, stdout)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=7200)
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])}... failed ({p.returncode}): {p.stderr[-2000:]}")
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), p.stdout


def timed_pair(cmds: list[list[str]]) -> tuple[float, float, list[str]]:
    """Start the commands at once; (wall seconds until all exited, CPU seconds, stdouts)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT) for c in cmds]
    outs = []
    for c, p in zip(cmds, procs, strict=True):
        out, err = p.communicate(timeout=7200)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(c[:3])}... failed ({p.returncode}): {err[-2000:]}")
        outs.append(out)
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serial", metavar="SPEC.json", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="default: the whole days")
    ap.add_argument("--policy", default="balance")
    ap.add_argument("--param", default="cpu_headroom=0.1,0.15")
    ap.add_argument("--config", default=str(ROOT / "configs" / "beloglazov-planetlab.toml"))
    args = ap.parse_args()
    if args.serial:
        return serial(args.serial)
    from simulator.sweep import _value

    name, _, values = args.param.partition("=")
    vals = [_value(v) for v in values.split(",")]
    assert len(vals) == 2, "--param NAME=V1,V2: two values (2 days x 2 values = 4 tasks)"
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    tasks = []
    for day in DAYS:
        for v in vals:
            f = tmp / f"{args.policy}-{name}-{v}.toml"
            f.write_text(f'policy = "{args.policy}"\n[args]\n{name} = {json.dumps(v)}\n')
            tasks.append({"trace": day, "params": {name: v}, "policy_file": str(f)})
    spec = tmp / "serial.json"
    spec.write_text(json.dumps({"tasks": tasks, "config": args.config, "steps": args.steps}))
    halves = []  # one run of each day per process
    for k in range(2):
        half = tmp / f"half-{k}.json"
        half.write_text(json.dumps({"tasks": tasks[k::2], "config": args.config,
                                    "steps": args.steps}))
        halves.append([sys.executable, str(Path(__file__).resolve()), "--serial", str(half)])
    bin_dir = Path(sys.executable).parent
    serial_cmd = [sys.executable, str(Path(__file__).resolve()), "--serial", str(spec)]
    sweep_cmd = [str(bin_dir / "balancer"), "sweep", "--trace", DAYS[0], "--trace", DAYS[1],
                 "--policy", args.policy, "--param", args.param, "--config", args.config,
                 "--format", "json", "--no-progress", "--scheduler", "local"]
    if args.steps:
        sweep_cmd += ["--steps", str(args.steps)]
    print(f"4 tasks: {', '.join(d.split(':')[1] for d in DAYS)} x {args.policy} "
          f"{args.param}; {args.steps or 'all'} steps each; {os.cpu_count()} cores; "
          f"{args.repeat} repetitions", flush=True)
    rows = []
    for rep in range(args.repeat):
        l0 = os.getloadavg()[0]
        ts, cs, out_s = timed(serial_cmd)
        l1 = os.getloadavg()[0]
        tp, cp, out_p = timed(sweep_cmd)
        tt, ct, out_t = timed_pair(halves)
        l2 = os.getloadavg()[0]
        ser = json.loads(out_s)
        pair = [r for o in out_t for r in json.loads(o)]
        assert sorted(map(json.dumps, pair)) == sorted(map(json.dumps, ser)), (pair, ser)
        runs = json.loads(out_p)["runs"]
        assert len(runs) == 4 and all("error" not in r for r in runs), runs
        for a in ser:  # the same figures, run by run
            b = next(r for r in runs if r["trace"] == a["trace"] and r["params"] == a["params"])
            assert all(a[k] == b[k] for k in COMPARED), (a, b)
        workers = {r["worker"] for r in runs}
        per_worker = {w: sum(r["seconds"] for r in runs if r["worker"] == w) for w in workers}
        rows.append((rep, ts, tp, tt, cs, cp, ct, max(per_worker.values()), len(workers),
                     l0, l1, l2))
        print(f"  run {rep}: serial {ts:.1f} s, sweep {tp:.1f} s: {ts / tp:.2f}x; two plain "
              f"processes {tt:.1f} s: {ts / tt:.2f}x (load {l0:.2f} / {l1:.2f} / {l2:.2f})",
              flush=True)
    print(f"{'run':>3}  {'serial s':>8}  {'sweep s':>7}  {'speed-up':>8}  {'2 procs s':>9}  "
          f"{'speed-up':>8}  {'serial CPU s':>12}  {'sweep CPU s':>11}  {'2 procs CPU s':>13}  "
          f"{'busiest worker s':>16}  {'workers':>7}  {'load before / between / after':>29}")
    for rep, ts, tp, tt, cs, cp, ct, wmax, nw, l0, l1, l2 in rows:
        print(f"{rep:>3}  {ts:>8.1f}  {tp:>7.1f}  {ts / tp:>7.2f}x  {tt:>9.1f}  {ts / tt:>7.2f}x  "
              f"{cs:>12.1f}  {cp:>11.1f}  {ct:>13.1f}  {wmax:>16.1f}  {nw:>7}  "
              f"{l0:>11.2f} / {l1:>5.2f} / {l2:>5.2f}")

    def spread(ups: list[float]) -> str:
        return (f"min {min(ups):.2f}x, median {statistics.median(ups):.2f}x, "
                f"max {max(ups):.2f}x")

    print(f"sweep speed-up (serial wall / sweep wall) over {len(rows)} runs: "
          f"{spread([r[1] / r[2] for r in rows])} (target >= 1.8x)")
    print(f"two plain processes (the machine's ceiling, no Dask): "
          f"{spread([r[1] / r[3] for r in rows])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
