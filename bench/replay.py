"""Replay benchmark: every bundled PlanetLab day, and the Bitbrains and Alibaba samples day by
day, per policy, with the spread (min, median, max) over days.

    python3 bench/replay.py [--policy power consolidate none] [--config FILE] [--mem-config FILE]
                            [--sets planetlab bitbrains alibaba] [--days N] [--json FILE]

PlanetLab: each bundled day (``simulator.traces.PLANETLAB_DAYS``) with
``configs/beloglazov-planetlab.toml`` (CloudSim 3.0.3's setup, memory not binding), beside
CloudSim's LR-MMT-1.2 re-run on the same day, then the realistic run (memory binding,
``configs/beloglazov-planetlab-mem.toml``) with the hosts memory forces on. Checks the targets
per day: energy <= LR-MMT-1.2's, SLATAH <= 1 %, migrations <= LR-MMT-1.2's / 5, a day in
<= 60 s per policy. ``power@heldout`` replays each day with the parameters
``bench/tune_power.py`` chose with that day held out (``bench/power-folds.json``): the targets
are judged on those rows; ``power`` uses the config's (chosen on every day, that one
included). Bitbrains and Alibaba: the bundled samples cut into days of 288 steps (the first
``--days``), on the default cluster sized to each day. Wall seconds depend on the load of
the machine; say what it was when you quote them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulator import traces  # noqa: E402
from simulator.replay import load_experiment, run_one  # noqa: E402

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
SECONDS_MAX = 60.0
DAY = 288


def spread(xs: list[float], fmt: str) -> str:
    if not xs:
        return "-"
    return (f"{format(min(xs), fmt)} / {format(statistics.median(xs), fmt)} / "
            f"{format(max(xs), fmt)}")


FOLDS = ROOT / "bench" / "power-folds.json"


def held_out(day: str) -> dict:
    """The parameters ``bench/tune_power.py`` chose with ``day`` held out ({} for a day it did
    not tune with: the config's then apply)."""
    if not FOLDS.exists():
        return {}
    params = dict(json.loads(FOLDS.read_text())["folds"].get(day, {}))
    params.pop("solver", None)  # tuned with the rule (fast); the parameters serve both modes
    return params


def policy_arg(spec: str, day: str | None = None) -> tuple[str, str, dict]:
    """``NAME`` or ``NAME:key=value,...`` -> (label, name, params). ``NAME@heldout`` takes the
    parameters chosen with ``day`` held out (bench/power-folds.json) on top of the config's."""
    name, _, rest = spec.partition(":")
    params: dict = {}
    if name.endswith("@heldout"):
        name = name[: -len("@heldout")]
        params.update(held_out(day) if day else {})
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        try:
            params[k] = json.loads(v)
        except json.JSONDecodeError:
            params[k] = v
    return spec, name, params


def row(label: str, r: dict) -> str:
    return (f"{label:<34} {r['seconds']:>7.1f} {r['energy_kwh']:>10.2f} {r['migrations']:>10,} "
            f"{100 * r['slatah']:>7.2f}% {100 * r['pdm']:>7.3f}% {r['mean_active_hosts']:>7.1f} "
            f"{r.get('forecast_wape', float('nan')):>6.3f}")


HEAD = (f"{'day / policy':<34} {'seconds':>7} {'energy kWh':>10} {'migrations':>10} "
        f"{'SLATAH':>8} {'PDM':>8} {'hosts':>7} {'WAPE':>6}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", nargs="+",
                    default=["power@heldout", "power@heldout:solver=greedy", "power", "none"],
                    help="NAME or NAME:key=value,... (parameters on top of the config's)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "beloglazov-planetlab.toml"))
    ap.add_argument("--mem-config",
                    default=str(ROOT / "configs" / "beloglazov-planetlab-mem.toml"))
    ap.add_argument("--sets", nargs="+", default=["planetlab", "bitbrains", "alibaba"])
    ap.add_argument("--days", type=int, default=7, help="days of Bitbrains/Alibaba to replay")
    ap.add_argument("--json", default=None, help="write every run here")
    args = ap.parse_args()
    exp = load_experiment(args.config)
    mem_exp = load_experiment(args.mem_config)
    runs: list[dict] = []
    ok = True
    if "planetlab" in args.sets:
        print(f"PlanetLab, {exp['cluster'].hosts} hosts, config {Path(args.config).name} "
              "(memory not binding) and, indented, the realistic run "
              f"({Path(args.mem_config).name}, memory binding)")
        print(HEAD)
        per_policy: dict[str, list[dict]] = {}
        for day in traces.PLANETLAB_DAYS:
            tr = traces.load(f"planetlab:{day}")
            lr = REFERENCE.get(day, {}).get("LR-MMT-1.2")
            for spec in args.policy:
                pol, name, params = policy_arg(spec, day)
                r = run_one(tr, name, params, config=exp)
                r["day"], r["set"] = day, "planetlab"
                runs.append(r)
                per_policy.setdefault(pol, []).append(r)
                print(row(f"{day} {pol}", r), flush=True)
                m = run_one(tr, name, params, config=mem_exp)
                m["day"], m["set"] = day, "planetlab-mem"
                runs.append(m)
                print(row(f"  {day} {pol} (memory binds)", m), flush=True)
                if lr is not None:
                    r["lr_energy"], r["lr_migrations"] = lr[0], lr[1]
            if lr is not None:
                print(f"{day + ' LR-MMT-1.2 (CloudSim)':<34} {'(ref)':>7} {lr[0]:>10.2f} "
                      f"{lr[1]:>10,} " + (f"{100 * lr[2]:>7.2f}%" if lr[2] else ""))
        print("\nTargets per day (policy: energy <= LR-MMT-1.2, SLATAH <= 1 %, migrations <= "
              f"LR-MMT-1.2 / 5, <= {SECONDS_MAX:.0f} s):")
        heldout_run = any(p.split(":")[0] == "power@heldout" for p in per_policy)
        for pol, rs in per_policy.items():
            for r in rs:
                checks = [("seconds", r["seconds"] <= SECONDS_MAX, f"{r['seconds']:.1f} s")]
                base = pol.split(":")[0]
                judged = base in ("power@heldout", "power", "consolidate")
                # with held-out rows present, they are what the targets are judged on (the
                # config's parameters were chosen on every day, this one included)
                counted = base == "power@heldout" or (judged and not heldout_run)
                if "lr_energy" in r and judged:
                    checks += [
                        ("energy", r["energy_kwh"] <= r["lr_energy"],
                         f"{r['energy_kwh']:.2f} vs {r['lr_energy']:.2f} kWh "
                         f"({r['energy_kwh'] / r['lr_energy']:.3f}x)"),
                        ("SLATAH", r["slatah"] <= 0.01, f"{100 * r['slatah']:.2f} %"),
                        ("migrations", r["migrations"] <= r["lr_migrations"] / 5,
                         f"{r['migrations']:,} vs {r['lr_migrations'] / 5:,.0f}")]
                for label, good, fig in checks:
                    if counted or label == "seconds":
                        ok &= good
                    print(f"  {r['day']} {pol:<28} {label:<10} {fig:<34} "
                          f"{'MET' if good else 'NOT MET'}"
                          + ("" if counted or label == "seconds" else " (not judged)"))
        print("\nSpread over PlanetLab days (min / median / max):")
        for pol, rs in per_policy.items():
            ratio = [r["energy_kwh"] / r["lr_energy"] for r in rs if "lr_energy" in r]
            print(f"  {pol:<20} energy/LR-MMT {spread(ratio, '.3f')}  SLATAH % "
                  f"{spread([100 * r['slatah'] for r in rs], '.2f')}  migrations "
                  f"{spread([r['migrations'] for r in rs], ',.0f')}  seconds "
                  f"{spread([r['seconds'] for r in rs], '.1f')}")
    for kind in ("bitbrains", "alibaba"):
        if kind not in args.sets:
            continue
        full = traces.load(f"{kind}:sample")
        n_days = min(args.days, full.steps // DAY)
        print(f"\n{kind}:sample, {full.n_vms} VMs, days 1..{n_days} of {DAY} steps, default "
              "cluster sized to each day")
        print(HEAD)
        per_policy = {}
        for d in range(n_days):
            part = full.window(d * DAY, DAY)
            for spec in args.policy:
                pol, name, params = policy_arg(spec)
                r = run_one(part, name, params)
                r["day"], r["set"] = d + 1, kind
                runs.append(r)
                per_policy.setdefault(pol, []).append(r)
                print(row(f"day {d + 1} {pol} ({r['hosts']} hosts)", r), flush=True)
        print(f"Spread over {kind} days (min / median / max):")
        for pol, rs in per_policy.items():
            print(f"  {pol:<20} energy kWh {spread([r['energy_kwh'] for r in rs], '.2f')}  "
                  f"SLATAH % {spread([100 * r['slatah'] for r in rs], '.2f')}  migrations "
                  f"{spread([r['migrations'] for r in rs], ',.0f')}  seconds "
                  f"{spread([r['seconds'] for r in rs], '.1f')}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1, default=str))
    print(f"\nall targets met: {ok} (wall time measured at {time.strftime('%Y-%m-%d %H:%M')})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
