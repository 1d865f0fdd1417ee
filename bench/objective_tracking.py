"""Does the engine's balance term track the standard deviation of host utilisation?

Walks the greedy baseline's trajectory (every single move, so hundreds of placements from very
unbalanced to balanced) and the CP-SAT engine's plans at thresholds 2..5, on a seeded 64-host /
1,000-VM cluster, and compares per placement:
  * the balance term the engine minimises (integer tangents, weighted; ``Evaluator``), and
  * the judged quantity, cpu_std + mem_std of host utilisation.
Prints the rank correlation and writes a scatter plot.

    python3 bench/objective_tracking.py --plot docs/objective-tracks-std.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from balancer.model import util_stats  # noqa: E402
from balancer.model.problem import vm_placement  # noqa: E402
from balancer.service import PlanOptions, plan  # noqa: E402
from balancer.snapshot import parse_snapshot  # noqa: E402
from balancer.solver.greedy import greedy_steps, initial_unit_hosts  # noqa: E402
from balancer.solver.objective import Evaluator  # noqa: E402
from policies import build_problem  # noqa: E402
from simulator.generate import generate  # noqa: E402


def rank(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    snap = parse_snapshot(generate(64, 1000, args.seed, rules=True))
    problem = build_problem(snap, PlanOptions(threshold=5).policy_config())
    ev = Evaluator(problem)
    points = []

    def record(unit_hosts: np.ndarray, kind: str) -> None:
        cpu, memd, _ = ev.loads(unit_hosts)
        term = float(ev.host_balance(cpu, memd).sum())
        st = util_stats(snap, vm_placement(problem, [int(h) for h in unit_hosts]))
        points.append((st.imbalance, term, kind))

    # greedy trajectory, one point per move
    for hosts in greedy_steps(problem, ev, initial_unit_hosts(problem)):
        record(hosts, "greedy trajectory")
    for t in (2, 3, 4, 5):
        r = plan(snap, PlanOptions(threshold=t, time_limit=3.0))
        uh = np.array([r.placement[u.members[0]] for u in problem.units])
        record(uh, "CP-SAT plans")
    imb = np.array([p[0] for p in points])
    term = np.array([p[1] for p in points])
    rho = float(np.corrcoef(rank(imb), rank(term))[0, 1])
    print(f"placements: {len(points)}   Spearman rank correlation (balance term vs "
          f"cpu_std + mem_std): {rho:.4f}")
    print(f"Pearson correlation of sqrt(balance term) vs cpu_std + mem_std: "
          f"{float(np.corrcoef(np.sqrt(term), imb)[0, 1]):.4f}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind, marker in (("greedy trajectory", "."), ("CP-SAT plans", "*")):
            sel = [i for i, p in enumerate(points) if p[2] == kind]
            ax.scatter(imb[sel], np.sqrt(term[sel] / 1e10), marker=marker,
                       s=60 if marker == "*" else 10, label=kind)
        ax.set_xlabel("cpu_std + mem_std of host utilisation")
        ax.set_ylabel("sqrt(balance term)  (util, weighted)")
        ax.set_title(f"Balance term tracks the std (Spearman {rho:.3f})")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
