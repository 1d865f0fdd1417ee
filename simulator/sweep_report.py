"""The sweep report: policies compared across traces (days), with each run's own replay report.

Writes into DIR:

* ``index.html`` the setup (traces with their VMs, hosts and steps), the spread per policy
  (min / median / max over the traces, which metrics are better lower), the plots below
  and one row per run linking ``runs/<run>/index.html``;
* ``tradeoff.png`` energy against SLATAH, one point per run (colour: policy, marker: trace):
  the trade-off a policy is chosen on;
* ``spread.png`` one box plot per metric (energy, SLATAH, migrations, PDM, mean active hosts,
  imbalance): a box per policy over the traces, each trace a marked point on it;
* ``by-trace.png`` energy and SLATAH per trace, policies side by side;
* ``runs/<run>/`` each run's replay report, as ``balancer replay --report`` writes it;
* ``runs.json`` what ``balancer sweep --format json`` prints.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from simulator.sweep import COMPARE, _fmt, spread, trace_label, variant

MARKERS = "osD^vP*Xhp<>"
# metrics where less is better (the best median is marked); active hosts is what energy follows
LOWER_IS_BETTER = {"energy_kwh", "migrations", "slatah", "pdm", "mean_imbalance"}
UNIT = {"slatah": "SLATAH (% of active host-time)", "pdm": "PDM (% of demand)",
        "energy_kwh": "energy (kWh)", "migrations": "migrations",
        "mean_active_hosts": "mean active hosts", "mean_imbalance": "mean imbalance"}
SCALE = {"slatah": 100.0, "pdm": 100.0}


def _title(key: str) -> str:
    return UNIT.get(key, key) + ("\n(lower is better)" if key in LOWER_IS_BETTER else "")


def _plots(out: Path, runs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in runs if "error" not in r]
    if not ok:
        return []
    variants = list(dict.fromkeys(variant(r) for r in ok))
    days = list(dict.fromkeys(trace_label(r["trace"]) for r in ok))
    figs = []
    scale = SCALE

    # the trade-off: energy against SLATAH, one point per run
    fig, ax = plt.subplots(figsize=(9.0, 5.2))
    for i, v in enumerate(variants):
        pts = []
        for r in ok:
            if variant(r) != v:
                continue
            d = days.index(trace_label(r["trace"]))
            pts.append((float(r["energy_kwh"]), 100.0 * float(r["slatah"])))
            ax.plot(*pts[-1], MARKERS[d % len(MARKERS)], color=f"C{i % 10}", ms=9, alpha=0.9)
        # one label per policy, at the rightmost of its points
        x, y = max(pts)
        ax.annotate(v, (x, y), textcoords="offset points", xytext=(8, 6), fontsize=9,
                    color=f"C{i % 10}", weight="bold")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], ls="", marker="o", color=f"C{i % 10}", label=v)
               for i, v in enumerate(variants)]
    handles += [Line2D([], [], ls="", marker=MARKERS[d % len(MARKERS)], color="grey",
                       label=day) for d, day in enumerate(days)]
    ax.legend(handles=handles, fontsize=8, loc="upper right", title="policy / trace",
              title_fontsize=8)
    ax.set_xlabel("energy (kWh, lower is better)")
    ax.set_ylabel("SLATAH (% of active host-time, lower is better)")
    ax.set_title("Energy against SLA violation, one point per run", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.1)
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=90)
    plt.close(fig)
    figs.append(("tradeoff.png", "Energy against SLA violation",
                 "Each run is one point (colour: policy, marker: trace); towards the lower left "
                 "is better on both. A policy that saves energy by packing hosts pays in SLATAH "
                 "(the share of time active hosts were overloaded)."))

    ncol = 3
    nrow = (len(COMPARE) + ncol - 1) // ncol
    width = max(12.0, 1.2 * len(variants) * ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(width, 3.9 * nrow), squeeze=False)
    for ax, (_, key, _) in zip(axes.flat, COMPARE, strict=False):
        s = scale.get(key, 1.0)
        data = [[float(r[key]) * s for r in ok if variant(r) == v] for v in variants]
        ax.boxplot(data, widths=0.5, medianprops={"color": "black"}, showfliers=False)
        for i, v in enumerate(variants):
            for r in ok:
                if variant(r) != v:
                    continue
                d = days.index(trace_label(r["trace"]))
                ax.plot(i + 1 + (d - (len(days) - 1) / 2) * 0.08, float(r[key]) * s,
                        MARKERS[d % len(MARKERS)], color=f"C{d % 10}", ms=6, alpha=0.85,
                        label=days[d] if i == 0 else None)
        ax.set_title(_title(key), fontsize=10)
        ax.set_xticks(range(1, len(variants) + 1))
        ax.set_xticklabels(variants, rotation=20 if len(variants) > 3 else 0, ha="right"
                           if len(variants) > 3 else "center", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(COMPARE):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8, title="trace",
               title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    fig.savefig(out / "spread.png", dpi=90)
    plt.close(fig)
    figs.append(("spread.png", "Spread per policy", f"One box per policy over the {len(days)} "
                 "traces (box: quartiles, whiskers: range); each point is one trace."))

    fig, axes = plt.subplots(1, 2, figsize=(max(10.0, 1.1 * len(days) * len(variants)), 3.8))
    w = 0.8 / len(variants)
    for ax, key in zip(axes, ("energy_kwh", "slatah"), strict=True):
        s = scale.get(key, 1.0)
        for i, v in enumerate(variants):
            xs, ys = [], []
            for d, day in enumerate(days):
                hit = [r for r in ok if variant(r) == v and trace_label(r["trace"]) == day]
                if hit:
                    xs.append(d + (i - (len(variants) - 1) / 2) * w)
                    ys.append(float(hit[0][key]) * s)
            ax.bar(xs, ys, width=w, label=v, color=f"C{i % 10}")
        ax.set_xticks(range(len(days)))
        ax.set_xticklabels(days, fontsize=9)
        ax.set_title(_title(key), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, title="policy", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "by-trace.png", dpi=90)
    plt.close(fig)
    figs.append(("by-trace.png", "Energy and SLATAH per trace",
                 "The same runs trace by trace, policies side by side."))
    return figs


def write_sweep_report(out: Path, runs: list[dict[str, Any]], specs: list[Any],
                       meta: dict[str, Any]) -> Path:
    """Write the report into ``out`` (created if needed); returns the path of index.html.
    ``runs`` may carry ``report_files`` (name -> bytes of the run's replay report)."""
    out.mkdir(parents=True, exist_ok=True)
    links: list[str | None] = []
    for spec, r in zip(specs, runs, strict=True):
        files = r.get("report_files")
        if not files:
            links.append(None)
            continue
        d = out / "runs" / spec.run_id
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (d / Path(name).name).write_bytes(data)
        links.append(f"runs/{spec.run_id}/index.html")
    clean = [{k: v for k, v in r.items() if k != "report_files"} for r in runs]
    (out / "runs.json").write_text(json.dumps({"runs": clean, "meta": meta}, indent=1) + "\n",
                                   encoding="utf-8")
    figs = _plots(out, clean)
    e = html.escape
    sp = spread(clean)
    shead = "".join(f"<th>{e(name)}<br><small>{n} traces</small></th>" for name, _, n in sp)

    def scell(stats: dict[str, tuple[float, float, float]], k: str, kind: str) -> str:
        lo, med, hi = stats[k]
        return (f"<td><b>{e(_fmt(med, kind))}</b><br><small>{e(_fmt(lo, kind))} .. "
                f"{e(_fmt(hi, kind))}</small></td>")

    srows = "".join(
        f"<tr><td>{e(lab)}{' <small>(lower is better)</small>' if k in LOWER_IS_BETTER else ''}"
        "</td>" + "".join(scell(stats, k, kind) for _, stats, _ in sp) + "</tr>"
        for lab, k, kind in COMPARE)
    rrows = []
    for r, link in zip(clean, links, strict=True):
        name = e(variant(r))
        day = e(trace_label(r["trace"]))
        if "error" in r:
            rrows.append(f'<tr class="failed"><td>{day}</td><td>{name}</td>'
                         f'<td colspan="{len(COMPARE) + 3}">failed after {r["attempts"]} '
                         f'attempts: {e(str(r["error"]))}</td></tr>')
            continue
        cells = "".join(f"<td>{e(_fmt(r[k], kind))}</td>" for _, k, kind in COMPARE)
        rep = f'<a href="{e(link)}">replay report</a>' if link else "-"
        rrows.append(f"<tr><td>{day}</td><td>{name}</td>{cells}"
                     f"<td>{e(r['worker'].rsplit('/', 1)[-1])}</td><td>{r['seconds']:.1f}</td>"
                     f"<td>{rep}</td></tr>")
    imgs = "".join(f'<h2>{e(title)}</h2><p>{e(caption)}</p><img src="{e(f)}" alt="{e(title)}">'
                   for f, title, caption in figs)
    traces_ = list(dict.fromkeys(r["trace"] for r in clean))
    sizes = []  # what each trace is: VMs, steps, hosts (from its first run that finished)
    for t in traces_:
        r0 = next((r for r in clean if r["trace"] == t and "error" not in r), None)
        if r0 is None:
            sizes.append(f"<li><code>{e(t)}</code>: no run finished</li>")
        else:
            sizes.append(f"<li><code>{e(t)}</code>: {r0['vms']:,} VMs, {r0['steps']:,} steps, "
                         f"{r0['hosts']:,} hosts</li>")
    n_fail = sum("error" in r for r in clean)
    workers = len({r["worker"] for r in clean if "worker" in r})
    head = "".join(f"<th>{e(lab)}</th>" for lab, _, _ in COMPARE)
    steps = (f"the first {meta['steps']} steps of each trace" if meta.get("steps") else
             "every step of each trace")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>balancer sweep report</title>
<style>body{{font-family:sans-serif;max-width:1250px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:0.5em 0 1.5em}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}}
th{{background:#f3f3f3}}td:first-child,table.runs td:nth-child(2){{text-align:left}}
th:first-child,table.runs th:nth-child(2){{text-align:left}}
tr.failed td{{background:#fde8e8;text-align:left;white-space:normal}}
img{{max-width:100%}}code{{background:#f3f3f3;padding:0 3px}}</style></head><body>
<h1>Policy sweep</h1>
<p>{len(clean)} runs ({len(traces_)} traces x {len(sp)} policy variants{
    f", <b>{n_fail} failed</b>" if n_fail else ""}) on {workers} Dask workers
(<code>{e(str(meta.get('scheduler')))}</code>) in {meta.get('wall_seconds')} s.
Traces:</p><ul>{"".join(sizes)}</ul>
<p>Config: <code>{e(str(meta.get('config') or 'default (cluster sized to each trace)'))}</code>,
seed {e(str(meta.get('seed') if meta.get('seed') is not None else
            'from the config (0 if it gives none)'))},
{e(steps)}.</p>
<h2>Spread over the traces, per policy</h2>
<p>Median over the traces in bold, minimum .. maximum below. Energy and SLATAH pull against
each other (fewer active hosts use less energy and are overloaded more often): read them
together, as in the first plot.</p>
<table><tr><th>metric</th>{shead}</tr>{srows}</table>
{imgs}
<h2>Every run</h2>
<table class="runs"><tr><th>trace</th><th>policy</th>{head}
<th>worker</th><th>seconds</th><th>details</th></tr>
{"".join(rrows)}</table>
<p>All runs as JSON: <a href="runs.json">runs.json</a>.</p>
</body></html>
"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
