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


def _age(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(x, 3)


def summary(controller: Any) -> dict[str, Any]:
    """Hosts with their demand, configured memory and vCPUs, freshness, and the imbalance.

    Built from the controller's current estimate (``current_view``) without the per-VM detail
    of ``cluster_state`` (eligibility, ages), which a 5,000-host page does not need; falls back
    to ``cluster_state`` when the controller has no ``current_view``.
    """
    view_of = getattr(controller, "current_view", None)
    if view_of is None:
        return _summary_from_state(controller.cluster_state())
    from balancer.model import util_stats

    view = view_of()
    snap, fr = view.snapshot, view.freshness
    n = len(snap.hosts)
    cpu, mem, cfg_mem, vcpus, count = [0] * n, [0] * n, [0] * n, [0] * n, [0] * n
    index = snap.host_index
    for v in snap.vms:
        h = index[v.host]
        cpu[h] += v.cpu_demand
        mem[h] += v.mem_demand
        cfg_mem[h] += v.mem
        vcpus[h] += v.vcpus
        count[h] += 1
    stale = set(fr.stale_hosts)
    hosts = [{"name": h.name, "state": h.state.value, "cpu_capacity": h.cpu_capacity / 1000,
              "mem_capacity_mb": h.mem_capacity, "cpu_util": cpu[i] / h.cpu_capacity,
              "mem_util": mem[i] / h.mem_capacity, "mem_cfg_mb": cfg_mem[i],
              "vcpus": vcpus[i], "vms": count[i], "fresh": h.name not in stale,
              "sample_age_s": _age(fr.host_age.get(h.name))}
             for i, h in enumerate(snap.hosts)]
    last = getattr(controller, "last_cycle", None)
    c = controller.cfg.cluster
    return {"cluster": c.name, "automation": c.automation, "as_of": view.built,
            "hosts": hosts, "n_vms": len(snap.vms), "stale_vms": len(fr.stale_vms),
            "imbalance": util_stats(snap, snap.placement()).as_dict(),
            "freshness": fr.to_dict(),
            "last_cycle": None if last is None else {"cycle": last.cycle}}


def _summary_from_state(state: dict[str, Any]) -> dict[str, Any]:
    cfg_mem: dict[str, float] = defaultdict(float)
    vcpus: dict[str, int] = defaultdict(int)
    for v in state["vms"]:
        cfg_mem[v["host"]] += v["mem_mb"]
        vcpus[v["host"]] += v["vcpus"]
    hosts = [dict(h, mem_cfg_mb=cfg_mem[h["name"]], vcpus=vcpus[h["name"]])
             for h in state["hosts"]]
    return dict(state, hosts=hosts, n_vms=len(state["vms"]),
                stale_vms=len(state["freshness"].get("stale_vms", [])))


def cluster_view(state: dict[str, Any], threshold: int) -> dict[str, Any]:
    """Hosts as tiles grouped by state, with the cluster's imbalance and freshness on top."""
    groups: dict[str, list[dict[str, Any]]] = {s: [] for s in STATES}
    stale = 0
    for h in state["hosts"]:
        mem_cfg = h["mem_cfg_mb"] / h["mem_capacity_mb"] if h["mem_capacity_mb"] else 0.0
        cpu_cfg = h["vcpus"] / h["cpu_capacity"] if h["cpu_capacity"] else 0.0
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
    return {
        "cluster": state["cluster"], "automation": state["automation"], "as_of": state["as_of"],
        "threshold": threshold, "imbalance": state["imbalance"],
        "freshness": state["freshness"], "groups": [(s, groups[s]) for s in groups],
        "n_hosts": len(state["hosts"]), "n_vms": state["n_vms"], "stale_hosts": stale,
        "stale_vms": state["stale_vms"], "last_cycle": state.get("last_cycle"),
    }


def host_view(controller: Any, name: str) -> dict[str, Any] | None:
    """One host and its VMs (None when the host is not in the inventory)."""
    view_of = getattr(controller, "current_view", None)
    if view_of is None:
        state = controller.cluster_state()
        host = next((h for h in state["hosts"] if h["name"] == name), None)
        vms = [v for v in state["vms"] if v["host"] == name]
    else:
        view = view_of()
        snap, fr = view.snapshot, view.freshness
        if name not in snap.host_index:
            return None
        h = snap.hosts[snap.host_index[name]]
        mine = [v for v in snap.vms if v.host == name]
        stale_v = set(fr.stale_vms)
        level = controller.cfg.cluster.vm_level
        vms = [{"name": v.name, "vcpus": v.vcpus, "mem_mb": v.mem,
                "cpu_demand": v.cpu_demand / 1000, "mem_demand_mb": v.mem_demand,
                "automation": level(v.name), "fresh": v.name not in stale_v,
                "held": fr.pinned.get(v.name)} for v in mine]
        host = {"name": h.name, "state": h.state.value, "cpu_capacity": h.cpu_capacity / 1000,
                "mem_capacity_mb": h.mem_capacity,
                "cpu_util": sum(v.cpu_demand for v in mine) / h.cpu_capacity,
                "mem_util": sum(v.mem_demand for v in mine) / h.mem_capacity,
                "vms": len(mine), "fresh": h.name not in set(fr.stale_hosts),
                "sample_age_s": _age(fr.host_age.get(h.name))}
    if host is None:
        return None
    vms.sort(key=lambda v: (-v["mem_mb"], v["name"]))
    return {"host": host, "vms": vms, "cpu_band": band(host["cpu_util"]),
            "mem_band": band(host["mem_util"])}


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
