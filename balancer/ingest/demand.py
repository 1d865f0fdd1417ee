"""Demand estimation over a window of samples, and its application to an inventory snapshot.

Description
    ``estimate`` smooths each VM's CPU and memory use over the last ``window_s`` seconds with
    the mean, a percentile (default p95) or the maximum, as DRS smooths demand over its
    sampling window rather than acting on one reading. A VM or host is *fresh* when its newest
    sample is at most ``stale_after_s`` old. ``apply_estimates`` writes the estimates into the
    inventory snapshot and makes missing data explicit:

    - a VM without fresh samples keeps its inventory demand and is pinned (never moved);
    - a host without fresh samples receives nothing (a mandatory vm_host rule named
      ``balancer:fresh-hosts`` limits every movable VM to fresh hosts) and its VMs are pinned;
    - VMs on hosts in maintenance or standby are never pinned for missing data, so evacuation
      still happens (with their last known demand).
Requirements
    A frame with columns ts, kind, name, cpu, mem (``balancer.ingest.samples``).
Limitations
    Estimates above a VM's configured size are clamped to it (and counted). Samples for names
    not in the inventory are ignored (and counted). A pinned VM that is mandatorily affine to
    others pins its whole affinity group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from balancer.model import ClusterSnapshot, HostState, RuleType
from balancer.snapshot import parse_snapshot, to_dict

FRESH_RULE = "balancer:fresh-hosts"


@dataclass
class Estimates:
    """Per-VM demand (cores, MiB) over the window and the newest sample time per entity."""

    vm_cpu: dict[str, float] = field(default_factory=dict)
    vm_mem: dict[str, float] = field(default_factory=dict)
    vm_last: dict[str, float] = field(default_factory=dict)
    host_cpu: dict[str, float] = field(default_factory=dict)
    host_mem: dict[str, float] = field(default_factory=dict)
    host_last: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    newest: float | None = None


@dataclass
class Freshness:
    """What the estimate could and could not see; exposed by the API and as metrics."""

    now: float
    stale_after_s: float
    vm_age: dict[str, float | None] = field(default_factory=dict)
    host_age: dict[str, float | None] = field(default_factory=dict)
    stale_vms: list[str] = field(default_factory=list)
    stale_hosts: list[str] = field(default_factory=list)
    pinned: dict[str, str] = field(default_factory=dict)  # VM -> why it will not be moved
    clamped: int = 0
    unknown_names: int = 0
    newest: float | None = None

    @property
    def age(self) -> float | None:
        return None if self.newest is None else max(0.0, self.now - self.newest)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stale_after_s": self.stale_after_s,
            "newest_sample_age_s": None if self.age is None else round(self.age, 3),
            "stale_vms": self.stale_vms,
            "stale_hosts": self.stale_hosts,
            "pinned_vms": self.pinned,
            "clamped_estimates": self.clamped,
            "samples_for_unknown_names": self.unknown_names,
        }


def estimate(frame: pd.DataFrame, now: float, *, window_s: float, method: str = "percentile",
             percentile: float = 95.0) -> Estimates:
    """Smoothed demand per VM and host over ``(now - window_s, now]``."""
    est = Estimates(samples=len(frame))
    if frame.empty:
        return est
    frame = frame[frame["ts"] <= now]
    if frame.empty:
        return est
    est.newest = float(frame["ts"].max())
    last = frame.groupby(["kind", "name"], sort=False)["ts"].max()
    recent = frame[frame["ts"] > now - window_s]
    grouped = recent.groupby(["kind", "name"], sort=False)[["cpu", "mem"]]
    if method == "mean":
        agg = grouped.mean()
    elif method == "max":
        agg = grouped.max()
    elif method == "percentile":
        agg = grouped.quantile(percentile / 100.0)
    else:
        raise ValueError(f"unknown estimator {method!r}")
    for (kind, name), ts in last.items():
        (est.vm_last if kind == "vm" else est.host_last)[name] = float(ts)
    for (kind, name), row in zip(agg.index, agg.itertuples(index=False), strict=True):
        if kind == "vm":
            est.vm_cpu[name] = float(row.cpu)
            est.vm_mem[name] = float(row.mem)
        else:
            est.host_cpu[name] = float(row.cpu)
            est.host_mem[name] = float(row.mem)
    return est


def apply_estimates(inventory: ClusterSnapshot, est: Estimates | None, now: float, *,
                    stale_after_s: float, pins: dict[str, str] | None = None,
                    require_fresh: bool = True) -> tuple[ClusterSnapshot, Freshness]:
    """The snapshot the engine should see: estimated demand, stale data pinned.

    ``pins`` names VMs to hold where they are for reasons of the caller (cool-down, automation
    disabled), with the reason. With ``require_fresh=False`` (inventory-only what-ifs) samples
    are not required and nothing is pinned for missing data.
    """
    est = est or Estimates()
    fresh = Freshness(now=now, stale_after_s=stale_after_s, newest=est.newest)
    doc = to_dict(inventory)
    vm_names = {v.name for v in inventory.vms}
    host_names = {h.name for h in inventory.hosts}
    fresh.unknown_names = sum(1 for n in est.vm_last if n not in vm_names) + sum(
        1 for n in est.host_last if n not in host_names)
    active = {h.name for h in inventory.hosts if h.active}

    host_fresh: dict[str, bool] = {}
    for h in inventory.hosts:
        last = est.host_last.get(h.name)
        age = None if last is None else max(0.0, now - last)
        fresh.host_age[h.name] = age
        host_fresh[h.name] = age is not None and age <= stale_after_s
        if not host_fresh[h.name] and h.state is not HostState.STANDBY:
            fresh.stale_hosts.append(h.name)  # a host in standby sends nothing, by design

    pinned: dict[str, str] = {}
    for raw in doc["vms"]:
        name = raw["name"]
        last = est.vm_last.get(name)
        age = None if last is None else max(0.0, now - last)
        fresh.vm_age[name] = age
        ok = age is not None and age <= stale_after_s and name in est.vm_cpu
        if ok:
            cpu = est.vm_cpu[name]
            mem = est.vm_mem[name]
            if cpu > raw["vcpus"] or mem > raw["mem_mb"]:
                fresh.clamped += 1
            raw["cpu_demand"] = round(min(max(cpu, 0.0), float(raw["vcpus"])), 3)
            raw["mem_demand_mb"] = round(min(max(mem, 0.0), float(raw["mem_mb"])))
        else:
            fresh.stale_vms.append(name)
        if not require_fresh or raw["host"] not in active:
            continue  # evacuation is never held back by missing data
        if not ok:
            pinned[name] = "no fresh samples" if age is None \
                else f"newest sample {age:.0f} s old"
        elif not host_fresh[raw["host"]]:
            pinned[name] = f"host {raw['host']} has no fresh samples"

    for name, why in (pins or {}).items():
        if name in vm_names:
            pinned.setdefault(name, why)

    if require_fresh:
        fresh_hosts = sorted(h for h in active if host_fresh[h])
        # hosts in standby have no samples by design; a plan that wakes one may use it
        standby = sorted(h.name for h in inventory.hosts if h.state is HostState.STANDBY)
        vm_host_rules = [r for r in inventory.rules
                         if r.type is RuleType.VM_HOST and r.mandatory]
        by_vm: dict[str, set[str]] = {}
        for r in vm_host_rules:
            for v in r.vms:
                by_vm[v] = by_vm[v] & set(r.hosts) if v in by_vm else set(r.hosts)
        host_of = {v.name: v.host for v in inventory.vms}
        groups = inventory.affinity_groups()
        for v in inventory.vms:
            if v.name in pinned or host_of[v.name] not in active:
                continue
            allowed = set(fresh_hosts) | set(standby)
            for member in groups.get(v.name, [v.name]):
                if member in by_vm:
                    allowed &= by_vm[member]
            if not fresh_hosts:
                pinned[v.name] = "no host has fresh samples"
            elif not allowed:
                pinned[v.name] = "every host its rules allow lacks fresh samples"
        # Affinity groups move together: one pinned member pins the group.
        for name in list(pinned):
            for other in groups.get(name, [name]):
                if other != name and host_of[other] in active:
                    pinned.setdefault(other, f"affine to pinned VM {name}")
        movable = sorted(v.name for v in inventory.vms if v.name not in pinned
                         and v.automation.value == "fully")
        if movable and fresh_hosts and len(fresh_hosts) + len(standby) < len(inventory.hosts):
            doc["rules"].append({"name": FRESH_RULE, "type": "vm_host", "vms": movable,
                                 "hosts": sorted(fresh_hosts + standby), "mandatory": True})
    for raw in doc["vms"]:
        if raw["name"] in pinned:
            raw["automation"] = "manual"
    fresh.pinned = dict(sorted(pinned.items()))
    snapshot = parse_snapshot(doc)
    return snapshot, fresh
