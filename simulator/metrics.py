"""Replay metrics: what one policy did to one trace, per step and in total.

Description
    Per step the simulator records, over the hosts that are powered and hold work ("active"):
    how many are active, how many are overloaded (CPU demand above capacity, counting the
    load migrations add), power drawn, CPU demand, demand lost to migrations, demand not met,
    migrations started, memory moved and the imbalance (population std of CPU utilisation plus
    std of memory utilisation over active hosts, as ``balancer.model.util_stats``).

    Totals follow Beloglazov & Buyya (2012, doi:10.1002/cpe.1867):

    * SLATAH: share of active-host time spent overloaded (demand above capacity);
    * PDM: CPU demand lost to migrations (the degradation of a migrating VM) / total demand;
    * SLAV = SLATAH x PDM; ESV = energy x SLAV;
    * energy in kWh, migrations, GB moved (configured memory of migrated VMs, GiB), mean
      active hosts, mean imbalance.
Requirements
    Filled in by ``simulator.cluster.Simulator``.
Limitations
    Host time is counted per step (the trace interval): a host is overloaded for a whole step
    or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

STEP_COLUMNS = ("step", "time_s", "active_hosts", "overloaded_hosts", "power_w",
                "cpu_demand_cores", "cpu_lost_cores", "cpu_unmet_cores", "migrations",
                "moved_gb", "imbalance", "cpu_util_mean", "cpu_util_max", "plan_seconds")


@dataclass
class StepLog:
    """Per-step columns (lists of equal length) and the host utilisation matrix."""

    interval_s: int
    columns: dict[str, list[float]] = field(
        default_factory=lambda: {c: [] for c in STEP_COLUMNS})
    host_util: list[np.ndarray] = field(default_factory=list)  # per step, per host (NaN = off)

    def add(self, **values: float) -> None:
        for c in STEP_COLUMNS:
            self.columns[c].append(float(values[c]))

    def array(self, name: str) -> np.ndarray:
        return np.asarray(self.columns[name], dtype=float)

    def util_matrix(self) -> np.ndarray:
        return np.vstack(self.host_util) if self.host_util else np.zeros((0, 0))


@dataclass
class Summary:
    policy: str
    steps: int
    slatah: float
    pdm: float
    slav: float
    migrations: int
    moved_gb: float
    energy_kwh: float
    esv: float
    mean_active_hosts: float
    mean_imbalance: float
    unmet_share: float
    seconds: float
    plan_calls: int

    ROWS = (
        ("overloaded host-time (SLATAH)", "slatah", "pct"),
        ("perf. lost to migrations (PDM)", "pdm", "pct"),
        ("SLAV = SLATAH x PDM", "slav", "sci"),
        ("migrations", "migrations", "int"),
        ("GB moved", "moved_gb", "f1"),
        ("energy (kWh)", "energy_kwh", "f2"),
        ("mean active hosts", "mean_active_hosts", "f1"),
        ("mean imbalance", "mean_imbalance", "f4"),
        ("demand not met", "unmet_share", "pct"),
        ("engine calls", "plan_calls", "int"),
        ("replay seconds", "seconds", "f1"),
    )

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "steps": self.steps, "slatah": round(self.slatah, 6),
            "pdm": round(self.pdm, 8), "slav": round(self.slav, 10),
            "migrations": self.migrations, "moved_gb": round(self.moved_gb, 3),
            "energy_kwh": round(self.energy_kwh, 3), "esv": round(self.esv, 8),
            "mean_active_hosts": round(self.mean_active_hosts, 3),
            "mean_imbalance": round(self.mean_imbalance, 6),
            "unmet_share": round(self.unmet_share, 6),
            "plan_calls": self.plan_calls, "seconds": round(self.seconds, 2),
        }


def summarise(policy: str, log: StepLog, seconds: float, plan_calls: int) -> Summary:
    dt = log.interval_s
    active = log.array("active_hosts")
    over = log.array("overloaded_hosts")
    demand = log.array("cpu_demand_cores")
    lost = log.array("cpu_lost_cores")
    unmet = log.array("cpu_unmet_cores")
    host_time = float(active.sum())
    total_demand = float(demand.sum())
    slatah = float(over.sum()) / host_time if host_time else 0.0
    pdm = float(lost.sum()) / total_demand if total_demand else 0.0
    energy = float(log.array("power_w").sum()) * dt / 3.6e6
    imb = log.array("imbalance")
    return Summary(
        policy=policy, steps=len(active), slatah=slatah, pdm=pdm, slav=slatah * pdm,
        migrations=int(log.array("migrations").sum()),
        moved_gb=float(log.array("moved_gb").sum()), energy_kwh=energy,
        esv=energy * slatah * pdm,
        mean_active_hosts=float(active.mean()) if len(active) else 0.0,
        mean_imbalance=float(np.nanmean(imb)) if len(imb) else 0.0,
        unmet_share=float(unmet.sum()) / total_demand if total_demand else 0.0,
        seconds=seconds, plan_calls=plan_calls)


def _fmt(value: float, kind: str) -> str:
    if kind == "pct":
        return f"{100 * value:.2f} %"
    if kind == "sci":
        return f"{value:.2e}"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "f1":
        return f"{value:,.1f}"
    if kind == "f2":
        return f"{value:,.2f}"
    return f"{value:.4f}"


def table(summaries: list[Summary]) -> str:
    """One table, policies side by side (rows = metrics)."""
    head = ["metric"] + [s.policy for s in summaries]
    rows = [[label] + [_fmt(getattr(s, attr), kind) for s in summaries]
            for label, attr, kind in Summary.ROWS]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    out = ["  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i])
                     for i, h in enumerate(head))]
    out.append("  ".join("-" * w for w in widths))
    for r in rows:
        out.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                             for i, c in enumerate(r)))
    return "\n".join(out) + "\n"
