"""The replay report: an HTML page with plots, per-step metrics as CSV, the summary as JSON.

Writes into DIR:

* ``index.html`` the comparison table and the plots below, with the trace and cluster setup;
* ``compare.png`` per-policy comparison (energy, SLATAH, migrations, mean active hosts);
* ``imbalance.png`` imbalance over time, one line per policy;
* ``activity.png`` migrations per step and active hosts over time;
* ``heatmap-<policy>.png`` host CPU utilisation over time (hosts that were ever active);
* ``steps-<policy>.csv`` the per-step metrics (``simulator.metrics.STEP_COLUMNS``);
* ``summary.json`` the totals, as ``balancer replay --format json`` prints them.
"""

from __future__ import annotations

import csv
import html
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from simulator.metrics import STEP_COLUMNS, Summary, _fmt


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "policy"


def write_csv(path: Path, log: Any) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(STEP_COLUMNS)
        cols = [log.columns[c] for c in STEP_COLUMNS]
        for row in zip(*cols, strict=True):
            w.writerow([int(x) if float(x).is_integer() else round(x, 6) for x in row])


def _plots(out: Path, results: list[Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: list[tuple[str, str]] = []
    names = [r.summary.policy for r in results]
    hours = [r.log.array("time_s") / 3600.0 for r in results]

    # per-policy comparison
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    for ax, (label, attr, scale) in zip(axes, (
            ("energy (kWh)", "energy_kwh", 1.0), ("overloaded host-time (%)", "slatah", 100.0),
            ("migrations", "migrations", 1.0), ("mean active hosts", "mean_active_hosts", 1.0)),
            strict=True):
        vals = [getattr(r.summary, attr) * scale for r in results]
        ax.bar(names, vals, color=[f"C{i}" for i in range(len(names))])
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=90)
    plt.close(fig)
    figs.append(("compare.png", "Per-policy comparison"))

    fig, ax = plt.subplots(figsize=(10, 3.4))
    for i, r in enumerate(results):
        ax.plot(hours[i], r.log.array("imbalance"), label=names[i], lw=1)
    ax.set_xlabel("hours")
    ax.set_ylabel("imbalance (cpu std + mem std)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "imbalance.png", dpi=90)
    plt.close(fig)
    figs.append(("imbalance.png", "Imbalance over time"))

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    for i, r in enumerate(results):
        a1.plot(hours[i], r.log.array("migrations"), label=names[i], lw=1)
        a2.plot(hours[i], r.log.array("active_hosts"), label=names[i], lw=1)
    a1.set_ylabel("migrations per step")
    a2.set_ylabel("active hosts")
    a2.set_xlabel("hours")
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "activity.png", dpi=90)
    plt.close(fig)
    figs.append(("activity.png", "Migrations and active hosts over time"))

    for i, r in enumerate(results):
        m = r.log.util_matrix()
        if m.size == 0:
            continue
        used = ~np.all(np.isnan(m), axis=0)
        m = m[:, used]
        fig, ax = plt.subplots(figsize=(10, 3.8))
        if m.size:
            cmap = matplotlib.colormaps["magma"].copy()
            cmap.set_bad("#dddddd")
            im = ax.imshow(m.T, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0,
                           vmax=1.2, extent=(0, float(hours[i][-1]) if len(hours[i]) else 1,
                                             m.shape[1], 0))
            fig.colorbar(im, ax=ax, label="CPU load / capacity")
        ax.set_xlabel("hours")
        ax.set_ylabel(f"hosts ever active ({int(used.sum())})")
        ax.set_title(f"{names[i]}: host CPU utilisation (grey = off or empty)", fontsize=10)
        fig.tight_layout()
        fname = f"heatmap-{_slug(names[i])}.png"
        fig.savefig(out / fname, dpi=90)
        plt.close(fig)
        figs.append((fname, f"Host utilisation heatmap: {names[i]}"))
    return figs


def write_report(out: Path, results: list[Any], meta: dict[str, Any]) -> Path:
    """Write the report into ``out`` (created if needed); returns the path of index.html."""
    out.mkdir(parents=True, exist_ok=True)
    summaries = [r.summary for r in results]
    for r in results:
        write_csv(out / f"steps-{_slug(r.summary.policy)}.csv", r.log)
    doc = dict(meta)
    doc["policies"] = [{**r.summary.as_dict(), **getattr(r, "extra", {})} for r in results]
    (out / "summary.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    figs = _plots(out, results)
    e = html.escape
    head = "".join(f"<th>{e(s.policy)}</th>" for s in summaries)
    rows = "".join(
        "<tr><td>" + e(label) + "</td>" +
        "".join(f"<td>{e(_fmt(getattr(s, attr), kind))}</td>" for s in summaries) + "</tr>"
        for label, attr, kind in Summary.ROWS)
    csvs = " ".join(f'<a href="steps-{_slug(s.policy)}.csv">{e(s.policy)}</a>'
                    for s in summaries)
    imgs = "".join(f'<h2>{e(title)}</h2><img src="{e(f)}" alt="{e(title)}">'
                   for f, title in figs)
    t, c = meta.get("trace", {}), meta.get("cluster", {})
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>balancer replay report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td:first-child{{text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>What-if replay</h1>
<p>Trace <code>{e(str(t.get('kind')))}:{e(str(t.get('source')))}</code>: {t.get('vms')} VMs x
{t.get('steps')} steps of {t.get('interval_s')} s. Cluster: {c.get('hosts')} hosts
({e(', '.join(c.get('host_types', [])))}), memory binding {c.get('memory_binding')},
empty hosts off {c.get('empty_host_off')}, migration time {e(str(c.get('migration_time')))}.
Balancer every {meta.get('replay', {}).get('interval_s')} s, seed
{meta.get('replay', {}).get('seed')}.</p>
<table><tr><th>metric</th>{head}</tr>{rows}</table>
<p>Per-step metrics (CSV): {csvs}. Totals: <a href="summary.json">summary.json</a>.</p>
{imgs}
</body></html>
"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
