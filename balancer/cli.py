"""The ``balancer`` command line: a thin shell over ``balancer.service``.

Exit codes: 0 success; 2 bad input (one readable line on stderr); 3 infeasible (the conflicting
rules, hosts or budgets named); 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from importlib import resources
from typing import Any, NoReturn

from balancer.errors import BalancerError, InfeasibleError, InputError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _float(name: str, *, strict: bool):  # noqa: ANN202
    """An argparse type: a finite number > 0 (``strict``) or >= 0, errors naming the flag."""
    bound = "> 0" if strict else ">= 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (strict and value == 0):
            raise argparse.ArgumentTypeError(f"{name} must be a number {bound}, got {text!r}")
        return value
    return parse


def _positive_float(name: str):  # noqa: ANN202
    return _float(name, strict=True)


def _nonneg_float(name: str):  # noqa: ANN202
    return _float(name, strict=False)


def _nonneg_int(name: str):  # noqa: ANN202
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be a whole number, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {text!r}")
        return value
    return parse


def _default_threshold() -> int:
    from policies.balance import Threshold

    return Threshold.DEFAULT


def _threshold(text: str) -> int:
    from policies.balance import Threshold

    try:
        return Threshold.parse(text, "--threshold")
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _plugin_commands() -> dict[str, Any]:
    """Commands other packages add through the ``balancer.commands`` entry-point group.

    Each entry point names a module with ``HELP: str``, ``add_arguments(parser)`` and
    ``run(args) -> int``. This keeps ``balancer`` free of imports from ``simulator``.
    """
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="balancer.commands")}


def version() -> str:
    """The installed distribution's version: one place, ``[project] version`` in pyproject."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("balancer")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; plugin modules are imported only for the ``command`` being run."""
    parser = _Parser(prog="balancer", description="An open, optimal DRS for KVM/QEMU clusters.")
    parser.add_argument("--version", action="version", version=f"balancer {version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    plugins = _plugin_commands()
    for name, ep in sorted(plugins.items()):
        if command in plugins and name != command:
            # Another command runs: its module (and its imports) are not needed.
            sub.add_parser(name, help=name, add_help=False)
            continue
        module = ep.load()
        sp = sub.add_parser(name, help=module.HELP)
        module.add_arguments(sp)
        sp.set_defaults(run=module.run)
    p = sub.add_parser("plan", help="plan the migrations that rebalance a cluster snapshot",
                       description="Plan the migrations that rebalance a cluster snapshot; "
                       "every plan passes the solver-free verifier.")
    p.set_defaults(run=cmd_plan)
    p.add_argument("snapshot", nargs="?", help="snapshot v1 JSON file, or - for stdin")
    p.add_argument("--demo", action="store_true", help="plan the bundled demo cluster")
    p.add_argument("--max-migrations", type=_nonneg_int("--max-migrations"), metavar="K",
                   help="at most K migrations in the plan, forced moves included "
                   "(default: no limit)")
    p.add_argument("--max-moved-mem-gb", type=_nonneg_float("--max-moved-mem-gb"), metavar="G",
                   help="at most G GiB of configured VM memory moved (default: no limit)")
    p.add_argument("--threshold", type=_threshold, default=_default_threshold(),
                   help="migration threshold 1 (mandatory moves only) .. 5 (most aggressive); "
                   "sets the price a move's balance gain must pay (default: 3)")
    p.add_argument("--time-limit", type=_positive_float("--time-limit"), metavar="S",
                   help="wall-clock safety stop for the solver, seconds (default: 6 s per "
                   "1,000 VMs, 10 to 120); the search effort itself is counted in deterministic "
                   "units, so a plan is the same on a busy machine unless this stop fires")
    p.add_argument("--seed", type=_nonneg_int("--seed"), default=0,
                   help="random seed of the search; the same snapshot, options and seed give "
                   "the same plan (default: 0)")
    p.add_argument("--mem-overcommit", type=_positive_float("--mem-overcommit"), default=1.0,
                   help="configured VM memory a receiving host may hold, as a multiple of its "
                   "RAM (default: 1.0)")
    p.add_argument("--cpu-headroom", type=_nonneg_float("--cpu-headroom"), default=0.1,
                   help="share of a receiving host's CPU kept free of demand (default: 0.1)")
    p.add_argument("--solver", choices=["cpsat", "greedy"], default="cpsat",
                   help="cpsat: the optimising engine (default); greedy: the DRS-like "
                   "baseline, one best move at a time")
    p.add_argument("--format", choices=["json", "table"], default="json",
                   help="json for tools (default), table for people")
    p.add_argument("--effort", type=_positive_float("--effort"), default=1.0, metavar="X",
                   help="search effort, a multiple of the default (deterministic units: "
                   "model size built; default: 1)")
    p.add_argument("--frontier", action="store_true",
                   help="the whole balance / migration-cost curve instead of one plan: one "
                   "verified plan per price per MiB moved, sorted by memory moved (budgets and "
                   "threshold do not apply)")
    p.add_argument("--points", type=_nonneg_int("--points"), default=8, metavar="N",
                   help="with --frontier: number of points (prices) on the curve (default: 8)")
    p.add_argument("--fill", type=_nonneg_int("--fill"), default=2, metavar="N",
                   help="with --frontier: points solved by memory budget between each two "
                   "neighbouring price points, so any memory level has a plan nearby "
                   "(default: 2; 0: price points only)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="with --frontier: also draw the curve into this PNG file")
    # balancer plan --fleet (balancer/fleet.py): every snapshot of a folder as Dask tasks
    from balancer.tasks import scheduler_arg
    p.add_argument("--fleet", metavar="DIR", help="plan every snapshot (*.json, one per "
                   "cluster) in DIR as Dask tasks, with one summary table (balancer[dask])")
    p.add_argument("--scheduler", type=scheduler_arg, default="local",
                   help="with --fleet: 'local' (one worker process per core) or "
                   "tcp://HOST:PORT of a running dask scheduler")
    _add_power_arguments(p)
    return parser


def _add_power_arguments(p: argparse.ArgumentParser) -> None:
    """``plan --power``: standby/wake recommendations (balancer.power_plan, docs/replay.md)."""
    g = p.add_argument_group("power management (--power)")
    g.add_argument("--power", action="store_true",
                   help="plan power instead of balance: hosts to put in standby or wake, with "
                   "the moves that empty them, the reason and the watts (CP-SAT power mode)")
    g.add_argument("--power-target", type=_positive_float("--power-target"), default=0.8,
                   metavar="U", help="CPU share a host on may carry (default: 0.8)")
    g.add_argument("--power-max-switch", type=_nonneg_int("--power-max-switch"), default=4,
                   metavar="N", help="hosts switched on or off at most (default: 4)")
    g.add_argument("--power-idle-w", type=_nonneg_float("--power-idle-w"), default=180.0,
                   metavar="W", help="idle watts of hosts without a power.idle_w label")
    g.add_argument("--power-peak-w", type=_nonneg_float("--power-peak-w"), default=450.0,
                   metavar="W", help="peak watts of hosts without a power.peak_w label")
    g.add_argument("--power-command", metavar="TEMPLATE",
                   help="command for each recommendation, with {action} (standby or wake) and "
                   "{host}, e.g. 'ipmitool -H {host}-bmc chassis power soft'")
    g.add_argument("--power-history", metavar="CSV",
                   help="per-VM CPU history (timestamp, vm, cpu in cores): plan on each VM's "
                   "forecast for the next cycle (ewm level) instead of its demand now")
    g.add_argument("--power-z", type=_nonneg_float("--power-z"), default=0.0, metavar="Z",
                   help="with --power-history: margin per host, Z x sqrt(sum of its VMs' "
                   "forecast variances) (default: 0)")
    g.add_argument("--power-run", action="store_true",
                   help="run --power-command for each recommendation (wake first)")


def _load_snapshot(args: argparse.Namespace) -> Any:
    from balancer import snapshot

    if args.demo:
        if args.snapshot:
            raise InputError("plan: give a snapshot file or --demo, not both")
        text = resources.files("balancer").joinpath("data/demo-cluster.json").read_text()
        return snapshot.loads(text, source="demo-cluster.json",
                              mem_overcommit=args.mem_overcommit)
    if not args.snapshot:
        raise InputError("plan: a snapshot file (or - for stdin, or --demo) is required")
    if args.snapshot == "-":
        return snapshot.loads(sys.stdin.read(), source="stdin", mem_overcommit=args.mem_overcommit)
    return snapshot.load(args.snapshot, mem_overcommit=args.mem_overcommit)


def _frontier(snap: Any, options: Any, args: argparse.Namespace) -> int:
    from balancer.report import frontier_plot, frontier_table
    from balancer.service import frontier

    result = frontier(snap, options, points=args.points, fill=args.fill)
    if args.plot:
        frontier_plot(result, args.plot)
    if args.format == "json":
        json.dump(result.to_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(frontier_table(result))
        if args.plot:
            sys.stdout.write(f"plot: {args.plot}\n")
    return 0


def cmd_plan_power(args: argparse.Namespace) -> int:
    from balancer.power_plan import PowerPlanOptions, plan_power, read_history, run_commands

    if args.power_run and not args.power_command:
        raise InputError("--power-run needs --power-command")
    if not 0 < args.power_target <= 1:
        raise InputError(f"--power-target must be in (0, 1], got {args.power_target}")
    if args.power_peak_w < args.power_idle_w:
        raise InputError("--power-peak-w must be >= --power-idle-w")
    history = read_history(args.power_history) if args.power_history else None
    snap = _load_snapshot(args)
    doc = plan_power(snap, PowerPlanOptions(z=args.power_z,
        target_util=args.power_target, max_switch=args.power_max_switch,
        idle_w=args.power_idle_w, peak_w=args.power_peak_w, mem_overcommit=args.mem_overcommit,
        seed=args.seed, command=args.power_command,
        time_limit=args.time_limit or 30.0), history=history)
    if args.power_run:
        doc["power"]["ran"] = run_commands(doc)
    if args.format == "json":
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    pw = doc["power"]
    sys.stdout.write(f"power: {pw['watts_before']:.0f} W -> {pw['watts_after']:.0f} W "
                     f"(saves {pw['watts_saved']:.0f} W), {len(doc['migrations'])} moves\n")
    if "forecast" in pw:
        f = pw["forecast"]
        sys.stdout.write(f"forecast: {f['vms_forecast']} VMs from {f['samples']} samples "
                         f"({f['vms_without_history']} without history): "
                         f"{f['cpu_now_cores']:.1f} cores now, {f['cpu_forecast_cores']:.1f} "
                         "forecast\n")
    for r in pw["recommendations"]:
        cmd = f"  [{' '.join(r['command'])}]" if r.get("command") else ""
        sys.stdout.write(f"{r['action']:<8} {r['host']}: {r['reason']}{cmd}\n")
    for m in doc["migrations"]:
        sys.stdout.write(f"move     {m['vm']} {m['from']} -> {m['to']}: {m['reason']}\n")
    for r in pw.get("ran", []):
        sys.stdout.write(f"ran      {r['action']} {r['host']}: exit {r['exit']}\n")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    if getattr(args, "power", False):
        if args.fleet:
            raise InputError("plan: give --power or --fleet, not both")
        return cmd_plan_power(args)
    if args.fleet:
        from balancer.fleet import run_fleet
        return run_fleet(args)
    from balancer.report import plan_table
    from balancer.service import PlanOptions
    from balancer.solving import plan_interruptible

    if not args.frontier and (args.plot or args.points != 8 or args.fill != 2):
        raise InputError("plan: --points, --fill and --plot go with --frontier")
    if args.frontier and args.points < 1:
        raise InputError("plan: --points must be >= 1")
    snap = _load_snapshot(args)
    options = PlanOptions(
        threshold=args.threshold,
        max_migrations=args.max_migrations,
        max_moved_mem_gb=args.max_moved_mem_gb,
        mem_overcommit=args.mem_overcommit,
        cpu_headroom=args.cpu_headroom,
        time_limit=args.time_limit,
        seed=args.seed,
        solver=args.solver,
        effort=args.effort,
    )
    if args.frontier:
        return _frontier(snap, options, args)
    # The solve runs in a worker process: the first Ctrl-C gives the best plan found so far.
    result = plan_interruptible(snap, options)
    from balancer.planner import PlannerLimits, add_waves

    # The plan is in hand: it is printed whole (a further Ctrl-C would only truncate it).
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        doc = add_waves(result.to_dict(), snap,
                        PlannerLimits(mem_overcommit=args.mem_overcommit))
        if args.format == "json":
            json.dump(doc, sys.stdout, indent=1)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(plan_table(result))
            sys.stdout.write(f"waves: {len(doc['waves'])}   estimated makespan: "
                             f"{doc['makespan_s']:.0f} s (pre-copy model, see docs/executor.md)\n")
        sys.stdout.flush()
    finally:
        signal.signal(signal.SIGINT, old)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = build_parser(command).parse_args(argv)
        return int(args.run(args))
    except InputError as exc:
        print(f"balancer: error: {exc}", file=sys.stderr)
        return 2
    except InfeasibleError as exc:
        print(f"balancer: infeasible: {exc}", file=sys.stderr)
        return 3
    except BalancerError as exc:
        print(f"balancer: failed: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("balancer: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, the traceback only on request
        if os.environ.get("BALANCER_DEBUG"):
            raise
        print(f"balancer: internal error: {type(exc).__name__}: {exc} "
              "(set BALANCER_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
