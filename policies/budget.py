"""Budget: at most K migrations and at most G GiB of VM memory moved per plan.

Description
    Caps the plan's size the way operators cap a maintenance window: by count
    (``max_migrations``) and by the configured memory of the VMs moved (``max_moved_mem_gb``),
    since a live migration's cost grows with the VM's memory. Mandatory moves count too; if
    they alone exceed the budget the problem is infeasible and says so.
Requirements
    None beyond the snapshot.
Limitations
    A budget bounds one plan, not a rate over time (the daemon's cool-down does that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from balancer.errors import InputError
from policies.base import Draft, register


@dataclass(frozen=True)
class BudgetArgs:
    max_migrations: int | None = None
    max_moved_mem_gb: float | None = None

    def __post_init__(self) -> None:
        k = self.max_migrations
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise InputError(f"max_migrations: must be a whole number >= 0, got {k!r}")
        g = self.max_moved_mem_gb
        if g is not None and (isinstance(g, bool) or not isinstance(g, int | float)
                              or not math.isfinite(g) or g < 0):
            raise InputError(f"max_moved_mem_gb: must be a number >= 0, got {g!r}")

    @property
    def max_moved_mem_mb(self) -> int | None:
        """The memory budget in MiB: the one place GiB become MiB (policy and verifier)."""
        g = self.max_moved_mem_gb
        return None if g is None else math.floor(g * 1024)


@register
class Budget:
    name: ClassVar[str] = "budget"
    Args = BudgetArgs

    def __init__(self, args: BudgetArgs | None = None) -> None:
        self.args = args or BudgetArgs()

    def apply(self, draft: Draft) -> None:
        draft.max_migrations = self.args.max_migrations
        draft.max_moved_mem = self.args.max_moved_mem_mb
