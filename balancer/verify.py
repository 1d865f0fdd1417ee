"""The solver-free verifier: does a placement keep every hard promise?

Reads the snapshot itself (not the engine's ``Problem``), so a mistake in the policies or the
model cannot hide from it. Checks: every VM on exactly one known host; manual VMs unmoved;
nothing placed on a host that is not active; capacity on every host that receives a VM
(configured memory within ``mem_overcommit`` x capacity, CPU demand within ``1 - cpu_headroom``);
mandatory affinity, anti-affinity and VM-host rules; evacuation of maintenance and standby
hosts (manual and local-storage VMs excepted); compatibility of every destination (CPU model
or features, networks, datastores); the migration budgets.
"""

from __future__ import annotations

from dataclasses import dataclass

from balancer.model import Automation, ClusterSnapshot, Placement, RuleType


@dataclass(frozen=True)
class Limits:
    mem_overcommit: float = 1.0
    cpu_headroom: float = 0.1
    max_migrations: int | None = None
    max_moved_mem_mb: int | None = None


def verify(snapshot: ClusterSnapshot, placement: Placement, limits: Limits | None = None,
           ) -> list[str]:
    """Every broken promise, one line each; an empty list means the placement is valid."""
    lim = limits or Limits()
    errors: list[str] = []
    hosts, vms = snapshot.hosts, snapshot.vms
    if len(placement) != len(vms):
        return [f"placement has {len(placement)} entries for {len(vms)} VMs"]
    for v, h in enumerate(placement):
        if not 0 <= h < len(hosts):
            errors.append(f"VM {vms[v].name}: host index {h} does not exist")
    if errors:
        return errors
    start = snapshot.placement()
    moved = [v for v in range(len(vms)) if placement[v] != start[v]]
    received: set[int] = set()
    for v in moved:
        vm = vms[v]
        dest = hosts[placement[v]]
        received.add(placement[v])
        if vm.automation is Automation.MANUAL:
            errors.append(f"VM {vm.name}: manual VM moved to {dest.name}")
        if vm.local_storage:
            errors.append(f"VM {vm.name}: has local storage but was moved to {dest.name}")
        unmet = snapshot.unmet_requirements(vm, dest)
        if unmet:
            errors.append(f"VM {vm.name}: moved to {dest.name}, which lacks {', '.join(unmet)}")
        if not dest.active:
            errors.append(f"VM {vm.name}: placed on {dest.name}, which is {dest.state.value}")
    for v, vm in enumerate(vms):
        h = hosts[placement[v]]
        if not h.active and vm.automation is not Automation.MANUAL and not vm.local_storage:
            errors.append(f"VM {vm.name}: left on {h.name}, which is {h.state.value}")
    cpu = [0] * len(hosts)
    mem = [0] * len(hosts)
    for v, vm in enumerate(vms):
        cpu[placement[v]] += vm.cpu_demand
        mem[placement[v]] += vm.mem
    for h in sorted(received):
        host = hosts[h]
        if mem[h] > host.mem_capacity * lim.mem_overcommit:
            errors.append(f"host {host.name}: receives VMs but holds {mem[h]} MiB configured "
                          f"memory, above {host.mem_capacity * lim.mem_overcommit:.0f} MiB")
        if cpu[h] > host.cpu_capacity * (1.0 - lim.cpu_headroom):
            errors.append(f"host {host.name}: receives VMs but CPU demand {cpu[h] / 1000:g} cores "
                          f"is above {host.cpu_capacity * (1 - lim.cpu_headroom) / 1000:g}")
    for rule in snapshot.rules:
        if not rule.mandatory:
            continue
        idx = [snapshot.vm_index[n] for n in rule.vms]
        on = [placement[i] for i in idx]
        if rule.type is RuleType.AFFINITY and len(set(on)) > 1:
            errors.append(f"rule {rule.name}: affinity VMs on {len(set(on))} hosts")
        elif rule.type is RuleType.ANTI_AFFINITY and len(set(on)) < len(on):
            errors.append(f"rule {rule.name}: anti-affinity VMs share a host")
        elif rule.type is RuleType.VM_HOST:
            allowed = {snapshot.host_index[h] for h in rule.hosts}
            for i, h in zip(idx, on, strict=True):
                if h not in allowed and vms[i].automation is not Automation.MANUAL:
                    errors.append(f"rule {rule.name}: VM {vms[i].name} on {hosts[h].name}, "
                                  "outside the rule's hosts")
    if lim.max_migrations is not None and len(moved) > lim.max_migrations:
        errors.append(f"budget: {len(moved)} migrations, above max_migrations "
                      f"{lim.max_migrations}")
    moved_mem = sum(vms[v].mem for v in moved)
    if lim.max_moved_mem_mb is not None and moved_mem > lim.max_moved_mem_mb:
        errors.append(f"budget: {moved_mem} MiB moved, above {lim.max_moved_mem_mb} MiB")
    return errors


def broken_rules(snapshot: ClusterSnapshot, placement: Placement | None = None
                 ) -> dict[str, tuple[str, ...]]:
    """The mandatory rules ``placement`` (default: the snapshot's own) breaks: name -> VMs.

    The same checks as ``verify``'s rule section, as data (the service exempts the VMs of a
    broken rule from anti-flapping: fixing a rule is never delayed).
    """
    pl = snapshot.placement() if placement is None else placement
    out: dict[str, tuple[str, ...]] = {}
    for rule in snapshot.rules:
        if not rule.mandatory:
            continue
        on = [pl[snapshot.vm_index[n]] for n in rule.vms]
        if rule.type is RuleType.AFFINITY:
            bad = len(set(on)) > 1
        elif rule.type is RuleType.ANTI_AFFINITY:
            bad = len(set(on)) < len(on)
        elif rule.type is RuleType.VM_HOST:
            allowed = {snapshot.host_index[h] for h in rule.hosts}
            bad = any(h not in allowed for h in on)
        else:
            bad = False
        if bad:
            out[rule.name] = tuple(rule.vms)
    return out
