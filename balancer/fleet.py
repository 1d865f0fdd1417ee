"""``balancer plan --fleet DIR``: plan every cluster snapshot in a folder as Dask tasks.

Each ``DIR/*.json`` (snapshot v1, one per cluster) is one task that does what
``balancer plan FILE`` does with the same options (the engine, then the migration waves), on
whichever Dask worker takes it, and returns a one-line summary; the command prints one table
(or, with ``--format json``, ``{"clusters": [...], "totals": {...}}``).

The workers read the snapshot files themselves, so ``DIR`` must be visible to every worker at
the same absolute path (the embedded ``--scheduler local`` cluster always sees it). A cluster
whose snapshot is bad or whose constraints cannot all hold is reported as such (status
``error`` / ``infeasible``) and the others are planned; any other failure is retried once.
Exit status: 0 when every cluster planned, 3 when some were infeasible, 1 when some failed, 2
for bad input (the folder), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from balancer.errors import InfeasibleError, InputError

OPTION_FIELDS = ("threshold", "max_migrations", "max_moved_mem_gb", "mem_overcommit",
                 "cpu_headroom", "time_limit", "seed", "solver")


def snapshots(folder: str) -> list[Path]:
    d = Path(folder)
    if not d.is_dir():
        raise InputError(f"--fleet {folder}: not a folder of snapshot files")
    files = sorted(p.resolve() for p in d.glob("*.json") if p.is_file())
    if not files:
        raise InputError(f"--fleet {folder}: no snapshot files (*.json) in it")
    return files


def plan_one(path: str, options: dict[str, Any]) -> dict[str, Any]:
    """The Dask task: ``balancer plan PATH`` for one cluster; a summary of the plan."""
    from balancer import snapshot
    from balancer.planner import PlannerLimits, add_waves
    from balancer.service import PlanOptions, plan

    t0 = time.monotonic()
    out: dict[str, Any] = {"cluster": Path(path).stem, "snapshot": path}
    try:
        snap = snapshot.load(path, mem_overcommit=options["mem_overcommit"])
        out.update(hosts=len(snap.hosts), vms=len(snap.vms))
        result = plan(snap, PlanOptions(**options))
        doc = add_waves(result.to_dict(), snap,
                        PlannerLimits(mem_overcommit=options["mem_overcommit"]))
    except InfeasibleError as exc:
        out.update(status="infeasible", reason=str(exc))
    except InputError as exc:
        out.update(status="error", reason=str(exc))
    else:
        eff = doc["efficacy"]
        out.update(status="ok", migrations=eff["migrations"],
                   moved_gb=round(eff["moved_mem_mb"] / 1024, 3),
                   imbalance_before=eff["before"]["imbalance"],
                   imbalance_after=eff["after"]["imbalance"],
                   cpu_max_after=eff["after"]["cpu_max"], waves=len(doc["waves"]),
                   makespan_s=round(float(doc["makespan_s"]), 1),
                   stopped_by=doc["solver"].get("stopped_by"))
    try:
        from distributed import get_worker
        out["worker"] = get_worker().address
    except (ImportError, ValueError):
        out["worker"] = "local"
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


def _table(rows: list[dict[str, Any]], totals: dict[str, Any]) -> str:
    head = ["cluster", "status", "hosts", "VMs", "migrations", "GB moved", "imbalance",
            "waves", "makespan s", "worker", "seconds"]
    body = []
    for r in rows:
        if r.get("status") == "ok":
            body.append([r["cluster"], "ok", f"{r['hosts']:,}", f"{r['vms']:,}",
                         f"{r['migrations']:,}", f"{r['moved_gb']:,.1f}",
                         f"{r['imbalance_before']:.3f} -> {r['imbalance_after']:.3f}",
                         str(r["waves"]), f"{r['makespan_s']:,.0f}",
                         str(r.get("worker", "")).rsplit("/", 1)[-1], f"{r['seconds']:.1f}"])
        else:
            body.append([r["cluster"], r.get("status", "failed"),
                         f"{r['hosts']:,}" if "hosts" in r else "-",
                         f"{r['vms']:,}" if "vms" in r else "-", "", "", "", "", "",
                         str(r.get("worker", "")).rsplit("/", 1)[-1],
                         f"{r['seconds']:.1f}" if "seconds" in r else "-"])
    body.append(["total", f"{totals['ok']}/{totals['clusters']} ok", f"{totals['hosts']:,}",
                 f"{totals['vms']:,}", f"{totals['migrations']:,}",
                 f"{totals['moved_gb']:,.1f}", "", "", "", "", f"{totals['seconds']:.1f}"])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i])
                         for i, c in enumerate(r)).rstrip()
    out = [line(head), "  ".join("-" * w for w in widths), *map(line, body[:-1]),
           "  ".join("-" * w for w in widths), line(body[-1])]
    for r in rows:
        if r.get("status") != "ok":
            out.append(f"{r['cluster']}: {r.get('status', 'failed')}: {r.get('reason', '')}")
    return "\n".join(out) + "\n"


def run_fleet(args: argparse.Namespace) -> int:
    """``balancer plan --fleet DIR``: the same options as ``balancer plan``, every snapshot."""
    from balancer.tasks import Interrupted, run_tasks

    if args.snapshot or getattr(args, "demo", False):
        raise InputError("plan: give a snapshot (or --demo) or --fleet DIR, not both")
    files = snapshots(args.fleet)
    options = {k: getattr(args, k) for k in OPTION_FIELDS}
    t0 = time.monotonic()
    try:
        results = run_tasks(args.scheduler, [str(f) for f in files], plan_one,
                            fn_kwargs={"options": options}, label="clusters")
    except Interrupted as exc:
        print(f"balancer: interrupted: {exc}", file=sys.stderr)
        return 130
    wall = time.monotonic() - t0
    rows = []
    for f, r in zip(files, results, strict=True):
        if "error" in r:  # the task itself failed twice
            r = {"cluster": f.stem, "snapshot": str(f), "status": "failed",
                 "reason": r["error"], "attempts": r["attempts"]}
        rows.append(r)
    ok = [r for r in rows if r["status"] == "ok"]
    totals = {"clusters": len(rows), "ok": len(ok),
              "infeasible": sum(r["status"] == "infeasible" for r in rows),
              "failed": sum(r["status"] in ("error", "failed") for r in rows),
              "hosts": sum(r.get("hosts", 0) for r in rows),
              "vms": sum(r.get("vms", 0) for r in rows),
              "migrations": sum(r["migrations"] for r in ok),
              "moved_gb": round(sum(r["moved_gb"] for r in ok), 3),
              "workers": len({r["worker"] for r in rows if "worker" in r}),
              "seconds": round(wall, 2)}
    if args.format == "json":
        json.dump({"clusters": rows, "totals": totals}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(f"{len(rows)} clusters from {args.fleet} on {totals['workers']} "
                         f"workers ({args.scheduler})\n")
        sys.stdout.write(_table(rows, totals))
    if totals["failed"]:
        return 1
    return 3 if totals["infeasible"] else 0


__all__ = ["plan_one", "run_fleet", "snapshots"]
