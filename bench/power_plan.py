"""The power plan's cost and answer by cluster size (``balancer plan --power``, the daemon's
``[power]`` cycle step).

    python3 bench/power_plan.py [--seeds 21 22 23] [--max-switch 1 4] [--big]

For each generated cluster (64 hosts / 1,000 VMs from ``simulator.generate`` and from
``simulator.generate_skewed``, per seed; with ``--big`` also 500 / 10,000) and each
``max_switch``, one ``balancer.power_plan.plan_power`` call with the defaults otherwise: the
solver's status (optimal, feasible, or hint: the DPM rule's answer, accepted by the model), the
hosts put in standby, the model's watts before and after, the moves, and the CPU seconds of the
call (``time.process_time``: a busy machine does not inflate it much). Prints a table and the
min / median / max of the CPU seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[21, 22, 23])
    ap.add_argument("--max-switch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--big", action="store_true", help="also 500 hosts / 10,000 VMs")
    a = ap.parse_args(argv)

    from balancer.power_plan import PowerPlanOptions, plan_power
    from balancer.snapshot import parse_snapshot
    from simulator.generate import generate, generate_skewed

    sizes = [(64, 1000)] + ([(500, 10000)] if a.big else [])
    print("| generator | hosts/VMs | seed | max_switch | status | standby | W before | "
          "W after | moves | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    cpu: list[float] = []
    for gen in (generate, generate_skewed):
        for n_h, n_v in sizes:
            for seed in a.seeds:
                snap = parse_snapshot(gen(n_h, n_v, seed=seed))
                for ms in a.max_switch:
                    t = time.process_time()
                    doc = plan_power(snap, PowerPlanOptions(max_switch=ms))
                    took = time.process_time() - t
                    cpu.append(took)
                    pw = doc["power"]
                    n_sb = sum(r["action"] == "standby" for r in pw["recommendations"])
                    print(f"| {gen.__name__} | {n_h}/{n_v} | {seed} | {ms} | {pw['status']} | "
                          f"{n_sb} | {pw['watts_before']:.0f} | {pw['watts_after']:.0f} | "
                          f"{len(doc['migrations'])} | {took:.2f} |", flush=True)
    print(f"\nCPU s per plan: min {min(cpu):.2f} / median {statistics.median(cpu):.2f} / "
          f"max {max(cpu):.2f} over {len(cpu)} plans")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
