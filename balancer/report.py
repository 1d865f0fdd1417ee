"""Human-readable renderings of plans (the ``--format table`` output)."""

from __future__ import annotations

from balancer.model import host_loads
from balancer.service import FrontierResult, PlanResult


def _bar(x: float, width: int = 20) -> str:
    n = max(0, min(width, round(x * width)))
    return "#" * n + "." * (width - n)


def plan_table(result: PlanResult) -> str:
    snap = result.snapshot
    cpu0, mem0 = host_loads(snap, snap.placement())
    cpu1, mem1 = host_loads(snap, result.placement)
    lines = []
    w = max(len(h.name) for h in snap.hosts)
    lines.append(f"{'host':<{w}}  {'state':<11} {'cpu before':>10} {'cpu after':>9}  "
                 f"{'mem before':>10} {'mem after':>9}  cpu after")
    for i, h in enumerate(snap.hosts):
        cb, ca = cpu0[i] / h.cpu_capacity, cpu1[i] / h.cpu_capacity
        mb, ma = mem0[i] / h.mem_capacity, mem1[i] / h.mem_capacity
        lines.append(f"{h.name:<{w}}  {h.state.value:<11} {cb:>10.0%} {ca:>9.0%}  "
                     f"{mb:>10.0%} {ma:>9.0%}  {_bar(ca)}")
    b, a = result.before, result.after
    lines.append("")
    lines.append(f"imbalance (cpu std + mem std): {b.imbalance:.4f} -> {a.imbalance:.4f}   "
                 f"cpu std {b.cpu_std:.4f} -> {a.cpu_std:.4f}   "
                 f"mem std {b.mem_std:.4f} -> {a.mem_std:.4f}")
    lines.append(f"max utilisation: cpu {b.cpu_max:.0%} -> {a.cpu_max:.0%}   "
                 f"mem {b.mem_max:.0%} -> {a.mem_max:.0%}")
    lines.append(f"migrations: {len(result.moves)}   memory moved: "
                 f"{result.moved_mem / 1024:.1f} GiB")
    s = result.solver
    lines.append(f"solver: {s.get('name')} {s.get('status')} in {s.get('seconds')} s")
    if result.moves:
        lines.append("")
        vw = max(len(m.vm) for m in result.moves)
        lines.append(f"{'vm':<{vw}}  {'from':<{w}}  {'to':<{w}}  {'mem GiB':>7}  reason")
        for m in result.moves:
            lines.append(f"{m.vm:<{vw}}  {m.source:<{w}}  {m.target:<{w}}  "
                         f"{m.mem / 1024:>7.1f}  {m.reason}")
    for note in result.notes:
        lines.append(f"note: {note}")
    if result.eligibility:
        # why VMs had fewer candidate hosts, grouped by requirement
        count: dict[str, int] = {}
        for why in result.eligibility.values():
            for w in why:
                count[w] = count.get(w, 0) + 1
        lines.append("")
        lines.append("fewer candidate hosts (compatibility):")
        for w, n in sorted(count.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {n} VM(s) {w}")
    return "\n".join(lines) + "\n"


def frontier_table(result: FrontierResult, width: int = 48) -> str:
    """The balance / migration-cost curve for a terminal: one row per point, then a chart of
    imbalance (rows) against memory moved (columns)."""
    pts = result.points
    b = result.before
    lines = [f"{'#':>2}  {'price/MiB':>10}  {'moves':>5}  {'moved GiB':>9}  {'imbalance':>9}  "
             f"{'cpu std':>7}  {'mem std':>7}  {'gap':>6}  by"]
    lines.append(f"{'-':>2}  {'(start)':>10}  {0:>5}  {0:>9.1f}  {b.imbalance:>9.4f}  "
                 f"{b.cpu_std:>7.4f}  {b.mem_std:>7.4f}  {'':>6}")
    for i, p in enumerate(pts, 1):
        d = p.to_dict()
        lines.append(f"{i:>2}  {p.price:>10.1f}  {d['moves']:>5}  {d['moved_mem_gb']:>9.1f}  "
                     f"{d['imbalance']:>9.4f}  {d['cpu_std']:>7.4f}  {d['mem_std']:>7.4f}  "
                     f"{d['gap']:>6.1%}  {'price' if p.kind == 'price' else 'budget'}")
    if pts:
        top = max(b.imbalance, max(p.plan.after.imbalance for p in pts)) or 1.0
        right = max(p.plan.moved_mem for p in pts) or 1
        rows = 10
        grid = [[" "] * (width + 1) for _ in range(rows + 1)]
        marks = [(0, b.imbalance, "s")] + [(p.plan.moved_mem, p.plan.after.imbalance, str(i))
                                           for i, p in enumerate(pts, 1)]
        for mem, imb, ch in marks:
            r = rows - round(imb / top * rows)
            c = round(mem / right * width)
            grid[r][c] = ch if grid[r][c] == " " else "*"
        lines.append("")
        lines.append("imbalance (cpu std + mem std) vs memory moved; s = start, n = point n")
        for r, row in enumerate(grid):
            label = f"{top * (rows - r) / rows:7.3f}" if r % 5 == 0 else " " * 7
            lines.append(f"{label} |{''.join(row)}")
        lines.append(" " * 8 + "+" + "-" * (width + 1))
        lines.append(" " * 9 + f"0{'GiB moved':^{width - 10}}{right / 1024:>9.0f}")
    s = result.solver
    lines.append("")
    lines.append(f"solver: {s.get('name')}, {s.get('points')} points in {s.get('seconds')} s, "
                 f"stopped by {s.get('stopped_by')}")
    return "\n".join(lines) + "\n"


def frontier_plot(result: FrontierResult, path: str, title: str | None = None) -> None:
    """The curve as a PNG: imbalance against memory moved, each point labelled by its price."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result.points
    xs = [0.0] + [p.plan.moved_mem / 1024 for p in pts]
    ys = [result.before.imbalance] + [p.plan.after.imbalance for p in pts]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, ys, "-", color="tab:blue", lw=1)
    pp = [p for p in pts if p.kind == "price"]
    ax.plot([p.plan.moved_mem / 1024 for p in pp], [p.plan.after.imbalance for p in pp], "o",
            color="tab:blue", label="solved at a price")
    fb = [p for p in pts if p.kind != "price"]
    if fb:
        ax.plot([p.plan.moved_mem / 1024 for p in fb], [p.plan.after.imbalance for p in fb],
                ".", color="tab:orange",
                label="solved by memory budget between two prices (all verified plans)")
    for p in pp:
        ax.annotate(f"{p.price:,.0f}", (p.plan.moved_mem / 1024, p.plan.after.imbalance),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axhline(result.before.imbalance, color="grey", lw=0.8, ls=":", label="start")
    ax.set_xlabel("memory moved (GiB)")
    ax.set_ylabel("imbalance = cpu std + mem std")
    ax.set_title(title or f"balance vs migration cost ({len(result.snapshot.hosts)} hosts, "
                 f"{len(result.snapshot.vms)} VMs); labels: price per MiB")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
