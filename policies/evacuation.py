"""Evacuation: hosts in maintenance or standby receive nothing and are emptied.

Description
    Every VM on a host that is not ``active`` must move (a mandatory move, made even at
    threshold 1), and such hosts receive no VM and do not count towards balance. A VM with
    ``automation: manual`` is never moved; it holds its host out of maintenance, which the plan
    reports as blocked work, as DRS does when a manual VM stops a host entering maintenance.
Requirements
    Host ``state`` in the snapshot.
Limitations
    Evacuation order and concurrency are the planner's job, not this policy's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from balancer.model import Automation
from policies.base import Draft, register


@dataclass(frozen=True)
class EvacuationArgs:
    pass


@register
class Evacuation:
    name: ClassVar[str] = "evacuation"
    Args = EvacuationArgs

    def __init__(self, args: EvacuationArgs | None = None) -> None:
        self.args = args or EvacuationArgs()

    def apply(self, draft: Draft) -> None:
        snap = draft.snapshot
        for v, vm in enumerate(snap.vms):
            host = snap.hosts[snap.host_index[vm.host]]
            if host.active:
                continue
            if vm.automation is Automation.MANUAL:
                draft.notes.append(
                    f"host {host.name} ({host.state.value}) cannot be emptied: VM {vm.name} is "
                    "manual and is never moved"
                )
            elif vm.local_storage:
                draft.notes.append(
                    f"host {host.name} ({host.state.value}) cannot be emptied: VM {vm.name} has "
                    "local storage and cannot be live-migrated"
                )
            else:
                draft.mandatory_reason[v] = f"evacuates {host.name} ({host.state.value})"
