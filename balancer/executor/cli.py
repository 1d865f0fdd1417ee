"""``balancer execute PLAN.json --backend simulated|qemu|libvirt [--config FILE] [--dry-run]``.

Reads the JSON of ``balancer plan`` (a file, or ``-`` for stdin), takes its waves (or plans them
with the config's limits when the plan has none), and runs them through the chosen backend,
showing per-migration progress on stderr and a summary on stdout.

The start placement and the hosts' memory capacities come from the snapshot embedded in the
plan (key ``snapshot``) or from ``--snapshot FILE``. ``--dry-run`` runs the plan through the
simulated backend built from that snapshot, with an in-memory journal: nothing is moved.

The journal (``--journal PATH``, the config's ``[journal] path``, else
``$XDG_STATE_HOME/balancer/journal.sqlite``) is held exclusively while the plan runs: a second
``balancer execute`` on it exits 2 naming the holder, or waits with ``--wait``.

Exit codes: 0 every migration succeeded or was skipped as stale; 4 some failed or were
cancelled; 2 bad input (one line naming the field); 3 unplannable; 1 other failure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from balancer.errors import BalancerError, InputError, read_text
from balancer.executor.base import Backend, Progress
from balancer.executor.config import ExecutorConfig, load_config
from balancer.executor.journal import Entry, Journal
from balancer.executor.runner import Runner, RunSummary
from balancer.model import ClusterSnapshot

HELP = "execute a plan's migrations through a backend (simulated, qemu, libvirt)"
BACKENDS = ("simulated", "qemu", "libvirt")
# where the real backends live; each exposes create_backend(config, snapshot) -> Backend
BACKEND_MODULES = {"qemu": "balancer.executor.qemu",
                   "libvirt": "balancer.executor.libvirt_backend"}
EXIT_INCOMPLETE = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", help="plan JSON from `balancer plan`, or - for stdin")
    parser.add_argument("--backend", choices=BACKENDS, default="simulated")
    parser.add_argument("--config", metavar="FILE",
                        help="executor config, TOML or JSON (default: built-in defaults; "
                             "see configs/executor-simulated.toml)")
    parser.add_argument("--snapshot", metavar="FILE",
                        help="snapshot v1 the plan starts from (default: the plan's own)")
    parser.add_argument("--journal", metavar="PATH",
                        help="journal file (overrides the config; default: "
                             "$XDG_STATE_HOME/balancer/journal.sqlite, i.e. "
                             "~/.local/state/balancer/journal.sqlite)")
    parser.add_argument("--wait", action="store_true",
                        help="if another executor holds the journal, wait for it instead of "
                             "exiting 2")
    parser.add_argument("--dry-run", action="store_true",
                        help="simulate the plan from the snapshot; move nothing")
    parser.add_argument("--format", choices=["table", "json"], default="table",
                        help="summary on stdout: a table (default) or JSON with every move")
    parser.add_argument("--quiet", action="store_true", help="no live progress on stderr")


def state_dir() -> Path:
    """Where the executor keeps its journal by default: ``$XDG_STATE_HOME/balancer`` (the XDG
    default ``~/.local/state/balancer``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "balancer"


def journal_path(args: argparse.Namespace, cfg: ExecutorConfig) -> str:
    if args.dry_run:
        return ":memory:"
    if args.journal:
        return str(args.journal)
    if "path" in cfg.journal.model_fields_set:  # the config names one
        return cfg.journal.path
    path = state_dir() / "journal.sqlite"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--journal: cannot create the state folder {path.parent}: "
                         f"{exc.strerror}; give --journal PATH") from None
    return str(path)


def human_mib(mib: float) -> str:
    """``851968`` -> ``832 GiB``; MiB below 1 GiB, TiB from 1 TiB up."""
    if mib >= 1024 * 1024:
        return f"{mib / 1024 / 1024:.1f} TiB"
    if mib >= 1024:
        gib = mib / 1024
        return f"{gib:.0f} GiB" if gib >= 100 else f"{gib:.1f} GiB"
    return f"{mib:.0f} MiB"


def read_plan(path: str) -> dict[str, Any]:
    if path == "-":
        text, source = sys.stdin.read(), "stdin"
    else:
        text, source = read_text(path), path
    if not text.strip():
        raise InputError(f"{source}: empty input: expected the JSON plan of `balancer plan`")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: not valid JSON: {exc.msg} at line {exc.lineno} column "
                         f"{exc.colno}") from None
    if not isinstance(doc, dict):
        raise InputError(f"{source}: a plan must be a JSON object, got {type(doc).__name__}")
    return doc


def plan_snapshot(doc: dict[str, Any], snapshot_path: str | None) -> ClusterSnapshot:
    from balancer import snapshot

    if snapshot_path:
        return snapshot.load(snapshot_path)
    if "snapshot" not in doc:
        raise InputError("plan: field 'snapshot' is missing: the plan does not embed the "
                         "snapshot it starts from; give --snapshot FILE")
    try:
        return snapshot.parse_snapshot(doc["snapshot"])
    except InputError as exc:
        raise InputError(f"plan: field 'snapshot': {exc}") from None


def planner_limits(cfg: ExecutorConfig) -> Any:
    from balancer.planner import PlannerLimits

    return PlannerLimits(
        max_incoming_per_host=cfg.limits.max_incoming_per_host,
        max_outgoing_per_host=cfg.limits.max_outgoing_per_host,
        max_concurrent=cfg.limits.max_concurrent,
        mem_overcommit=cfg.limits.mem_overcommit,
        bandwidth_mbps=cfg.migration.bandwidth_mbps,
        dirty_rate_mbps=cfg.migration.dirty_rate_mbps,
        downtime_ms=cfg.migration.downtime_ms,
    )


def plan_waves(doc: dict[str, Any], snap: ClusterSnapshot, cfg: ExecutorConfig) -> Any:
    from balancer.planner import make_waves, moves_from_plan, waves_from_plan

    if "waves" in doc:
        return waves_from_plan(doc, snap)
    return make_waves(snap, moves_from_plan(doc), planner_limits(cfg))


def make_backend(name: str, cfg: ExecutorConfig, snap: ClusterSnapshot, *,
                 dry_run: bool) -> Backend:
    """The backend by name. Real backends live in the modules of ``BACKEND_MODULES`` and expose
    ``create_backend(config: ExecutorConfig, snapshot: ClusterSnapshot) -> Backend``."""
    from balancer.executor.simulated import SimulatedBackend

    if dry_run:
        return SimulatedBackend.from_snapshot(snap, cfg, persist=False)
    if name == "simulated":
        return SimulatedBackend.from_snapshot(snap, cfg)
    try:
        module = importlib.import_module(BACKEND_MODULES[name])
        factory = module.create_backend
    except (ImportError, AttributeError) as exc:
        raise BalancerError(f"backend {name} is not available: {exc}") from None
    return factory(cfg, snap)  # type: ignore[no-any-return]


class _Progress:
    """Live progress on stderr: one line per event, and a tqdm bar over the plan when stderr
    is a terminal (a log file or a pipe gets the event lines alone, never interleaved)."""

    def __init__(self, total: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.quiet = quiet
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="mig", file=sys.stderr, disable=quiet or not tty,
                        dynamic_ncols=True, mininterval=0.2)
        self.live: dict[tuple[str, int], str] = {}
        self.last = 0.0

    def __call__(self, kind: str, e: Entry, p: Progress | None) -> None:
        if self.quiet:
            return
        key = (e.plan_id, e.id)
        tag = f"#{e.id} {e.vm} {e.source}->{e.target}"
        if kind in ("start", "resume"):
            self.live[key] = "0%"
            self._line(f"{kind:>8} {tag} (wave {e.wave}, attempt {e.attempts})")
        elif kind == "progress" and p is not None:
            self.live[key] = f"{p.percent:.0f}% {p.rate_mbps:.0f}Mb/s"
            self._postfix()
        elif kind == "retry":
            self.live.pop(key, None)
            self._line(f"   retry {tag}: {e.reason}")
        else:
            self.live.pop(key, None)
            detail = f": {e.reason}" if e.reason else ""
            self._line(f"{e.state.value:>8} {tag}{detail}")
            self._postfix(force=True)
            self.bar.update(1)

    def _line(self, text: str) -> None:
        if self.bar.disable:
            print(text, file=sys.stderr, flush=True)
        else:
            self.bar.write(text, file=sys.stderr)

    def _postfix(self, force: bool = False) -> None:
        """In-flight migrations (id: percent transferred, rate), at most 5 times a second."""
        now = time.monotonic()
        if self.bar.disable:
            return
        if force or now - self.last > 0.2:
            self.last = now
            shown = list(self.live.items())[:4]
            more = f" +{len(self.live) - 4}" if len(self.live) > 4 else ""
            self.bar.set_postfix_str("; ".join(f"#{k[1]} {v}" for k, v in shown) + more,
                                     refresh=False)

    def close(self) -> None:
        self.bar.close()


def summary_table(s: RunSummary, already_done: bool = False) -> str:
    c = s.counts
    lines = [
        f"plan {s.plan_id}{' (dry run: nothing moved)' if s.dry_run else ''}",
    ]
    if already_done:
        lines.append(f"nothing to do: {len(s.entries)} of {len(s.entries)} already done "
                     f"(journal {s.journal_path})")
    lines += [
        f"migrations {len(s.entries)}: succeeded {c['succeeded']}, failed {c['failed']}, "
        f"skipped {c['skipped']}, cancelled {c['cancelled']}"
        + (f", unfinished {c['planned'] + c['running']}" if c['planned'] + c['running'] else ""),
        f"{'would move' if s.dry_run else 'moved'} {human_mib(s.moved_mb)}; backend clock "
        f"{s.clock_s:.1f} s; wall {s.wall_s:.2f} s; journal commits {s.journal_commits}",
    ]
    rest = [e for e in s.entries if e.state.value != "succeeded"]
    if rest:
        lines.append(f"{'id':>5} {'wave':>4} {'vm':<14} {'from':<10} {'to':<10} "
                     f"{'state':<10} reason")
        for e in rest:
            lines.append(f"{e.id:>5} {e.wave:>4} {e.vm:<14} {e.source:<10} {e.target:<10} "
                         f"{e.state.value:<10} {e.reason}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    doc = read_plan(args.plan)
    cfg = load_config(args.config)
    snap = plan_snapshot(doc, args.snapshot)
    waves = plan_waves(doc, snap, cfg)
    path = journal_path(args, cfg)

    def waiting(msg: str) -> None:
        print(f"balancer: {msg}", file=sys.stderr, flush=True)

    # The journal first: a second executor is refused (or waits) before touching a backend.
    journal = Journal(path, synchronous=cfg.journal.synchronous, wait=args.wait,
                      on_wait=waiting)
    try:
        backend = make_backend(args.backend, cfg, snap, dry_run=args.dry_run)
    except BaseException:
        journal.close()
        raise
    from balancer.planner import plan_fingerprint

    known = journal.entries(plan_fingerprint(waves))
    already_done = bool(known) and all(e.state.terminal for e in known)
    progress = _Progress(len(waves.migrations), args.quiet)
    runner = Runner(backend, journal, cfg,
                    {h.name: float(h.mem_capacity) for h in snap.hosts}, on_event=progress)

    def on_signal(signum: int, frame: Any) -> None:
        runner.cancel()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = runner.run(waves, json.dumps(doc.get("waves", doc.get("migrations"))),
                             dry_run=args.dry_run)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        progress.close()
        journal.close()
        backend.close()
    summary.journal_path = path
    if args.format == "json":
        out = summary.to_dict()
        why = {m.id: m.reason for m in waves.migrations}
        out["journal"] = path
        out["already_done"] = already_done
        for m in out["migrations"]:
            m["plan_reason"] = why.get(m["id"], "")  # why the plan makes the move
        json.dump(out, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(summary_table(summary, already_done))
    return 0 if summary.ok else EXIT_INCOMPLETE
