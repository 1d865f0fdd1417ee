"""Compatibility: a VM only ever goes to a host that can run it.

Description
    Before vMotion moves a VM, vCenter checks that the destination's CPU offers the features the
    VM uses (or the cluster's EVC baseline), and that the destination reaches the VM's networks and
    datastores. Here those checks are eligibility: each VM's allowed hosts are narrowed to the
    active hosts that have its CPU model (or the model's features) and features, all its networks
    and all its datastores, so they add no variables to the model. A VM whose disks are local
    (``local_storage: true``) is not movable by live migration at all. The host a VM runs on now
    stays allowed even if the snapshot says it lacks something (the VM evidently runs there; the
    plan notes it).
Requirements
    The optional compatibility fields of snapshot v1 (docs/snapshot-format.md).
Limitations
    CPU compatibility is by feature sets and model names as the snapshot gives them; the executor
    asks the real backend again right before a migration starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from balancer.model import VM, ClusterSnapshot
from policies.base import Draft, register


@dataclass(frozen=True)
class CompatibilityArgs:
    pass


def _signature(vm: VM) -> tuple:
    return (vm.cpu_model, vm.cpu_features, vm.networks, vm.datastores)


def eligibility(snapshot: ClusterSnapshot) -> dict[int, tuple[set[int], list[str]]]:
    """Per VM whose requirements rule out some active hosts: (compatible active hosts, why).

    ``why`` has one phrase per unmet requirement, e.g. "needs network prod-vlan42: present on 3
    of 64 active hosts". VMs that may go to every active host are left out.
    """
    active = snapshot.active_hosts()
    n_active = len(active)
    cache: dict[tuple, tuple[set[int], list[str]]] = {}
    out: dict[int, tuple[set[int], list[str]]] = {}
    for v, vm in enumerate(snapshot.vms):
        sig = _signature(vm)
        if sig not in cache:
            ok: set[int] = set()
            lacking: dict[str, int] = {}
            for h in active:
                unmet = snapshot.unmet_requirements(vm, snapshot.hosts[h])
                if not unmet:
                    ok.add(h)
                for need in unmet:
                    lacking[need] = lacking.get(need, 0) + 1
            why = [f"needs {need}: present on {n_active - n} of {n_active} active hosts"
                   for need, n in sorted(lacking.items())]
            cache[sig] = (ok, why)
        ok, why = cache[sig]
        if len(ok) < n_active:
            out[v] = (ok, list(why))
    return out


@register
class Compatibility:
    name: ClassVar[str] = "compatibility"
    Args = CompatibilityArgs

    def __init__(self, args: CompatibilityArgs | None = None) -> None:
        self.args = args or CompatibilityArgs()

    def apply(self, draft: Draft) -> None:
        snap = draft.snapshot
        start = snap.placement()
        for v, vm in enumerate(snap.vms):
            if vm.local_storage:
                draft.pinned.add(v)
        for v, (ok, why) in eligibility(snap).items():
            vm = snap.vms[v]
            if vm.local_storage:
                continue
            here = start[v]
            draft.restrict(v, ok | ({here} if snap.hosts[here].active else set()))
            draft.eligibility[v] = why
            if snap.hosts[here].active and here not in ok:
                draft.notes.append(
                    f"VM {vm.name} runs on {snap.hosts[here].name}, which lacks "
                    f"{', '.join(snap.unmet_requirements(vm, snap.hosts[here]))}; left as is")
