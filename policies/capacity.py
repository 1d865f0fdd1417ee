"""Capacity: what a host may hold once it receives a VM.

Description
    Configured memory of the VMs on a host fits ``mem_overcommit`` x its memory (no memory
    overcommit by default), and their CPU demand stays within ``1 - cpu_headroom`` of its cores.
    Like DRS, the limits bind a host only when a VM moves onto it: a host that is already over a
    limit and receives nothing may stay as it is, so an overcommitted start never makes the
    problem infeasible (the balance term drives such hosts down).
Requirements
    Snapshot capacities (cores, MiB) and VM configured memory and CPU demand.
Limitations
    CPU demand is the smoothed demand handed in; short peaks above it are the headroom's job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from balancer.errors import InputError
from policies.base import Draft, register


@dataclass(frozen=True)
class CapacityArgs:
    mem_overcommit: float = 1.0
    cpu_headroom: float = 0.1

    def __post_init__(self) -> None:
        if not math.isfinite(self.mem_overcommit) or not 0.1 <= self.mem_overcommit <= 10:
            raise InputError(
                f"mem_overcommit: must be between 0.1 and 10, got {self.mem_overcommit}")
        if not math.isfinite(self.cpu_headroom) or not 0 <= self.cpu_headroom < 1:
            raise InputError(f"cpu_headroom: must be in [0, 1), got {self.cpu_headroom}")


@register
class Capacity:
    name: ClassVar[str] = "capacity"
    Args = CapacityArgs

    def __init__(self, args: CapacityArgs | None = None) -> None:
        self.args = args or CapacityArgs()

    def apply(self, draft: Draft) -> None:
        for i, h in enumerate(draft.snapshot.hosts):
            draft.mem_limit[i] = math.floor(h.mem_capacity * self.args.mem_overcommit)
            draft.cpu_limit[i] = math.floor(h.cpu_capacity * (1.0 - self.args.cpu_headroom))
