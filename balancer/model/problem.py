"""The placement problem as plain data: what policies produce and what solvers consume.

A ``Problem`` is built from a snapshot by the enabled policies (``policies/``). It holds no
solver objects, so the CP-SAT engine, the greedy baseline and the verifier read the same terms.

Units
    Decisions are made per *unit*: a set of VMs that must share a host (a mandatory affinity
    group, or a single VM). Placing unit ``u`` on host ``h`` moves every member whose start host
    is not ``h``.

Objective (minimised; see docs/engine.md)
    ``sum_d w_d * sum_h sq(u_{h,d} - mean_d) * SCALE``   over active hosts, d in {cpu, mem}
    ``+ sum_moved move_cost[vm]``                                   the migration-cost term
    ``+ sum_soft_rules weight * violations``                        should-rules
"""

from __future__ import annotations

from dataclasses import dataclass, field

from balancer.model import ClusterSnapshot, Placement

# Squared utilisation deviations are counted in units of 1e-10 (utilisation 1.0 = 1e5).
SCALE = 10**10
# Balance weights are integers; WEIGHT_ONE stands for 1.0.
WEIGHT_ONE = 16


@dataclass(frozen=True, slots=True)
class Unit:
    """VMs that always share a host (a mandatory affinity group or a single VM)."""

    members: tuple[int, ...]  # VM indices
    candidates: tuple[int, ...]  # hosts the unit may end on (sorted)
    pinned: bool  # true when the unit may not move for any reason but a mandatory one
    rule: str | None = None  # the affinity rule that formed the unit, if any


@dataclass(frozen=True, slots=True)
class Group:
    """A rule over units: ``apart`` (at most one unit per host) or ``together`` (one host)."""

    rule: str
    units: tuple[int, ...]
    weight: int | None  # None: mandatory; otherwise the penalty per violation


@dataclass(frozen=True, slots=True)
class Preference:
    """A should-rule: ``units`` ought to run on ``hosts``; ``weight`` per unit elsewhere."""

    rule: str
    units: tuple[int, ...]
    hosts: frozenset[int]
    weight: int


@dataclass
class Problem:
    snapshot: ClusterSnapshot
    start: Placement  # VM -> host, as the cluster is now
    units: list[Unit]
    unit_of: list[int]  # VM -> unit
    receiving: frozenset[int]  # hosts that may receive VMs (active)
    balanced: tuple[int, ...]  # hosts whose utilisation counts in the balance term
    cpu_limit: list[int]  # per host: max CPU demand (millicores) once it receives a VM
    mem_limit: list[int]  # per host: max configured memory (MiB) once it receives a VM
    apart: list[Group] = field(default_factory=list)
    together: list[Group] = field(default_factory=list)
    prefer: list[Preference] = field(default_factory=list)
    # (cpu, mem) weights of the balance term, in units of 1/WEIGHT_ONE; (0, 0): no balancing
    balance_weights: tuple[int, int] = (16, 16)
    move_cost: list[int] = field(default_factory=list)  # per VM, objective units when moved
    max_migrations: int | None = None
    max_moved_mem: int | None = None  # MiB
    # Why a unit may have to move even at the lowest threshold (evacuation, rule fix).
    mandatory_reason: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # things the user should know (blocked work)
    # threshold 1: only mandatory moves, plus whatever moves they need to make room
    only_mandatory: bool = False
    # VM -> why it has fewer candidate hosts (compatibility), one phrase per requirement
    eligibility: dict[int, list[str]] = field(default_factory=dict)

    @property
    def n_hosts(self) -> int:
        return len(self.snapshot.hosts)

    def unit_start_hosts(self, u: int) -> set[int]:
        return {self.start[v] for v in self.units[u].members}


def unit_placement(problem: Problem, placement: Placement) -> list[int]:
    """Host of each unit under a VM placement (members of a unit share a host there)."""
    return [placement[unit.members[0]] for unit in problem.units]


def vm_placement(problem: Problem, unit_hosts: list[int]) -> Placement:
    out = list(problem.start)
    for u, unit in enumerate(problem.units):
        for v in unit.members:
            out[v] = unit_hosts[u]
    return tuple(out)
