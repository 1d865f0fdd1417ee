"""Human-readable renderings of plans (the ``--format table`` output)."""

from __future__ import annotations

from balancer.model import host_loads
from balancer.service import PlanResult


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
