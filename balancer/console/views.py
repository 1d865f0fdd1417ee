"""What the console's pages show, shaped from the controller's public state (no HTML here).

Each function takes plain dicts (``Controller.cluster_state()``, store rows) and returns plain
dicts for the templates, so the shaping is testable without a browser.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

STATES = ("active", "maintenance", "standby")
# Utilisation bands for colour: below 60 % "ok", below 85 % "warm", else "hot".
BANDS = ((0.60, "ok"), (0.85, "warm"), (math.inf, "hot"))


def band(util: float) -> str:
    for limit, name in BANDS:
        if util < limit:
            return name
    return "hot"


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100.0 * x:.0f}%"


def cluster_view(state: dict[str, Any], threshold: int) -> dict[str, Any]:
    """Hosts as tiles grouped by state, with the cluster's imbalance and freshness on top."""
    cfg_mem: dict[str, float] = defaultdict(float)
    cfg_cpu: dict[str, float] = defaultdict(float)
    for v in state["vms"]:
        cfg_mem[v["host"]] += v["mem_mb"]
        cfg_cpu[v["host"]] += v["vcpus"]
    groups: dict[str, list[dict[str, Any]]] = {s: [] for s in STATES}
    stale = 0
    for h in state["hosts"]:
        mem_cfg = cfg_mem[h["name"]] / h["mem_capacity_mb"] if h["mem_capacity_mb"] else 0.0
        cpu_cfg = cfg_cpu[h["name"]] / h["cpu_capacity"] if h["cpu_capacity"] else 0.0
        cu, mu = h["cpu_util"], h["mem_util"]
        tile = {
            "name": h["name"], "state": h["state"], "vms": h["vms"], "fresh": h["fresh"],
            "age": h["sample_age_s"], "cpu": cu, "mem": mu, "cpu_cfg": cpu_cfg,
            "mem_cfg": mem_cfg, "band": band(max(cu, mu)), "cpu_band": band(cu),
            "mem_band": band(mu),
            "cpu_w": min(100.0, 100.0 * cu), "mem_w": min(100.0, 100.0 * mu),
            "mem_cfg_w": min(100.0, 100.0 * mem_cfg),
        }
        stale += not h["fresh"]
        groups.setdefault(h["state"], []).append(tile)
    imb = state["imbalance"]
    fr = state["freshness"]
    return {
        "cluster": state["cluster"], "automation": state["automation"], "as_of": state["as_of"],
        "threshold": threshold, "imbalance": imb, "freshness": fr,
        "groups": [(s, groups[s]) for s in groups],
        "n_hosts": len(state["hosts"]), "n_vms": len(state["vms"]), "stale_hosts": stale,
        "stale_vms": len(fr.get("stale_vms", [])), "last_cycle": state.get("last_cycle"),
    }


def host_view(state: dict[str, Any], name: str) -> dict[str, Any] | None:
    """One host and its VMs (None when the host is not in the inventory)."""
    host = next((h for h in state["hosts"] if h["name"] == name), None)
    if host is None:
        return None
    vms = sorted((v for v in state["vms"] if v["host"] == name),
                 key=lambda v: (-v["mem_mb"], v["name"]))
    return {"host": host, "vms": vms, "cpu_band": band(host["cpu_util"]),
            "mem_band": band(host["mem_util"]), "automation": state["automation"]}


def wave_groups(recs: list[dict[str, Any]], waves: dict[str, int] | None
                ) -> list[dict[str, Any]]:
    """Pending recommendations grouped by the executor wave they would run in.

    ``waves`` maps a VM to its wave (0-based) from ``balancer.planner.make_waves``; without it
    (the planner could not order them) all recommendations form one group.
    """
    by: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in recs:
        by[(waves or {}).get(r["vm"], 0)].append(r)
    out = []
    for w in sorted(by):
        rows = by[w]
        out.append({"wave": w + 1, "recs": rows, "mem_mb": sum(r["mem_mb"] for r in rows),
                    "gain": round(sum(r["gain"] for r in rows), 6)})
    return out
