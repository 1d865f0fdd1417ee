"""The measurements and the simulation behind docs/scale.md (100 clusters / 1 million VMs).

    python3 bench/scale.py [--vms 10000] [--hosts 500] [--tasks 200] [--skip-plan]

Measures, on this machine:

1. one cluster of ``--vms`` VMs (``simulator.generate``, seed 1): snapshot JSON bytes per VM,
   parse seconds, peak RSS, and one greedy plan (CPU seconds of the planning thread, which a
   busy machine does not inflate);
2. the Dask overhead per task: ``--tasks`` no-op tasks through ``balancer.tasks.execute`` on the
   embedded LocalCluster (round trips included), tasks per second;

and simulates (list scheduling, the longest task first, as a Dask scheduler with idle workers
does for independent tasks) the wall time of a fleet cycle and of a sweep on W workers from
per-task costs (measured here or in docs/benchmarks.md, each named in the output).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def makespan(costs: list[float], workers: int, per_task: float = 0.0) -> float:
    """List scheduling, longest first: the finish time of the last worker."""
    heap = [0.0] * workers
    for c in sorted(costs, reverse=True):
        t = heapq.heappop(heap)
        heapq.heappush(heap, t + c + per_task)
    return max(heap)


def noop(x: int) -> dict:
    return {"x": x}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=10_000)
    ap.add_argument("--hosts", type=int, default=500)
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--skip-plan", action="store_true")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    from balancer.snapshot import loads
    from simulator.generate import generate

    doc = generate(args.hosts, args.vms, seed=1)
    text = json.dumps(doc)
    t0 = time.thread_time()
    snap = loads(text, source="generated")
    parse_cpu = time.thread_time() - t0
    print(f"[1] snapshot {args.hosts} hosts / {args.vms} VMs: {len(text) / 1e6:.2f} MB JSON, "
          f"{len(text) / args.vms:.0f} bytes per VM, parse {parse_cpu:.2f} CPU s")
    plan_cpu = None
    if not args.skip_plan:
        from balancer.service import PlanOptions, plan

        t0 = time.thread_time()
        w0 = time.monotonic()
        res = plan(snap, PlanOptions(solver="greedy", time_limit=3600.0))
        plan_cpu = time.thread_time() - t0
        print(f"    greedy plan: {plan_cpu:.1f} CPU s ({time.monotonic() - w0:.1f} wall s), "
              f"{len(res.moves)} migrations")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"    peak RSS of this process: {rss:.0f} MB")

    from balancer.tasks import connect, execute

    client, cluster = connect("local", args.tasks)
    try:
        execute(client, [0, 1], noop, progress=False)  # workers warm
        t0 = time.monotonic()
        execute(client, list(range(args.tasks)), noop, progress=False)
        dt = time.monotonic() - t0
    finally:
        client.close()
        cluster.close()
    per_task = dt / args.tasks
    print(f"[2] {args.tasks} no-op tasks on the LocalCluster: {dt:.2f} s, "
          f"{per_task * 1000:.1f} ms per task ({args.tasks / dt:.0f} tasks/s), "
          f"load {os.getloadavg()[0]:.1f}")

    print("[3] simulated wall time (list scheduling, longest first, + the per-task overhead "
          "of [2]):")
    # docs/benchmarks.md, Engine: 500 hosts / 10,000 VMs, cp-sat unlimited, 25.5 s wall
    # (quiet machine; the default time limit caps the search at 24 s)
    fleet = [25.5] * 100
    for w in (2, 8, 16, 32, 64, 100):
        print(f"    fleet cycle, 100 clusters x 10,000 VMs (25.5 s each): {w:>3} workers "
              f"-> {makespan(fleet, w, per_task):7.1f} s")
    # docs/benchmarks.md, Replay (20110303): none 0.6 s, balance 54.0 s, greedy 40.9 s,
    # consolidate 101.6 s per day; 10 days x 4 policies x 5 parameter values
    day = {"none": 0.6, "balance": 54.0, "greedy": 40.9, "consolidate": 101.6}
    sweep = [c for c in day.values() for _ in range(10 * 5)]
    serial = sum(sweep)
    print(f"    sweep, 10 days x 4 policies x 5 values = {len(sweep)} replays, serial "
          f"{serial / 3600:.2f} h:")
    for w in (2, 8, 16, 32, 64, 200):
        m = makespan(sweep, w, per_task)
        print(f"      {w:>3} workers -> {m / 60:6.1f} min ({serial / m:5.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
