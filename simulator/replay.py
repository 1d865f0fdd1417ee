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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from balancer.errors import InputError

HELP = "replay a real trace through the balancer, policies side by side"

DEMO_TRACE = "planetlab:sample"
DEMO_STEPS = 96  # 8 hours of 5-minute steps
DEMO_POLICIES = ("none", "power")

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
    from simulator import replay_policies

    for name, args in pol.items():
        replay_policies.make(name, args, where=f"--config {path}: policies.{name}")
    out["policies"] = pol
    return out


def policy_from_spec(spec: str, overrides: dict[str, dict[str, Any]]) -> tuple[str, Any]:
    """A policy name or a TOML file -> (label, policy)."""
    from simulator import replay_policies

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


SIZING_UTIL = 0.7  # default cluster: hosts enough to hold the trace's peak CPU demand at 70 %
SIZING_MEM_UTIL = 0.9  # ... and its configured memory at 90 %


@dataclass(frozen=True)
class Sizing:
    """How the default cluster was sized from the trace (printed and put in the JSON)."""

    hosts: int
    host_type: str
    host_cores: float
    host_mem_gib: float
    peak_cpu_cores: float
    peak_step: int
    cpu_util: float
    hosts_for_cpu: int
    mem_gib: float
    mem_util: float
    hosts_for_mem: int
    given: bool = False  # --hosts overrode the sizing

    def line(self) -> str:
        if self.given:
            return f"{self.hosts} hosts of {self.host_type} (--hosts)"
        return (f"{self.hosts} hosts of {self.host_type} ({self.host_cores:g} cores, "
                f"{self.host_mem_gib:g} GiB), sized to the trace: peak CPU demand "
                f"{self.peak_cpu_cores:,.1f} cores (step {self.peak_step}) at "
                f"{100 * self.cpu_util:g} % -> {self.hosts_for_cpu}; configured memory "
                f"{self.mem_gib:,.0f} GiB at {100 * self.mem_util:g} % -> {self.hosts_for_mem}"
                + ("" if self.hosts == max(2, self.hosts_for_cpu, self.hosts_for_mem) else
                   f"; {self.hosts} for the first placement to fit"))

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _ffd_bins(sizes: np.ndarray, cap: float) -> int:
    """Bins of ``cap`` that first-fit decreasing needs for ``sizes`` (one bin per oversize)."""
    free: list[float] = []
    for x in sorted(sizes.tolist(), reverse=True):
        for i, f in enumerate(free):
            if x <= f:
                free[i] -= x
                break
        else:
            free.append(max(cap - x, 0.0))
    return len(free)


def size_cluster(work: Any, hosts: int | None = None, *, util: float = SIZING_UTIL,
                 mem_util: float = SIZING_MEM_UTIL) -> tuple[Any, Sizing]:
    """The default cluster: ``hosts`` (or enough to hold the trace's peak CPU demand at ``util``
    of each host's CPU and its configured memory at ``mem_util``, packed first-fit decreasing)
    of the default host type: the first of ``DEFAULT_HOST_TYPES`` that holds the largest VM."""
    from simulator.cluster import DEFAULT_HOST_TYPES, ClusterConfig, Simulator

    big_mem = float(work.mem_mb.max()) if len(work.mem_mb) else 0.0
    big_cpu = float(work.vcpus.max()) if len(work.vcpus) else 0.0
    fits = [t for t in DEFAULT_HOST_TYPES if t.mem_mb >= big_mem and t.cores >= big_cpu]
    if not fits:
        j = int(np.argmax(work.mem_mb))
        raise InputError(f"trace: VM {work.names[j]!r} ({big_mem / 1024:.1f} GiB, "
                         f"{work.vcpus[j]:g} cores) is larger than every default host type; "
                         "give a cluster in --config")
    ht = fits[0]
    total = work.cpu.sum(axis=1) / 1000.0  # cores per step
    peak_step = int(np.argmax(total)) if total.size else 0
    peak = float(total[peak_step]) if total.size else 0.0
    n_cpu = math.ceil(peak / (util * ht.cores) - 1e-9)
    mem_gib = float(work.mem_mb.sum()) / 1024.0
    n_mem = _ffd_bins(np.asarray(work.mem_mb, dtype=float), mem_util * ht.mem_mb)
    n = hosts or max(2, n_cpu, n_mem)
    if hosts is None:  # the first placement (first fit by CPU, within memory) must succeed
        from simulator.replay_policies import NoMigrations
        for _ in range(n):
            try:
                Simulator(work, ClusterConfig(host_types=(ht,), hosts=n), NoMigrations())
                break
            except InputError:
                n += 1
    sizing = Sizing(hosts=n, host_type=ht.name, host_cores=ht.cores,
                    host_mem_gib=ht.mem_mb / 1024.0, peak_cpu_cores=peak, peak_step=peak_step,
                    cpu_util=util, hosts_for_cpu=n_cpu, mem_gib=mem_gib, mem_util=mem_util,
                    hosts_for_mem=n_mem, given=hosts is not None)
    return ClusterConfig(host_types=(ht,), hosts=sizing.hosts), sizing


def default_cluster(work: Any, hosts: int | None) -> Any:
    return size_cluster(work, hosts)[0]


# ---------------------------------------------------------------- one replay, as a function


def _experiment(config: str | Path | dict[str, Any] | None) -> dict[str, Any]:
    if config is None:
        return {"cluster": None, "replay": {}, "policies": {}}
    if isinstance(config, dict):
        return config
    return load_experiment(config)


def prepare(trace: str | Any, config: str | Path | dict[str, Any] | None = None, *,
            hosts: int | None = None, steps: int | None = None, vms: int | None = None,
            skip_bad: bool = False) -> dict[str, Any]:
    """Load the trace and the experiment and build the cluster: everything a replay needs but
    the policy. Returns {trace, exp, cluster, work, sizing (None when the config sets hosts)}."""
    from dataclasses import replace

    from simulator import traces
    from simulator.cluster import workload_from_trace

    exp = _experiment(config)
    if isinstance(trace, str):
        tr = traces.load(trace, skip_bad=skip_bad, max_vms=vms)
    else:
        tr = trace.head(vms=vms) if vms else trace
    if steps:
        tr = tr.head(steps=steps)
    cfg = exp["cluster"]
    sizing = None
    if cfg is not None and hosts:
        cfg = replace(cfg, hosts=hosts)
    if cfg is None:
        cfg, sizing = size_cluster(workload_from_trace(tr, default_cluster_probe()), hosts)
    return {"trace": tr, "exp": exp, "cluster": cfg, "work": workload_from_trace(tr, cfg),
            "sizing": sizing}


def _policy(spec: str, exp: dict[str, Any], params: dict[str, Any] | None) -> tuple[str, Any]:
    """(label, policy) from a name or TOML file, config overrides, then ``params`` on top."""
    if not params:
        return policy_from_spec(spec, exp["policies"])
    from simulator import replay_policies

    if spec.endswith(".toml") or "/" in spec:
        label, _ = policy_from_spec(spec, exp["policies"])  # validates the file
        doc = read_toml(spec, "--policy")
        args = {**exp["policies"].get(label, {}), **doc.get("args", {}), **params}
        return label, replay_policies.make(label, args, where=f"--policy {spec}")
    args = {**exp["policies"].get(spec, {}), **params}
    return spec, replay_policies.make(spec, args)


def replay_meta(ready: dict[str, Any], interval: float, seed: int,
                config: str | Path | None) -> dict[str, Any]:
    """What a replay report and the JSON say about the trace, the cluster and the settings."""
    trace, cfg, sizing = ready["trace"], ready["cluster"], ready["sizing"]
    return {
        "trace": {"kind": trace.kind, "source": trace.source, "vms": trace.n_vms,
                  "steps": trace.steps, "interval_s": trace.interval_s,
                  "skipped_rows": trace.skipped, "notes": trace.notes},
        "cluster": {"hosts": cfg.hosts, "host_types": [t.name for t in cfg.host_types],
                    "memory_binding": cfg.memory_binding,
                    "empty_host_off": cfg.empty_host_off,
                    "migration_time": cfg.migration_time,
                    "bandwidth_mbps": cfg.bandwidth_mbps},
        "replay": {"interval_s": interval, "seed": seed,
                   "config": str(config) if config is not None else None},
        "sizing": sizing.as_dict() if sizing else None,
    }


def replay_settings(ready: dict[str, Any], interval_s: float | None = None,
                    seed: int | None = None) -> tuple[float, int, int]:
    """(interval seconds, trace steps per balancer cycle, seed): the command line's value, else
    the config's ``[replay]``, else every trace step and seed 0."""
    exp, tr = ready["exp"], ready["trace"]
    interval = interval_s or exp["replay"].get("interval_s") or tr.interval_s
    every = _every(interval, tr.interval_s)
    seed = int(exp["replay"].get("seed", 0)) if seed is None else int(seed)
    return interval, every, seed


def replay_policy(ready: dict[str, Any], label: str, policy: Any, *,
                  interval_s: float | None = None, seed: int | None = None,
                  progress: Any = None, config: str | Path | None = None) -> tuple[Any, dict]:
    """Replay one built policy over a ``prepare``d trace: what ``balancer replay`` runs for each
    of its policies, and what ``run_one`` and every ``balancer sweep`` task run. Returns
    (``RunResult``, meta as ``replay_meta``)."""
    from simulator.cluster import Simulator

    interval, every, seed = replay_settings(ready, interval_s, seed)
    res = Simulator(ready["work"], ready["cluster"], policy, every=every, seed=seed,
                    progress=progress).run(label)
    return res, replay_meta(ready, interval, seed, config)


def run_one(trace: str | Any, policy: str = "consolidate", params: dict[str, Any] | None = None,
            config: str | Path | dict[str, Any] | None = None, seed: int | None = None,
            steps: int | None = None, *, vms: int | None = None, hosts: int | None = None,
            interval_s: float | None = None, progress: Any = None) -> dict[str, Any]:
    """Replay ONE policy on ONE trace and return its summary as a plain dict.

    ``trace`` is a spec (``planetlab:sample``, ``bitbrains:DIR``...) or a loaded ``Trace``;
    ``policy`` a registered replay policy name or a policy TOML file; ``params`` override its
    arguments on top of the config's ``[policies.NAME]``; ``config`` an experiment TOML path (or
    a dict from ``load_experiment``), None for the default cluster sized to the trace; ``seed``
    defaults to the config's ``replay.seed`` (else 0); ``progress`` is called with 1 per step.
    The same arguments give the same figures (all but ``seconds``, the wall time). Keys: the
    ``Summary`` fields (``policy``, ``energy_kwh``, ``slatah``, ``migrations``...) plus
    ``hosts``, ``vms``, ``steps``, ``seed``, ``trace`` and ``sizing``.
    """
    ready = prepare(trace, config, hosts=hosts, steps=steps, vms=vms)
    label, pol = _policy(policy, ready["exp"], params)
    res, meta = replay_policy(ready, label, pol, interval_s=interval_s, seed=seed,
                              progress=progress)
    tr = ready["trace"]
    out = res.summary.as_dict()
    out.update({"hosts": meta["cluster"]["hosts"], "vms": tr.n_vms, "steps": tr.steps,
                "seed": meta["replay"]["seed"], "trace": f"{tr.kind}:{tr.source}",
                "sizing": meta["sizing"]})
    out.update(res.extra)
    return out


def _every(interval: float, trace_interval: int) -> int:
    every = interval / trace_interval
    if abs(every - round(every)) > 1e-9 or round(every) < 1:
        raise InputError(f"--interval: {interval:g} s is not a multiple of the trace step "
                         f"({trace_interval} s)")
    return int(round(every))


# ---------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    from simulator.metrics import table

    if args.demo:
        if args.trace:
            raise InputError("replay: give --trace or --demo, not both")
        args.trace = DEMO_TRACE
        args.steps = args.steps or DEMO_STEPS
        args.policy = args.policy or list(DEMO_POLICIES)
    if not args.trace:
        raise InputError("replay: --trace KIND:PATH (or --demo) is required")
    ready = prepare(args.trace, args.config, hosts=args.hosts, steps=args.steps, vms=args.vms,
                    skip_bad=args.skip_bad_rows)
    exp, cfg, work, trace = ready["exp"], ready["cluster"], ready["work"], ready["trace"]
    sizing = ready["sizing"]
    interval, _, seed = replay_settings(ready, args.interval, args.seed)
    specs = args.policy or exp["replay"].get("policies") or ["balance"]
    policies = [policy_from_spec(s, exp["policies"]) for s in specs]
    labels = [p[0] for p in policies]
    if len(set(labels)) != len(labels):
        raise InputError(f"--policy: a policy is named twice ({', '.join(labels)})")
    from tqdm import tqdm

    results = []
    meta: dict[str, Any] = replay_meta(ready, interval, seed, args.config)
    bar = tqdm(total=work.cpu.shape[0] * len(policies), file=sys.stderr, unit="step",
               disable=args.no_progress, dynamic_ncols=True)
    try:
        for label, pol in policies:
            bar.set_description(label)
            res, meta = replay_policy(ready, label, pol, interval_s=args.interval, seed=seed,
                                      progress=bar.update, config=args.config)
            results.append(res)
    finally:
        bar.close()
    summaries = [r.summary for r in results]
    if args.report:
        from simulator.report import write_report
        write_report(Path(args.report), results, meta)
    if args.format == "json":
        doc = dict(meta)
        doc["policies"] = [{**r.summary.as_dict(), **r.extra} for r in results]
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        t = meta["trace"]
        sys.stdout.write(f"trace {t['kind']}:{t['source']}  {t['vms']} VMs x {t['steps']} steps "
                         f"of {t['interval_s']} s  |  {cfg.hosts} hosts  |  balancer every "
                         f"{interval:g} s  |  seed {seed}\n")
        if sizing is not None:
            sys.stdout.write(f"cluster: {sizing.line()}\n")
        if trace.skipped:
            sys.stdout.write(f"skipped {trace.skipped} malformed trace rows\n")
        sys.stdout.write(table(summaries))
        for r in results:
            x = r.extra
            if "forecast_wape" in x:
                sys.stdout.write(
                    f"{r.summary.policy}: demand forecast {x['forecast']} - WAPE "
                    f"{x['forecast_wape']:.3f}, under-forecast VM-steps "
                    f"{100 * x['forecast_under_share']:.1f} %; CP-SAT power solves "
                    f"{x['power_solves']}\n")
            if x.get("failed_moves"):
                sys.stdout.write(f"{r.summary.policy}: {x['failed_moves']} moves not carried "
                                 "out by the executor\n")
        if args.report:
            sys.stdout.write(f"report: {Path(args.report) / 'index.html'}\n")
    return 0


def default_cluster_probe() -> Any:
    """A cluster config used only to size VMs before the real one is known."""
    from simulator.cluster import DEFAULT_HOST_TYPES, ClusterConfig

    return ClusterConfig(host_types=DEFAULT_HOST_TYPES, hosts=1)


__all__ = ["HELP", "SIZING_UTIL", "Sizing", "add_arguments", "load_experiment",
           "parse_duration", "policy_from_spec", "prepare", "replay_meta", "replay_policy",
           "replay_settings", "run", "run_one", "size_cluster"]
