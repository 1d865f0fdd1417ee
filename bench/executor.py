"""Executor benchmark: plans through the simulated backend, and the planner on engine plans.

    python3 bench/executor.py                  # both tables
    python3 bench/executor.py --quick          # executor table only (no engine runs)
    python3 bench/executor.py --planner-seeds 1 2 3   # table 2 on three seeds
    python3 bench/executor.py --plot bench/out/executor-waves.png   # Gantt of one plan

Table 1 runs a 1,000-migration plan (random moves on a seeded 200-host / 3,000-VM cluster that
fit in the end, ordered by the planner) through the runner, its SQLite journal and the
simulated backend, in-process, and reports wall time. Table 2 runs ``balancer plan`` (the real
command, CP-SAT engine) on the engine's benchmark clusters, orders its moves into waves and
replays the schedule independently of the planner: the highest memory use any receiving host
reaches mid-way (configured memory / capacity; a migrating VM counts on both hosts) must stay
at or below 1.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from balancer.executor.config import parse_config  # noqa: E402
from balancer.executor.journal import Journal  # noqa: E402
from balancer.executor.runner import Runner  # noqa: E402
from balancer.executor.simulated import SimulatedBackend  # noqa: E402
from balancer.model import ClusterSnapshot, Move  # noqa: E402
from balancer.planner import PlannerLimits, Waves, make_waves, moves_from_plan  # noqa: E402
from balancer.snapshot import parse_snapshot  # noqa: E402
from simulator.generate import generate  # noqa: E402

CLUSTERS = {"16/200": (16, 200, False), "64/1000+rules": (64, 1000, True),
            "500/10000": (500, 10000, False)}


def random_moves(s: ClusterSnapshot, n: int, seed: int) -> list[Move]:
    rng = random.Random(seed)
    cap = {h.name: h.mem_capacity for h in s.hosts}
    used: Counter[str] = Counter()
    for v in s.vms:
        used[v.host] += v.mem
    moves: list[Move] = []
    for v in rng.sample(list(s.vms), len(s.vms)):
        if len(moves) == n:
            break
        options = [h for h in cap if h != v.host and used[h] + v.mem <= cap[h]]
        if options:
            t = rng.choice(options)
            used[t] += v.mem
            used[v.host] -= v.mem
            moves.append(Move(v.name, v.host, t, "bench", v.mem))
    return moves


def peak_use(s: ClusterSnapshot, waves: Waves) -> tuple[float, int]:
    """Replay the schedule: highest use of a host when it receives a VM, and how many starts
    found their destination without room."""
    cap = {h.name: h.mem_capacity for h in s.hosts}
    used: defaultdict[str, float] = defaultdict(float)
    for v in s.vms:
        used[v.host] += v.mem
    events = sorted([(m.start_s + m.est_seconds, 0, m.id, m) for m in waves.migrations]
                    + [(m.start_s, 1, m.id, m) for m in waves.migrations],
                    key=lambda e: e[:3])
    peak, over = 0.0, 0
    for _, kind, _, m in events:
        if kind:
            used[m.target] += m.mem_mb
            peak = max(peak, used[m.target] / cap[m.target])
            over += used[m.target] > cap[m.target]
        else:
            used[m.source] -= m.mem_mb
    return peak, over


def executor_rows(n: int, seed: int) -> list[str]:
    snap = parse_snapshot(generate(200, 3000, seed))
    moves = random_moves(snap, n, seed)
    t0 = time.perf_counter()
    waves = make_waves(snap, moves)
    t_plan = time.perf_counter() - t0
    rows = []
    cases = [("journal normal", {"journal": {"synchronous": "normal"}}),
             ("journal full (fsync)", {"journal": {"synchronous": "full"}}),
             ("normal + 5% faults, 3 attempts",
              {"journal": {"synchronous": "normal"}, "retry": {"attempts": 3, "backoff_s": 5},
               "simulated": {"seed": seed, "faults": {"failure_rate": 0.05}}})]
    for label, data in cases:
        cfg = parse_config(data)
        with tempfile.TemporaryDirectory() as tmp:
            backend = SimulatedBackend.from_snapshot(snap, cfg, persist=False)
            journal = Journal(Path(tmp) / "j.sqlite", synchronous=cfg.journal.synchronous)
            runner = Runner(backend, journal, cfg,
                            {h.name: float(h.mem_capacity) for h in snap.hosts})
            t0 = time.perf_counter()
            summary = runner.run(waves)
            wall = time.perf_counter() - t0
            journal.close()
        c = summary.counts
        rows.append(f"| {label} | {len(waves.migrations)} | {len(waves.grouped())} | "
                    f"{t_plan:.2f} | **{wall:.2f}** | {1e3 * wall / len(waves.migrations):.2f} | "
                    f"{summary.clock_s:.0f} | {waves.makespan_s:.0f} | {c['succeeded']} | "
                    f"{c['failed']} | {summary.journal_commits} |")
    return rows


def planner_rows(seed: int, tmp: Path) -> list[str]:
    rows = []
    for label, (n_h, n_v, rules) in CLUSTERS.items():
        doc = generate(n_h, n_v, seed, rules=rules)
        path = tmp / f"{n_h}-{n_v}.json"
        path.write_text(json.dumps(doc))
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "balancer.cli", "plan", str(path),
                               "--format", "json", "--threshold", "5", "--seed", str(seed)],
                              capture_output=True, text=True)
        t_engine = time.monotonic() - t0
        if proc.returncode != 0:
            raise SystemExit(f"balancer plan failed: {proc.stderr.strip()}")
        plan = json.loads(proc.stdout)
        snap = parse_snapshot(doc)
        t0 = time.perf_counter()
        waves = make_waves(snap, moves_from_plan(plan), PlannerLimits())
        t_plan = time.perf_counter() - t0
        peak, over = peak_use(snap, waves)
        start_peak = max(sum(v.mem for v in snap.vms if v.host == h.name) / h.mem_capacity
                         for h in snap.hosts)
        rows.append(f"| {label} | {seed} | {len(plan['migrations'])} | {len(waves.migrations)} | "
                    f"{len(waves.grouped())} | {len(waves.parked)} | {waves.makespan_s:.0f} | "
                    f"{t_plan:.3f} | {start_peak:.3f} | **{peak:.3f}** | {over} | "
                    f"{t_engine:.0f} |")
    return rows


def plot(path: Path, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snap = parse_snapshot(generate(16, 200, seed))
    waves = make_waves(snap, random_moves(snap, 80, seed))
    fig, ax = plt.subplots(figsize=(10, 6))
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(waves.migrations):
        ax.barh(i, m.est_seconds, left=m.start_s, color=cmap(m.wave % 10),
                hatch="//" if m.kind != "move" else None)
    ax.set_xlabel("estimated time, s")
    ax.set_ylabel("migration (plan order)")
    ax.set_title(f"80 moves on 16 hosts: {len(waves.grouped())} waves, "
                 f"makespan {waves.makespan_s:.0f} s (colour = wave, hatched = parking)")
    ax.invert_yaxis()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="executor table only")
    ap.add_argument("--migrations", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--planner-seeds", type=int, nargs="+", default=[1],
                    help="seeds of the engine benchmark clusters (table 2)")
    ap.add_argument("--plot", type=Path, help="write a Gantt chart of a plan's waves (PNG)")
    args = ap.parse_args()
    if args.plot:
        plot(args.plot, args.seed)
        return
    print(f"### Executor: {args.migrations} migrations, simulated backend (seed {args.seed})\n")
    print("| case | migrations | waves | planner s | executor wall s | ms/migration | "
          "simulated s | est. makespan s | succeeded | failed | journal commits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in executor_rows(args.migrations, args.seed):
        print(r, flush=True)
    if args.quick:
        return
    print("\n### Planner on the engine's plans (CP-SAT, threshold 5, default limits)\n")
    print("| cluster | seed | engine moves | migrations (with parking) | waves | parked | "
          "est. makespan s | planner s | max host use at start | max use of a receiving host "
          "mid-way | starts over capacity | engine wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.planner_seeds:
            for r in planner_rows(seed, Path(tmp)):
                print(r, flush=True)


if __name__ == "__main__":
    main()
