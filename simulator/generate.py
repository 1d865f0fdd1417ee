"""Seeded synthetic clusters (snapshot v1 documents) for the demo, tests and benchmarks.

Hosts come in two types (48 cores / 384 GiB and 64 cores / 512 GiB, two to one). VMs are drawn
from a catalogue of common sizes; CPU demand is ``vcpus x Beta(1.2, 3)`` and memory demand
``mem x Beta(4, 2)``. The start placement is deliberately skewed, as clusters drift: each host
gets a random "pull" for CPU-heavy and for memory-heavy VMs (log-normal), and each VM picks a host
in proportion to the pull matching its profile, among hosts where it fits. With ``rules=True``
the cluster also gets anti-affinity triples, affinity pairs, VM-host must and should rules and
a few manual VMs, all satisfied by the start placement.
"""

from __future__ import annotations

from typing import Any

import numpy as np

HOST_TYPES = ((48, 384 * 1024), (64, 512 * 1024))
# (vcpus, mem GiB, weight)
VM_CATALOGUE = (
    (1, 2, 0.08), (2, 4, 0.16), (2, 8, 0.14), (4, 8, 0.14), (4, 16, 0.16), (8, 16, 0.08),
    (8, 32, 0.12), (16, 64, 0.05), (4, 32, 0.04), (16, 32, 0.03),
)


# CPU generations for heterogeneous clusters: (model, features); each adds to the one before.
CPU_GENERATIONS = (
    ("Haswell", ("sse4_2", "avx", "avx2")),
    ("Skylake-Server", ("sse4_2", "avx", "avx2", "avx512f")),
    ("Icelake-Server", ("sse4_2", "avx", "avx2", "avx512f", "avx512vnni")),
)


def generate(n_hosts: int, n_vms: int, seed: int = 0, *, rules: bool = False,
             skew: float = 0.9, heterogeneous: bool = False) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    hosts = []
    for i in range(n_hosts):
        cores, mem = HOST_TYPES[1] if i % 3 == 2 else HOST_TYPES[0]
        hosts.append({"name": f"host-{i:03d}", "cpu_capacity": float(cores),
                      "mem_capacity_mb": mem, "state": "active"})
    cap_cpu = np.array([h["cpu_capacity"] for h in hosts])
    cap_mem = np.array([h["mem_capacity_mb"] for h in hosts], dtype=float)
    weights = np.array([w for _, _, w in VM_CATALOGUE])
    kinds = rng.choice(len(VM_CATALOGUE), size=n_vms, p=weights / weights.sum())
    pull_cpu = np.exp(rng.normal(0.0, skew, n_hosts))
    pull_mem = np.exp(rng.normal(0.0, skew, n_hosts))
    used_cpu = np.zeros(n_hosts)
    used_mem = np.zeros(n_hosts)
    vms = []
    cpu_util = rng.beta(1.2, 3.0, n_vms)
    mem_util = rng.beta(4.0, 2.0, n_vms)
    for j in range(n_vms):
        vcpus, mem_gb, _ = VM_CATALOGUE[kinds[j]]
        mem = mem_gb * 1024
        cpu_d = round(float(vcpus * cpu_util[j]), 3)
        mem_d = int(mem * mem_util[j])
        cpu_heavy = cpu_d / vcpus > mem_d / mem * 0.45
        pull = pull_cpu if cpu_heavy else pull_mem
        fits = (used_mem + mem <= cap_mem) & (used_cpu + cpu_d <= cap_cpu * 0.95)
        if not fits.any():
            fits = used_mem + mem <= cap_mem
        p = np.where(fits, pull, 0.0)
        h = int(rng.choice(n_hosts, p=p / p.sum()))
        used_cpu[h] += cpu_d
        used_mem[h] += mem
        vms.append({"name": f"vm-{j:05d}", "host": hosts[h]["name"], "vcpus": vcpus,
                    "mem_mb": mem, "cpu_demand": cpu_d, "mem_demand_mb": mem_d,
                    "automation": "fully"})
    doc: dict[str, Any] = {"version": 1, "hosts": hosts, "vms": vms, "rules": []}
    if rules:
        doc["rules"] = _rules(rng, doc, n_hosts)
    if heterogeneous:
        _heterogeneous(rng, doc)
    return doc


def _heterogeneous(rng: np.random.Generator, doc: dict[str, Any]) -> None:
    """CPU generations, networks and racks: host i gets generation i % 3, rack i % 4, the
    network prod on all hosts and dmz on every fourth; a VM needs the CPU features of a
    generation no newer than its current host's (drawn), and 10 % of VMs need dmz."""
    gen_of: dict[str, int] = {}
    for i, h in enumerate(doc["hosts"]):
        g = i % len(CPU_GENERATIONS)
        gen_of[h["name"]] = g
        model, feats = CPU_GENERATIONS[g]
        h["cpu_model"] = model
        h["cpu_features"] = list(feats)
        h["networks"] = ["prod"] + (["dmz"] if i % 4 == 0 else [])
        h["labels"] = {"rack": f"r{i % 4}"}
    for vm in doc["vms"]:
        g = int(rng.integers(gen_of[vm["host"]] + 1))
        if rng.random() < 0.5:
            vm["cpu_model"] = CPU_GENERATIONS[g][0]
        else:
            vm["cpu_features"] = list(CPU_GENERATIONS[g][1])
        vm["networks"] = ["prod"]
        if doc["hosts"][int(vm["host"].split("-")[1])]["networks"].count("dmz") and \
                rng.random() < 0.4:
            vm["networks"].append("dmz")


def _rules(rng: np.random.Generator, doc: dict[str, Any], n_hosts: int) -> list[dict[str, Any]]:
    vms = doc["vms"]
    by_host: dict[str, list[int]] = {}
    for j, vm in enumerate(vms):
        by_host.setdefault(vm["host"], []).append(j)
    used: set[int] = set()
    out: list[dict[str, Any]] = []
    n = len(vms)

    def pick_free() -> int:
        while True:
            j = int(rng.integers(n))
            if j not in used:
                used.add(j)
                return j

    for g in range(max(1, n // 33)):  # anti-affinity triples on distinct hosts
        members: list[int] = []
        hosts_seen: set[str] = set()
        while len(members) < 3:
            j = pick_free()
            if vms[j]["host"] in hosts_seen:
                used.discard(j)
                continue
            members.append(j)
            hosts_seen.add(vms[j]["host"])
        out.append({"name": f"spread-{g:03d}", "type": "anti_affinity",
                    "vms": [vms[j]["name"] for j in members]})
    for g in range(max(1, n // 50)):  # affinity pairs already together
        for _ in range(100):
            h = list(by_host)[int(rng.integers(len(by_host)))]
            free = [j for j in by_host[h] if j not in used]
            if len(free) >= 2:
                a, b = free[0], free[1]
                used.update((a, b))
                out.append({"name": f"pair-{g:03d}", "type": "affinity",
                            "vms": [vms[a]["name"], vms[b]["name"]]})
                break
    host_names = [f"host-{i:03d}" for i in range(n_hosts)]
    for g in range(max(1, n // 100)):  # VM-host rules: must (even g) and should (odd g)
        j = pick_free()
        k = pick_free()
        pool = set(rng.choice(host_names, size=min(n_hosts, max(2, n_hosts // 8)),
                              replace=False).tolist())
        pool.update({vms[j]["host"], vms[k]["host"]})
        out.append({"name": f"place-{g:03d}", "type": "vm_host",
                    "vms": [vms[j]["name"], vms[k]["name"]], "hosts": sorted(pool),
                    "mandatory": g % 2 == 0})
    for _ in range(max(1, n // 50)):  # a few manual VMs
        vms[pick_free()]["automation"] = "manual"
    return out


# The second generator's host types: (cores, GiB, share).
SKEWED_HOST_TYPES = ((32, 256, 0.3), (64, 768, 0.5), (96, 1024, 0.2))


def generate_skewed(n_hosts: int, n_vms: int, seed: int = 0, *, rules: bool = False,
                    zipf: float = 0.8) -> dict[str, Any]:
    """A second cluster family, so that tuning to ``generate`` does not pass the benchmarks.

    Differs from ``generate`` in every distribution: three host types (32 cores / 256 GiB,
    64 / 768, 96 / 1,024); VM sizes heavy-tailed (vCPUs a power of two with a geometric
    exponent up to 64, memory ``vcpus x`` a ratio of 1, 2, 4 or 8 GiB per vCPU, times a
    log-normal factor, rounded to whole GiB, 1 to 512 GiB); CPU demand a mixture (70 % of VMs
    nearly idle, ``Beta(0.8, 6)``, 30 % busy, ``Beta(3, 2)``) and memory demand
    ``Beta(5, 1.5)``. The start placement is skewed by host popularity rather than by VM
    profile: host popularity follows a Zipf law over a random host order (exponent ``zipf``),
    and each VM picks a host in proportion to it among hosts where it fits (memory up to 95 %
    of RAM, CPU demand up to 90 %). ``rules`` adds the same kinds of rules as ``generate``.
    """
    rng = np.random.default_rng(seed + 7_000_003)
    shares = np.array([s for _, _, s in SKEWED_HOST_TYPES])
    kinds = rng.choice(len(SKEWED_HOST_TYPES), size=n_hosts, p=shares / shares.sum())
    hosts = []
    for i in range(n_hosts):
        cores, gib, _ = SKEWED_HOST_TYPES[int(kinds[i])]
        hosts.append({"name": f"host-{i:03d}", "cpu_capacity": float(cores),
                      "mem_capacity_mb": gib * 1024, "state": "active"})
    cap_cpu = np.array([h["cpu_capacity"] for h in hosts])
    cap_mem = np.array([h["mem_capacity_mb"] for h in hosts], dtype=float)
    rank = rng.permutation(n_hosts) + 1
    pop = 1.0 / rank ** zipf
    vcpus_all = 2 ** np.minimum(rng.geometric(0.45, n_vms) - 1, 6)
    ratio = rng.choice([1, 2, 4, 8], size=n_vms, p=[0.15, 0.35, 0.35, 0.15])
    factor = np.exp(rng.normal(0.0, 0.35, n_vms))
    mem_gib = np.clip(np.rint(vcpus_all * ratio * factor), 1, 512).astype(int)
    busy = rng.random(n_vms) < 0.3
    cpu_util = np.where(busy, rng.beta(3.0, 2.0, n_vms), rng.beta(0.8, 6.0, n_vms))
    mem_util = rng.beta(5.0, 1.5, n_vms)
    used_cpu = np.zeros(n_hosts)
    used_mem = np.zeros(n_hosts)
    vms = []
    for j in range(n_vms):
        vcpus = int(vcpus_all[j])
        mem = int(mem_gib[j]) * 1024
        cpu_d = round(float(vcpus * cpu_util[j]), 3)
        mem_d = int(mem * mem_util[j])
        fits = (used_mem + mem <= 0.95 * cap_mem) & (used_cpu + cpu_d <= 0.9 * cap_cpu)
        if not fits.any():
            fits = used_mem + mem <= cap_mem
        if not fits.any():
            fits = np.ones(n_hosts, dtype=bool)
        p = np.where(fits, pop, 0.0)
        h = int(rng.choice(n_hosts, p=p / p.sum()))
        used_cpu[h] += cpu_d
        used_mem[h] += mem
        vms.append({"name": f"vm-{j:05d}", "host": hosts[h]["name"], "vcpus": vcpus,
                    "mem_mb": mem, "cpu_demand": cpu_d, "mem_demand_mb": mem_d,
                    "automation": "fully"})
    doc: dict[str, Any] = {"version": 1, "hosts": hosts, "vms": vms, "rules": []}
    if rules:
        doc["rules"] = _rules(rng, doc, n_hosts)
    return doc
