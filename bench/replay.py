"""Replay benchmark: one PlanetLab day, 800 hosts, 288 steps, balancer every step, per policy.

    python3 bench/replay.py [--day 20110303] [--policy none balance greedy consolidate]
                            [--config configs/beloglazov-planetlab.toml]

Prints one row per policy (wall seconds of the replay, energy, migrations, SLATAH, PDM) beside
CloudSim 3.0.3's reference policies re-run on the same day, and checks the issue's targets:
under 120 s per policy; ``consolidate`` at most LR-MMT-1.2's energy, SLATAH at most 1 %, at
most a fifth of LR-MMT-1.2's migrations.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulator import (
    replay_policies,  # noqa: E402
    traces,  # noqa: E402
)
from simulator.cluster import Simulator, workload_from_trace  # noqa: E402
from simulator.replay import load_experiment  # noqa: E402

# CloudSim 3.0.3 power package re-run on these days (energy kWh, migrations, SLATAH, PDM).
REFERENCE = {
    "20110303": {"THR-MMT-0.8": (198.08, 27728, 0.0500, 0.0007),
                 "IQR-MMT-1.5": (193.63, 27592, 0.0502, 0.0007),
                 "MAD-MMT-2.5": (189.79, 27781, 0.0509, 0.0007),
                 "LR-MMT-1.2": (167.83, 27649, 0.0572, 0.0008)},
    "20110306": {"THR-MMT-0.8": (150.70, 21575, None, None),
                 "IQR-MMT-1.5": (147.93, 21748, None, None),
                 "MAD-MMT-2.5": (145.85, 22129, None, None),
                 "LR-MMT-1.2": (127.98, 21661, None, None)},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--day", default="20110303")
    ap.add_argument("--traces", default=None,
                    help="folder holding DAY (per-VM files) or DAY.csv.gz (default: the bundled "
                         "samples)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "beloglazov-planetlab.toml"))
    ap.add_argument("--policy", nargs="+", default=["none", "balance", "greedy", "consolidate"])
    args = ap.parse_args()
    exp = load_experiment(args.config)
    cfg = exp["cluster"]
    if args.traces is None:
        tr = traces.load(f"planetlab:{args.day}")
    else:
        base = Path(args.traces)
        day = base / args.day if (base / args.day).exists() else base / f"{args.day}.csv.gz"
        tr = traces.load(f"planetlab:{day}")
    work = workload_from_trace(tr, cfg)
    seed = int(exp["replay"].get("seed", 0))
    print(f"PlanetLab {args.day}: {tr.n_vms} VMs, {cfg.hosts} hosts, {tr.steps} steps, "
          f"balancer every step; config {Path(args.config).name}, memory binding "
          f"{cfg.memory_binding}")
    print(f"{'policy':<14} {'seconds':>8} {'energy kWh':>11} {'migrations':>11} "
          f"{'SLATAH':>8} {'PDM':>8} {'SLAV':>9} {'hosts':>6}")
    results = {}
    for name in args.policy:
        pol = replay_policies.make(name, exp["policies"].get(name, {}))
        t0 = time.monotonic()
        s = Simulator(work, cfg, pol, seed=seed).run(name).summary
        secs = time.monotonic() - t0
        results[name] = (s, secs)
        print(f"{name:<14} {secs:>8.1f} {s.energy_kwh:>11.2f} {s.migrations:>11,} "
              f"{100 * s.slatah:>7.2f}% {100 * s.pdm:>7.3f}% {s.slav:>9.2e} "
              f"{s.mean_active_hosts:>6.1f}", flush=True)
    ref = REFERENCE.get(args.day, {})
    for name, (e, m, sl, pdm) in ref.items():
        sls = f"{100 * sl:>7.2f}%" if sl is not None else f"{'':>8}"
        pds = f"{100 * pdm:>7.3f}%" if pdm is not None else f"{'':>8}"
        print(f"{name:<14} {'(ref)':>8} {e:>11.2f} {m:>11,} {sls} {pds}")
    ok = True
    for name, (_, secs) in results.items():
        good = secs < 120
        ok &= good
        print(f"target: {name} replayed in under 120 s: {secs:.1f} s "
              f"{'MET' if good else 'NOT MET'}")
    if "consolidate" in results and "LR-MMT-1.2" in ref and not cfg.memory_binding:
        s, _ = results["consolidate"]
        e, m, _, _ = ref["LR-MMT-1.2"]
        checks = [("energy <= LR-MMT-1.2", s.energy_kwh <= e, f"{s.energy_kwh:.2f} vs {e}"),
                  ("SLATAH <= 1 %", s.slatah <= 0.01, f"{100 * s.slatah:.2f} %"),
                  ("migrations <= LR-MMT-1.2 / 5", s.migrations <= m / 5,
                   f"{s.migrations:,} vs {m / 5:,.0f}")]
        for label, good, fig in checks:
            ok &= good
            print(f"target: consolidate {label}: {fig} {'MET' if good else 'NOT MET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
