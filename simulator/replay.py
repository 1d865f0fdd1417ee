"""``balancer replay``: what-if replay of a real trace, replay policies side by side.

    balancer replay --trace KIND:PATH [--hosts N] [--policy P ...] [--interval 5m]
                    [--config FILE] [--report DIR] [--format table|json] [--seed N]
                    [--skip-bad-rows] [--steps N] [--vms N]

``KIND`` is planetlab, bitbrains, alibaba, csv or parquet (``simulator.traces``). ``--policy``
takes registered replay policy names (none, balance, greedy, consolidate) or TOML files
(``policy = "NAME"`` and an ``[args]`` table, see ``configs/replay-*.toml``). ``--config`` is an
experiment file: ``[cluster]`` (host types, power, migration model), ``[replay]`` (interval,
seed) and ``[policies.NAME]`` argument overrides (``configs/beloglazov-planetlab.toml``).
Progress goes to stderr; the table (or JSON) to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

from balancer.errors import InputError

HELP = "replay a real trace through the balancer, policies side by side"

DEMO_TRACE = "planetlab:sample"
DEMO_STEPS = 96  # 8 hours of 5-minute steps
DEMO_POLICIES = ("none", "consolidate")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")


def parse_duration(text: str) -> float:
    """``300``, ``300s``, ``5m``, ``1h`` -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"--interval must look like 300s, 5m or 1h, got {text!r}")
    value = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--interval must be > 0, got {text!r}")
    return value


def _positive_int(name: str):  # noqa: ANN202
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got {text!r}") \
                from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {text!r}")
        return v
    return parse


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be a whole number, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"--seed must be >= 0, got {text!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", metavar="KIND:PATH",
                   help="planetlab:DIR|FILE, bitbrains:DIR|FILE, alibaba:FILE|DIR, csv:FILE, "
                        "parquet:FILE; bundled samples by name: planetlab:sample, "
                        "planetlab:20110306, bitbrains:sample, alibaba:sample")
    p.add_argument("--demo", action="store_true",
                   help=f"replay the bundled PlanetLab sample day (the first {DEMO_STEPS} steps "
                        f"unless --steps; policies {' '.join(DEMO_POLICIES)} unless --policy)")
    p.add_argument("--hosts", type=_positive_int("--hosts"), metavar="N",
                   help="number of hosts (default: from --config, else sized to the trace)")
    p.add_argument("--policy", nargs="+", action="extend", metavar="P",
                   help="replay policies to compare: names (none, balance, greedy, "
                        "consolidate) or TOML files (default: balance)")
    p.add_argument("--interval", type=parse_duration, default=None,
                   help="how often the balancer runs, e.g. 5m (default: every trace step)")
    p.add_argument("--config", metavar="FILE", help="experiment TOML: [cluster], [replay], "
                   "[policies.NAME]")
    p.add_argument("--report", metavar="DIR", help="write an HTML report, plots and CSV here")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--seed", type=_nonneg_int, default=None)
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip malformed trace rows (counted) instead of failing")
    p.add_argument("--steps", type=_positive_int("--steps"), metavar="N",
                   help="replay only the first N trace steps")
    p.add_argument("--vms", type=_positive_int("--vms"), metavar="N",
                   help="replay only the first N VMs of the trace")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------- configuration files


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise InputError(f"{what} {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{what} {path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise InputError(f"{what} {path}: {exc.strerror}") from None


EXPERIMENT_KEYS = {"cluster", "replay", "policies", "description", "trace"}
REPLAY_KEYS = {"interval", "seed", "policies"}


def load_experiment(path: str | Path) -> dict[str, Any]:
    """Read and validate an experiment file; returns {cluster, replay, policies}."""
    from simulator.cluster import ClusterConfig

    doc = read_toml(path, "--config")
    for key in doc:
        if key not in EXPERIMENT_KEYS:
            raise InputError(f"--config {path}: field {key!r} is unknown "
                             f"(known: {', '.join(sorted(EXPERIMENT_KEYS))})")
    out: dict[str, Any] = {"cluster": None, "replay": {}, "policies": {}}
    if "cluster" in doc:
        out["cluster"] = ClusterConfig.from_dict(doc["cluster"], where=f"{path}: cluster")
    rep = doc.get("replay", {})
    for key in rep:
        if key not in REPLAY_KEYS:
            raise InputError(f"--config {path}: field 'replay.{key}' is unknown "
                             f"(known: {', '.join(sorted(REPLAY_KEYS))})")
    if "interval" in rep:
        try:
            rep["interval_s"] = parse_duration(str(rep.pop("interval")))
        except argparse.ArgumentTypeError as exc:
            raise InputError(f"--config {path}: field 'replay.interval': {exc}") from None
    if "seed" in rep and (not isinstance(rep["seed"], int) or rep["seed"] < 0):
        raise InputError(f"--config {path}: field 'replay.seed' must be a whole number >= 0")
    out["replay"] = rep
    pol = doc.get("policies", {})
    if not isinstance(pol, dict):
        raise InputError(f"--config {path}: field 'policies' must be a table")
    from policies import replay_policies

    for name, args in pol.items():
        replay_policies.make(name, args, where=f"--config {path}: policies.{name}")
    out["policies"] = pol
    return out


def policy_from_spec(spec: str, overrides: dict[str, dict[str, Any]]) -> tuple[str, Any]:
    """A policy name or a TOML file -> (label, policy)."""
    from policies import replay_policies

    if spec.endswith(".toml") or "/" in spec:
        doc = read_toml(spec, "--policy")
        for key in doc:
            if key not in ("policy", "args", "description"):
                raise InputError(f"--policy {spec}: field {key!r} is unknown "
                                 "(known: args, description, policy)")
        name = doc.get("policy")
        if not isinstance(name, str):
            raise InputError(f"--policy {spec}: field 'policy' (the policy name) is required")
        args = dict(overrides.get(name, {}))
        args.update(doc.get("args", {}))
        return name, replay_policies.make(name, args, where=f"--policy {spec}")
    return spec, replay_policies.make(spec, overrides.get(spec, {}))


def default_cluster(work: Any, hosts: int | None) -> Any:
    from simulator.cluster import DEFAULT_HOST_TYPES, ClusterConfig

    if hosts is None:
        mean_cpu = sum(t.millicores for t in DEFAULT_HOST_TYPES) / len(DEFAULT_HOST_TYPES)
        mean_mem = sum(t.mem_mb for t in DEFAULT_HOST_TYPES) / len(DEFAULT_HOST_TYPES)
        need_mem = float(work.mem_mb.sum()) / (0.8 * mean_mem)
        need_cpu = float(work.cpu.sum(axis=1).max()) / (0.6 * mean_cpu)
        hosts = max(2, math.ceil(max(need_mem, need_cpu)))
    return ClusterConfig(host_types=DEFAULT_HOST_TYPES, hosts=hosts)


# ---------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    from simulator import traces
    from simulator.cluster import Simulator, workload_from_trace
    from simulator.metrics import table

    if args.demo:
        if args.trace:
            raise InputError("replay: give --trace or --demo, not both")
        args.trace = DEMO_TRACE
        args.steps = args.steps or DEMO_STEPS
        args.policy = args.policy or list(DEMO_POLICIES)
    if not args.trace:
        raise InputError("replay: --trace KIND:PATH (or --demo) is required")
    exp = load_experiment(args.config) if args.config else \
        {"cluster": None, "replay": {}, "policies": {}}
    trace = traces.load(args.trace, skip_bad=args.skip_bad_rows, max_vms=args.vms)
    if args.steps:
        trace = trace.head(steps=args.steps)
    cfg = exp["cluster"]
    if cfg is not None and args.hosts:
        from dataclasses import replace
        cfg = replace(cfg, hosts=args.hosts)
    if cfg is None:
        work0 = workload_from_trace(trace, default_cluster_probe())
        cfg = default_cluster(work0, args.hosts)
    work = workload_from_trace(trace, cfg)
    interval = args.interval or exp["replay"].get("interval_s") or trace.interval_s
    every = interval / trace.interval_s
    if abs(every - round(every)) > 1e-9 or round(every) < 1:
        raise InputError(f"--interval: {interval:g} s is not a multiple of the trace step "
                         f"({trace.interval_s} s)")
    every = int(round(every))
    seed = args.seed if args.seed is not None else int(exp["replay"].get("seed", 0))
    specs = args.policy or exp["replay"].get("policies") or ["balance"]
    policies = [policy_from_spec(s, exp["policies"]) for s in specs]
    labels = [p[0] for p in policies]
    if len(set(labels)) != len(labels):
        raise InputError(f"--policy: a policy is named twice ({', '.join(labels)})")
    from tqdm import tqdm

    results = []
    bar = tqdm(total=work.cpu.shape[0] * len(policies), file=sys.stderr, unit="step",
               disable=args.no_progress, dynamic_ncols=True)
    try:
        for label, pol in policies:
            bar.set_description(label)
            sim = Simulator(work, cfg, pol, every=every, seed=seed, progress=bar.update)
            results.append(sim.run(label))
    finally:
        bar.close()
    summaries = [r.summary for r in results]
    meta = {
        "trace": {"kind": trace.kind, "source": trace.source, "vms": trace.n_vms,
                  "steps": trace.steps, "interval_s": trace.interval_s,
                  "skipped_rows": trace.skipped, "notes": trace.notes},
        "cluster": {"hosts": cfg.hosts, "host_types": [t.name for t in cfg.host_types],
                    "memory_binding": cfg.memory_binding,
                    "empty_host_off": cfg.empty_host_off,
                    "migration_time": cfg.migration_time,
                    "bandwidth_mbps": cfg.bandwidth_mbps},
        "replay": {"interval_s": interval, "seed": seed, "config": args.config},
    }
    if args.report:
        from simulator.report import write_report
        write_report(Path(args.report), results, meta)
    if args.format == "json":
        doc = dict(meta)
        doc["policies"] = [s.as_dict() for s in summaries]
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        t = meta["trace"]
        sys.stdout.write(f"trace {t['kind']}:{t['source']}  {t['vms']} VMs x {t['steps']} steps "
                         f"of {t['interval_s']} s  |  {cfg.hosts} hosts  |  balancer every "
                         f"{interval:g} s  |  seed {seed}\n")
        if trace.skipped:
            sys.stdout.write(f"skipped {trace.skipped} malformed trace rows\n")
        sys.stdout.write(table(summaries))
        if args.report:
            sys.stdout.write(f"report: {Path(args.report) / 'index.html'}\n")
    return 0


def default_cluster_probe() -> Any:
    """A cluster config used only to size VMs before the real one is known."""
    from simulator.cluster import DEFAULT_HOST_TYPES, ClusterConfig

    return ClusterConfig(host_types=DEFAULT_HOST_TYPES, hosts=1)


__all__ = ["HELP", "add_arguments", "load_experiment", "parse_duration",
           "policy_from_spec", "run"]
