"""Sweep benchmark: a 4-task sweep on the embedded LocalCluster against the same 4 replays run
one after the other in one process.

    python3 bench/sweep.py [--steps 24] [--policy consolidate] [--param target_util=0.8,0.84]
                           [--config configs/beloglazov-planetlab.toml] [--repeat 1]

The 4 tasks: both bundled PlanetLab days x the two ``--param`` values. Serial: the replays one
after the other in this process (trace loads included, as in ``balancer replay``). Sweep:
``balancer sweep``'s own path (``simulator.sweep.run_task`` through ``balancer.tasks.run_tasks``
on ``--scheduler local``: one worker process per core), cluster start-up and shutdown
included. Both produce the same figures (checked). Prints one row per mode with wall seconds,
the CPU seconds the replays themselves took (thread CPU time, not disturbed by other
programs), the speed-up, and the load average before and after, because wall-clock figures on
a shared machine measure the other programs too. The target: speed-up >= 1.8 on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from balancer.tasks import run_tasks  # noqa: E402
from simulator.sweep import COMPARE, plan_runs, run_task  # noqa: E402


def timed_task(spec: object) -> dict:
    """``run_task`` plus the CPU seconds of the thread that ran it."""
    t0 = time.thread_time()
    out = run_task(spec)  # type: ignore[arg-type]
    out["cpu_seconds"] = time.thread_time() - t0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--policy", default="consolidate")
    ap.add_argument("--param", default="target_util=0.8,0.84")
    ap.add_argument("--config", default=str(ROOT / "configs" / "beloglazov-planetlab.toml"))
    ap.add_argument("--repeat", type=int, default=1, help="repeat both modes, report each")
    args = ap.parse_args()
    ns = argparse.Namespace(trace=["planetlab:20110303", "planetlab:20110306"],
                            policy=[args.policy], param=[args.param], config=args.config,
                            seed=None, steps=args.steps)
    specs = plan_runs(ns)
    print(f"{len(specs)} tasks: {', '.join(s.run_id for s in specs)}; {args.steps} steps each; "
          f"{os.cpu_count()} cores")
    rows = []
    for rep in range(args.repeat):
        load0 = os.getloadavg()[0]
        t0 = time.monotonic()
        serial = [timed_task(s) for s in specs]
        t_serial = time.monotonic() - t0
        load1 = os.getloadavg()[0]
        t0 = time.monotonic()
        par = run_tasks("local", specs, timed_task, progress=False, label="bench")
        t_par = time.monotonic() - t0
        load2 = os.getloadavg()[0]
        for a, b in zip(serial, par, strict=True):
            assert "error" not in b, b
            same = all(a[k] == b[k] for _, k, _ in COMPARE)
            assert same, (a, b)
        cpu_s = sum(r["cpu_seconds"] for r in serial)
        by_worker: dict[str, float] = {}
        for r in par:
            by_worker[r["worker"]] = by_worker.get(r["worker"], 0.0) + r["cpu_seconds"]
        rows.append((rep, t_serial, t_par, cpu_s, sum(by_worker.values()),
                     max(by_worker.values()), len(by_worker), load0, load1, load2))
    print(f"{'run':>3}  {'serial s':>9}  {'sweep s':>8}  {'speed-up':>8}  {'serial CPU s':>12}  "
          f"{'sweep CPU s':>11}  {'busiest worker CPU s':>20}  {'workers':>7}  "
          f"{'load before / between / after':>29}")
    for rep, ts, tp, cs, cp, cmax, nw, l0, l1, l2 in rows:
        print(f"{rep:>3}  {ts:>9.1f}  {tp:>8.1f}  {ts / tp:>7.2f}x  {cs:>12.1f}  {cp:>11.1f}  "
              f"{cmax:>20.1f}  {nw:>7}  {l0:>9.1f} / {l1:>5.1f} / {l2:>5.1f}")
    best = max(r[1] / r[2] for r in rows)
    worst = min(r[1] / r[2] for r in rows)
    print(f"speed-up (serial wall / sweep wall): min {worst:.2f}x, max {best:.2f}x "
          f"(target >= 1.8x); CPU-bound ceiling on a quiet machine: serial CPU / busiest "
          f"worker CPU = {min(r[3] / r[5] for r in rows):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
