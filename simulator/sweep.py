"""``balancer sweep``: many what-if replays (traces x policies x parameter values) on Dask.

    balancer sweep --trace KIND:PATH [--trace ...] --policy P [--policy ...]
                   [--param NAME=V1,V2,...] [--config FILE] [--seed N] [--steps N]
                   [--scheduler local|tcp://HOST:PORT] [--report DIR] [--format table|json]

Every (trace, policy, parameter values) replay is one Dask task, computed by the same function
as ``balancer replay`` (so a run equals the serial replay with the same config and seed). The
default ``--scheduler local`` starts a ``LocalCluster`` of worker processes (one per core, one
thread each, never more workers than runs); ``tcp://HOST:PORT`` uses a cluster started with
``dask scheduler`` / ``dask worker``.

What the workers read: a task carries the trace *spec* (``KIND:/absolute/path``), never the
trace. Workers load the trace themselves (once per worker process and trace, cached), so the
path must be visible on every worker at the same absolute path (the same machine, or a shared
file system). Relative paths are made absolute against the client's working directory. The
``--config`` file and policy TOML files are read and validated by the client and shipped with
each task (they are a few hundred bytes). With ``--report DIR`` each worker renders its run's
replay report and returns the files; the client writes them under ``DIR/runs/<run>/``, so the
report directory needs to exist only where the client runs.

A run that fails is retried once (on any worker); if it fails again it is reported (``error``
in the JSON, a line in the table) and the other runs are kept; the exit status is then 1.
Ctrl-C cancels the runs not finished yet and exits 130.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from balancer.errors import InputError
from balancer.tasks import Interrupted, execute, run_tasks, scheduler_arg
from simulator.replay import _nonneg_int, _positive_int  # the same argument types as replay

HELP = "many replays (traces x policies x parameters) as Dask tasks, compared across days"

# summary fields a run reports (besides trace/policy/params/worker/seconds)
METRICS = ("energy_kwh", "migrations", "slatah", "pdm", "slav", "esv", "moved_gb",
           "mean_active_hosts", "mean_imbalance", "unmet_share", "plan_calls", "steps")

# (label, field, format) of the comparison table / report
COMPARE = (("energy kWh", "energy_kwh", "f2"), ("migrations", "migrations", "int"),
           ("SLATAH", "slatah", "pct"), ("PDM", "pdm", "pct3"),
           ("active hosts", "mean_active_hosts", "f1"), ("imbalance", "mean_imbalance", "f3"))


# ---------------------------------------------------------------- arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, action="append", metavar="KIND:PATH",
                   help="a trace (repeat for several days); the path must be visible to the "
                        "workers at the same absolute path")
    p.add_argument("--policy", action="append", metavar="P",
                   help="replay policy name (none, balance, greedy, consolidate) or TOML file; "
                        "repeat for several (default: balance)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="policy argument values to sweep (POLICY.NAME for one policy only); "
                        "every combination is one run")
    p.add_argument("--config", metavar="FILE", help="experiment TOML, as for balancer replay")
    p.add_argument("--seed", type=_nonneg_int, default=None)
    p.add_argument("--steps", type=_positive_int("--steps"), metavar="N",
                   help="replay only the first N trace steps")
    p.add_argument("--scheduler", type=scheduler_arg, default="local",
                   help="'local' (a LocalCluster, one worker process per core) or "
                        "tcp://HOST:PORT of a running dask scheduler")
    p.add_argument("--report", metavar="DIR",
                   help="write an HTML comparison (box plots) and each run's replay report")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------- the runs


@dataclass(frozen=True)
class RunSpec:
    """One replay: everything a worker needs, small enough to ship with the task."""

    trace: str  # as given on the command line (shown)
    trace_path: str  # KIND:/absolute/path (what the worker loads)
    policy: str  # label: the policy name (or the name in the TOML file)
    policy_name: str
    policy_args: dict[str, Any]  # file args (TOML policy), before params
    params: dict[str, Any]
    config: str | None  # absolute path
    experiment: dict[str, Any] | None
    seed: int | None
    steps: int | None

    @property
    def run_id(self) -> str:
        parts = [trace_label(self.trace), self.policy]
        parts += [f"{k}={_show(v)}" for k, v in sorted(self.params.items())]
        return _slug("_".join(parts))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-") or "run"


def _show(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def trace_label(spec: str) -> str:
    """``planetlab:/x/20110303`` or ``planetlab:20110303`` -> ``20110303`` (the day, for tables
    and plots)."""
    path = spec.partition(":")[2].rstrip("/")
    name = Path(path).name or path
    for ext in (".gz", ".csv", ".parquet"):
        name = name.removesuffix(ext)
    return name


def _policy_fields(name: str) -> set[str]:
    from dataclasses import fields

    from simulator import replay_policies

    return {f.name for f in fields(replay_policies.lookup(name).Args)}


def _value(text: str) -> Any:
    """A parameter value as TOML reads it (0.8, 3, true, "x"); bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_params(items: list[str]) -> list[tuple[str | None, str, list[Any]]]:
    out: list[tuple[str | None, str, list[Any]]] = []
    seen = set()
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip()
        if not sep or not name or not values.strip():
            raise InputError(f"--param: expected NAME=V1,V2,..., got {item!r}")
        pol, _, fld = name.rpartition(".")
        vals = [_value(v.strip()) for v in values.split(",") if v.strip()]
        if (pol, fld) in seen:
            raise InputError(f"--param {name}: given twice")
        seen.add((pol, fld))
        out.append((pol or None, fld, vals))
    return out


def _abs_spec(spec: str) -> str:
    """The spec a worker loads: a bundled sample name (``planetlab:20110303``) stays a name
    (every worker has the package), a path is made absolute against the client's directory."""
    from simulator import traces

    kind, path = traces.parse_spec(spec)
    if (kind, path) in getattr(traces, "SAMPLES", {}) and not Path(path).exists():
        return spec
    return f"{kind}:{os.path.abspath(path)}"


def plan_runs(args: argparse.Namespace) -> list[RunSpec]:
    """Validate the command line on the client and expand it into runs (trace-major)."""
    from simulator.replay import load_experiment, read_toml

    config = os.path.abspath(args.config) if args.config else None
    exp = load_experiment(config) if config else None
    seed = args.seed
    specs = args.policy or (exp or {}).get("replay", {}).get("policies") or ["balance"]
    overrides = (exp or {}).get("policies", {})
    pols: list[tuple[str, str, dict[str, Any]]] = []  # label, name, base args
    for spec in specs:
        if spec.endswith(".toml") or "/" in spec:
            doc = read_toml(spec, "--policy")
            # validated exactly as balancer replay does
            from simulator.replay import policy_from_spec
            name, _ = policy_from_spec(spec, overrides)
            base = dict(overrides.get(name, {}))
            base.update(doc.get("args", {}))
            pols.append((name, name, base))
        else:
            from simulator import replay_policies
            replay_policies.lookup(spec)
            pols.append((spec, spec, dict(overrides.get(spec, {}))))
    labels = [p[0] for p in pols]
    if len(set(labels)) != len(labels):
        raise InputError(f"--policy: a policy is named twice ({', '.join(labels)})")
    params = parse_params(args.param)
    for pol, fld, _ in params:
        if pol is not None and pol not in labels:
            raise InputError(f"--param {pol}.{fld}: policy {pol!r} is not swept "
                             f"(--policy: {', '.join(labels)})")
        targets = [n for lab, n, _ in pols if pol in (None, lab)]
        if not any(fld in _policy_fields(n) for n in targets):
            known = "; ".join(f"{n}: {', '.join(sorted(_policy_fields(n))) or '-'}"
                              for n in sorted(set(targets)))
            raise InputError(f"--param {fld}: no swept policy has this field ({known})")
    traces_ = [(t, _abs_spec(t)) for t in args.trace]
    if len({p for _, p in traces_}) != len(traces_):
        raise InputError("--trace: a trace is given twice")
    runs = []
    for shown, path in traces_:
        for label, name, base in pols:
            mine = [(fld, vals) for pol, fld, vals in params
                    if pol in (None, label) and fld in _policy_fields(name)]
            names = [f for f, _ in mine]
            for combo in itertools.product(*[v for _, v in mine]):
                p = dict(zip(names, combo, strict=True))
                from simulator import replay_policies
                replay_policies.make(name, {**base, **p},
                                     where=f"--param ({label}: {_kv(p)})" if p else
                                     f"--policy {label}")
                runs.append(RunSpec(trace=shown, trace_path=path, policy=label,
                                    policy_name=name, policy_args=base, params=p,
                                    config=config, experiment=exp, seed=seed,
                                    steps=args.steps))
    return runs


# relative cost of a policy's run, for the order of the runs only: ``none`` never asks the
# engine, so its replay is the simulation alone (a few seconds a PlanetLab day against minutes)
POLICY_COST = {"none": 0.02}


def estimated_cost(spec: RunSpec) -> float:
    """A run's likely length relative to the others', used only to start the longest first:
    the trace's size on disk (its VMs x steps, for one kind of trace) times the policy's
    ``POLICY_COST`` (1 unless listed). A trace the client cannot see counts as 0."""
    from simulator import traces

    try:
        _, path = traces.resolve(spec.trace_path)
        size = (sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                if path.is_dir() else path.stat().st_size)
    except (InputError, OSError):
        size = 0
    return size * POLICY_COST.get(spec.policy_name, 1.0)


def _kv(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_show(v)}" for k, v in sorted(params.items()))


# ---------------------------------------------------------------- one replay (on a worker)


@functools.lru_cache(maxsize=8)
def _load_trace(spec: str) -> Any:
    """A worker loads each trace once (tasks of the same day reuse it)."""
    from simulator import traces

    return traces.load(spec)


def replay_one(spec: RunSpec) -> tuple[Any, dict[str, Any]]:
    """The replay ``balancer replay --trace T --config C --policy P --seed S --steps N`` does
    for one policy, through the same functions (``simulator.replay.prepare`` and
    ``replay_policy``); the policy's arguments are the config's overrides, then the TOML file's,
    then ``params``. Returns (RunResult, meta)."""
    from simulator import replay_policies
    from simulator.replay import prepare, replay_policy

    ready = prepare(_load_trace(spec.trace_path), spec.experiment, steps=spec.steps)
    pol = replay_policies.make(spec.policy_name, {**spec.policy_args, **spec.params})
    result, meta = replay_policy(ready, spec.policy, pol, seed=spec.seed, config=spec.config)
    meta["replay"]["params"] = spec.params
    return result, meta


def _report_files(result: Any, meta: dict[str, Any]) -> dict[str, bytes]:
    """Render the run's own replay report in a scratch folder; return its files."""
    import tempfile

    from simulator.report import write_report

    with tempfile.TemporaryDirectory(prefix="sweep-report-") as tmp:
        write_report(Path(tmp), [result], meta)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def run_task(spec: RunSpec, report: bool = False) -> dict[str, Any]:
    """The Dask task: one replay on whatever worker runs it."""
    t0 = time.monotonic()
    result, meta = replay_one(spec)
    out: dict[str, Any] = {k: v for k, v in result.summary.as_dict().items() if k != "policy"}
    out["replay_seconds"] = out.pop("seconds")
    out["hosts"] = meta["cluster"]["hosts"]
    out["vms"] = meta["trace"]["vms"]
    if report:
        out["report_files"] = _report_files(result, meta)
    try:
        from distributed import get_worker
        out["worker"] = get_worker().address
    except (ImportError, ValueError):
        out["worker"] = "local"
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


# ---------------------------------------------------------------- running on Dask


# ---------------------------------------------------------------- output


def _fmt(v: Any, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if kind == "pct":
        return f"{100 * v:.2f} %"
    if kind == "pct3":
        return f"{100 * v:.3f} %"
    if kind == "int":
        return f"{round(v):,}"
    if kind == "f1":
        return f"{v:,.1f}"
    if kind == "f2":
        return f"{v:,.2f}"
    return f"{v:.3f}"


def variant(run: dict[str, Any]) -> str:
    """Policy plus parameter values: the thing compared across traces."""
    p = run.get("params") or {}
    return f"{run['policy']} ({_kv(p)})" if p else run["policy"]


def spread(runs: list[dict[str, Any]]) -> list[tuple[str, dict[str, tuple[float, float, float]],
                                                     int]]:
    """Per policy variant: {metric: (min, median, max)} over the traces, and the run count."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if "error" not in r:
            groups.setdefault(variant(r), []).append(r)
    out = []
    for name, rs in groups.items():
        stats = {}
        for _, key, _ in COMPARE:
            vals = [float(r[key]) for r in rs]
            stats[key] = (min(vals), statistics.median(vals), max(vals))
        out.append((name, stats, len(rs)))
    return out


def _grid(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(widths[i]) if i < left else c.rjust(widths[i])
                         for i, c in enumerate(r)).rstrip()
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows)]) + "\n"


def spread_cell(stats: tuple[float, float, float], kind: str) -> str:
    lo, med, hi = stats
    return f"{_fmt(med, kind)} ({_fmt(lo, kind)} .. {_fmt(hi, kind)})"


def table(runs: list[dict[str, Any]]) -> str:
    head = ["trace", "policy", *[lab for lab, _, _ in COMPARE], "worker", "seconds"]
    rows = []
    for r in runs:
        if "error" in r:
            rows.append([trace_label(r["trace"]), variant(r), f"FAILED after {r['attempts']} "
                         f"attempts: {r['error']}"[:160]])
            continue
        rows.append([trace_label(r["trace"]), variant(r),
                     *[_fmt(r[k], kind) for _, k, kind in COMPARE],
                     r["worker"].rsplit("/", 1)[-1], f"{r['seconds']:.1f}"])
    ok = [r for r in rows if len(r) == len(head)]
    failed = [r for r in rows if len(r) != len(head)]
    out = _grid(head, ok, left=2)
    for r in failed:
        out += f"{r[0]}  {r[1]}  {r[2]}\n"
    sp = spread(runs)
    if sp:
        out += "\nspread over traces per policy: median (min .. max)\n"
        head2 = ["metric", *[f"{name} [{n}]" for name, _, n in sp]]
        rows2 = [[lab, *[spread_cell(stats[k], kind) for _, stats, _ in sp]]
                 for lab, k, kind in COMPARE]
        out += _grid(head2, rows2)
    return out


# ---------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> int:
    specs = plan_runs(args)
    t0 = time.monotonic()
    try:
        results = run_tasks(args.scheduler, specs, run_task,
                            fn_kwargs={"report": bool(args.report)},
                            progress=False if args.no_progress else None,
                            cost=estimated_cost)
    except Interrupted as exc:
        print(f"balancer: interrupted: {exc}", file=sys.stderr)
        return 130
    wall = time.monotonic() - t0
    runs = []
    for spec, res in zip(specs, results, strict=True):
        r: dict[str, Any] = {"trace": spec.trace, "policy": spec.policy, "params": spec.params}
        r.update(res)
        runs.append(r)
    if args.report:
        from simulator.sweep_report import write_sweep_report
        write_sweep_report(Path(args.report), runs, specs, meta={
            "config": args.config, "seed": args.seed, "steps": args.steps,
            "scheduler": args.scheduler, "wall_seconds": round(wall, 1)})
    for r in runs:
        r.pop("report_files", None)
    failed = [r for r in runs if "error" in r]
    if args.format == "json":
        json.dump({"runs": runs, "wall_seconds": round(wall, 2)}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        workers = sorted({r["worker"] for r in runs if "worker" in r})
        sys.stdout.write(f"{len(runs)} runs on {len(workers)} workers in {wall:.1f} s "
                         f"({args.scheduler})\n")
        sys.stdout.write(table(runs))
        if args.report:
            sys.stdout.write(f"report: {Path(args.report) / 'index.html'}\n")
    for r in failed:
        print(f"balancer: run {trace_label(r['trace'])} / {variant(r)} failed after "
              f"{r['attempts']} attempts: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["HELP", "RunSpec", "add_arguments", "execute", "plan_runs", "replay_one", "run",
           "run_task", "table"]  # execute: balancer.tasks
