"""Engine benchmark: the CP-SAT engine beside the greedy baseline on seeded clusters.

Every figure comes from the real command line (``balancer plan FILE --format json``) run as a
separate process, so wall times are whole-process times (start-up, parsing, solving,
verification, explanation).

    python3 bench/engine.py                 # 16/200, 64/1,000 with rules, 500/10,000; table
    python3 bench/engine.py --quick         # without 500/10,000
    python3 bench/engine.py --only 500/10000+compat   # heterogeneous CPUs and networks
    python3 bench/engine.py --targets --seeds 101 102 103   # the issue's targets on fresh seeds
    python3 bench/engine.py --plot docs/engine-tradeoff.png # imbalance vs memory moved curve
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simulator.generate import generate  # noqa: E402

# label: (hosts, VMs, rules, heterogeneous CPUs / networks)
SIZES = {"16/200": (16, 200, False, False), "64/1000+rules": (64, 1000, True, False),
         "500/10000": (500, 10000, False, False),
         "500/10000+compat": (500, 10000, False, True)}


def run_plan(path: Path, *args: str) -> dict:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "balancer.cli", "plan", str(path),
                           "--format", "json", *args], capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"balancer plan failed ({proc.returncode}): {proc.stderr.strip()}")
    out = json.loads(proc.stdout)
    out["wall"] = wall
    return out


def row(label: str, case: str, solver: str, out: dict) -> str:
    a = out["efficacy"]["after"]
    return (f"| {label} | {case} | {solver} | {a['cpu_std']:.4f} | {a['mem_std']:.4f} | "
            f"{a['imbalance']:.4f} | {max(a['cpu_max'], a['mem_max']):.3f} | "
            f"{out['efficacy']['migrations']} | {out['efficacy']['moved_mem_mb'] / 2**20:.2f} | "
            f"{out['wall']:.1f} |")


def bench_size(label: str, seed: int, tmp: Path, threshold: int = 5) -> list[str]:
    n_h, n_v, rules, hetero = SIZES[label]
    path = tmp / f"{label.replace('/', '-')}-{seed}.json"
    path.write_text(json.dumps(generate(n_h, n_v, seed, rules=rules, heterogeneous=hetero)))
    th = ["--threshold", str(threshold)]
    lines = []
    g_free = run_plan(path, *th, "--solver", "greedy")
    before = g_free["efficacy"]["before"]
    lines.append(f"| {label} | start | - | {before['cpu_std']:.4f} | {before['mem_std']:.4f} | "
                 f"{before['imbalance']:.4f} | {max(before['cpu_max'], before['mem_max']):.3f} "
                 "| 0 | 0 | - |")
    gb = g_free["efficacy"]["moved_mem_mb"] / 1024
    cases = [(f"K={k}", ["--max-migrations", str(k)]) for k in (10, 25, 50)]
    cases.append(("unlimited", []))
    cases.append((f"mem<={gb / 1024:.2f}TB", ["--max-moved-mem-gb", f"{gb:.3f}"]))
    for case, extra in cases:
        g = g_free if case == "unlimited" else run_plan(path, *th, "--solver", "greedy", *extra)
        c = run_plan(path, *th, *extra)
        lines.append(row(label, case, "greedy", g))
        lines.append(row(label, case, "cp-sat", c))
        print(lines[-2] + "\n" + lines[-1], file=sys.stderr, flush=True)
    return lines


def check_targets(seed: int, tmp: Path) -> list[str]:
    path = tmp / f"targets-{seed}.json"
    path.write_text(json.dumps(generate(64, 1000, seed, rules=True)))
    th = ["--threshold", "5"]
    g = run_plan(path, *th, "--solver", "greedy")
    c = run_plan(path, *th)
    gi, ci = g["efficacy"]["after"]["imbalance"], c["efficacy"]["after"]["imbalance"]
    gb = g["efficacy"]["moved_mem_mb"] / 1024
    cm = run_plan(path, *th, "--max-moved-mem-gb", f"{gb:.3f}")
    cmi = cm["efficacy"]["after"]["imbalance"]
    ks = []
    for k in (10, 25, 50):
        gk = run_plan(path, *th, "--solver", "greedy", "--max-migrations", str(k))
        ck = run_plan(path, *th, "--max-migrations", str(k))
        ks.append((gk["efficacy"]["after"]["imbalance"], ck["efficacy"]["after"]["imbalance"]))
    walls = [c["wall"], cm["wall"]]
    ok = (ci <= 0.5 * gi and cmi <= 0.8 * gi and all(b <= a + 1e-9 for a, b in ks)
          and max(walls) <= 5.0)
    k_txt = " ".join(f"{b / a:.3f}" for a, b in ks)
    return [f"| {seed} | {g['efficacy']['before']['imbalance']:.4f} | {gi:.4f} | {ci:.4f} "
            f"({ci / gi:.2f}) | {cmi:.4f} ({cmi / gi:.2f}) | {k_txt} | {max(walls):.1f} | "
            f"{'yes' if ok else 'NO'} |"]


def plot_tradeoff(out_png: Path, seed: int, tmp: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp / f"curve-{seed}.json"
    path.write_text(json.dumps(generate(64, 1000, seed, rules=True)))
    pts_t, pts_b, pts_g = [], [], []
    for t in (2, 3, 4, 5):
        o = run_plan(path, "--threshold", str(t))
        eff = o["efficacy"]
        pts_t.append((eff["moved_mem_mb"] / 2**20, eff["after"]["imbalance"], t))
    for gb in (250, 500, 1000, 1500, 2000, 3000, 4000):
        o = run_plan(path, "--threshold", "5", "--max-moved-mem-gb", str(gb))
        pts_b.append((o["efficacy"]["moved_mem_mb"] / 2**20, o["efficacy"]["after"]["imbalance"]))
    for k in (5, 10, 25, 50, 75, 100, 150):
        o = run_plan(path, "--threshold", "5", "--solver", "greedy", "--max-migrations", str(k))
        pts_g.append((o["efficacy"]["moved_mem_mb"] / 2**20, o["efficacy"]["after"]["imbalance"]))
    start = o["efficacy"]["before"]["imbalance"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p[0] for p in pts_b], [p[1] for p in pts_b], "o-", label="CP-SAT, memory budget")
    ax.plot([p[0] for p in pts_g], [p[1] for p in pts_g], "s--", label="greedy, migration budget")
    ax.scatter([p[0] for p in pts_t], [p[1] for p in pts_t], marker="*", s=160, zorder=5,
               color="tab:red", label="CP-SAT, threshold 2..5 (no budget)")
    for x, y, t in pts_t:
        ax.annotate(f"t={t}", (x, y), textcoords="offset points", xytext=(6, 6))
    ax.axhline(start, color="grey", lw=0.8, ls=":", label="start")
    ax.set_xlabel("memory moved (TB)")
    ax.set_ylabel("imbalance = cpu std + mem std")
    ax.set_title(f"64 hosts / 1,000 VMs with rules (seed {seed}): balance vs migration cost")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    print(f"wrote {out_png}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="skip 500 hosts / 10,000 VMs")
    ap.add_argument("--only", nargs="*", choices=sorted(SIZES), help="run only these clusters")
    ap.add_argument("--targets", action="store_true", help="check the targets on --seeds")
    ap.add_argument("--seeds", type=int, nargs="*", default=[101, 102, 103])
    ap.add_argument("--plot", type=Path, help="write the trade-off curve PNG here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.plot:
            plot_tradeoff(args.plot, args.seed, tmp)
            return 0
        if args.targets:
            print("| seed | start | greedy | cp-sat (ratio) | cp-sat, greedy's memory (ratio) "
                  "| K=10,25,50 cp-sat/greedy | max wall s | targets met |")
            print("|---|---|---|---|---|---|---|---|")
            for s in args.seeds:
                for line in check_targets(s, tmp):
                    print(line, flush=True)
            return 0
        print("| cluster | case | solver | cpu std | mem std | imbalance | max util | migrations "
              "| TB moved | wall s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for label in SIZES:
            if args.quick and label.startswith("500/"):
                continue
            if args.only and label not in args.only:
                continue
            for line in bench_size(label, args.seed, tmp):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
