"""Core types of the balancer, standard library only.

Everything the engine reasons about is an integer: CPU in millicores, memory in MiB. Hosts, VMs
and rules are kept in name order so that every run over the same input is deterministic.

Hosts and VMs are addressed by their index in ``ClusterSnapshot.hosts`` / ``.vms`` inside the
engine; names appear only at the edges (file formats, CLI, API).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum


class HostState(str, Enum):
    ACTIVE = "active"
    MAINTENANCE = "maintenance"
    STANDBY = "standby"


class Automation(str, Enum):
    FULLY = "fully"
    MANUAL = "manual"


class RuleType(str, Enum):
    AFFINITY = "affinity"
    ANTI_AFFINITY = "anti_affinity"
    VM_HOST = "vm_host"


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    cpu_capacity: int  # millicores
    mem_capacity: int  # MiB
    state: HostState = HostState.ACTIVE
    cpu_model: str | None = None
    cpu_features: frozenset[str] = frozenset()
    networks: frozenset[str] = frozenset()
    datastores: frozenset[str] = frozenset()
    labels: tuple[tuple[str, str], ...] = ()  # sorted (key, value) pairs

    @property
    def active(self) -> bool:
        return self.state is HostState.ACTIVE


@dataclass(frozen=True, slots=True)
class VM:
    name: str
    host: str
    vcpus: int
    mem: int  # configured memory, MiB
    cpu_demand: int  # millicores in use
    mem_demand: int  # MiB in use
    automation: Automation = Automation.FULLY
    cpu_model: str | None = None  # a baseline: runs on hosts of this model or with its features
    cpu_features: frozenset[str] = frozenset()  # CPU features it needs
    networks: frozenset[str] = frozenset()
    datastores: frozenset[str] = frozenset()
    local_storage: bool = False  # disks on its host: not movable by live migration

    @property
    def movable(self) -> bool:
        return self.automation is Automation.FULLY and not self.local_storage


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    type: RuleType
    vms: tuple[str, ...]
    hosts: tuple[str, ...] = ()  # named hosts and hosts selected by ``host_labels``, resolved
    mandatory: bool = True
    host_labels: tuple[tuple[str, str], ...] = ()  # the label selector as given


@dataclass(frozen=True)
class ClusterSnapshot:
    """The cluster as it is: hosts, VMs (each on a host) and placement rules."""

    hosts: tuple[Host, ...]
    vms: tuple[VM, ...]
    rules: tuple[Rule, ...] = ()
    cpu_baseline: frozenset[str] | None = None  # EVC-like feature set every VM is presented
    host_index: dict[str, int] = field(init=False, repr=False, compare=False)
    vm_index: dict[str, int] = field(init=False, repr=False, compare=False)
    model_features: dict[str, frozenset[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "host_index", {h.name: i for i, h in enumerate(self.hosts)})
        object.__setattr__(self, "vm_index", {v.name: i for i, v in enumerate(self.vms)})
        # A CPU model's features: those every host of that model declares.
        feats: dict[str, frozenset[str]] = {}
        for h in self.hosts:
            if h.cpu_model is not None:
                prev = feats.get(h.cpu_model)
                feats[h.cpu_model] = h.cpu_features if prev is None else prev & h.cpu_features
        object.__setattr__(self, "model_features", feats)

    def affinity_groups(self) -> dict[str, tuple[str, ...]]:
        """VM name -> the VMs its mandatory affinity rules bind it to (itself included, sorted).

        Affinity is transitive: a-b and b-c put a, b and c on one host.
        """
        parent = {v.name: v.name for v in self.vms}

        def find(x: str) -> str:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for rule in self.rules:
            if rule.type is RuleType.AFFINITY and rule.mandatory:
                for v in rule.vms[1:]:
                    parent[find(v)] = find(rule.vms[0])
        members: dict[str, list[str]] = {}
        for v in parent:
            members.setdefault(find(v), []).append(v)
        groups = {root: tuple(sorted(m)) for root, m in members.items()}
        return {v: groups[find(v)] for v in parent}

    def unmet_requirements(self, vm: VM, host: Host) -> list[str]:
        """What ``host`` lacks to run ``vm`` (empty: compatible). One short phrase each."""
        out = []
        if self.cpu_baseline is None:
            if vm.cpu_model is not None and vm.cpu_model != host.cpu_model:
                need = self.model_features.get(vm.cpu_model, frozenset())
                if not need or not need <= host.cpu_features:
                    out.append(f"cpu model {vm.cpu_model}")
            for f in sorted(vm.cpu_features - host.cpu_features):
                out.append(f"cpu feature {f}")
        for n in sorted(vm.networks - host.networks):
            out.append(f"network {n}")
        for d in sorted(vm.datastores - host.datastores):
            out.append(f"datastore {d}")
        return out

    def placement(self) -> Placement:
        """The current placement: VM index -> host index."""
        return tuple(self.host_index[v.host] for v in self.vms)

    def active_hosts(self) -> list[int]:
        return [i for i, h in enumerate(self.hosts) if h.active]

    # -- edits: each returns a new snapshot (the snapshot itself never changes) -------------
    def with_host_state(self, host: str, state: HostState) -> ClusterSnapshot:
        i = self.host_index[host]
        hosts = list(self.hosts)
        hosts[i] = replace(hosts[i], state=state)
        return replace(self, hosts=tuple(hosts))

    def with_vm_on(self, vm: str, host: str) -> ClusterSnapshot:
        """``vm`` now runs on ``host`` (a known host)."""
        if host not in self.host_index:
            raise KeyError(f"unknown host {host!r}")
        i = self.vm_index[vm]
        vms = list(self.vms)
        vms[i] = replace(vms[i], host=host)
        return replace(self, vms=tuple(vms))

    def with_vm(self, vm: VM) -> ClusterSnapshot:
        """``vm`` added (kept in name order)."""
        if vm.name in self.vm_index:
            raise KeyError(f"VM {vm.name!r} already exists")
        if vm.host not in self.host_index:
            raise KeyError(f"unknown host {vm.host!r}")
        return replace(self, vms=tuple(sorted((*self.vms, vm), key=lambda v: v.name)))

    def with_vms(self, vms: tuple[VM, ...]) -> ClusterSnapshot:
        """The VMs replaced by ``vms``; rules naming a VM that is gone are dropped."""
        names = {v.name for v in vms}
        rules = tuple(r for r in self.rules if all(n in names for n in r.vms))
        return replace(self, vms=tuple(sorted(vms, key=lambda v: v.name)), rules=rules)

    def mem_shortfall(self, mem_overcommit: float = 1.0) -> float:
        """MiB of configured VM memory the active hosts cannot hold together (0: they can)."""
        active = sum(h.mem_capacity for h in self.hosts if h.active) * mem_overcommit
        return max(0.0, sum(v.mem for v in self.vms) - active)


# VM index -> host index, in VM order.
Placement = tuple[int, ...]


class MoveKind(str, Enum):
    """Why a move is in a plan, set where its reason is written (``explain_moves``); the last
    two are not moves but host power actions (``vm`` empty, ``source`` = ``target`` = the
    host), recommended beside the moves by the daemon's power management."""

    BALANCE = "balance"  # lowers the imbalance; may be delayed by anti-flapping
    EVACUATION = "evacuation"  # leaves a host in maintenance
    MANDATORY = "mandatory"  # fixes a rule, or makes room for a mandatory move
    POWER = "power"  # empties a host the power plan puts in standby
    STANDBY = "standby"  # host action: power the (empty) host down
    WAKE = "wake"  # host action: power a host in standby up

    @property
    def host_action(self) -> bool:
        return self in (MoveKind.STANDBY, MoveKind.WAKE)


@dataclass(frozen=True, slots=True)
class Move:
    vm: str
    source: str
    target: str
    reason: str
    mem: int  # MiB moved (configured memory of the VM)
    kind: MoveKind = MoveKind.BALANCE


@dataclass(frozen=True, slots=True)
class UtilStats:
    """Spread of host utilisation (demand / capacity) over the active hosts."""

    cpu_std: float
    mem_std: float
    cpu_max: float
    mem_max: float

    @property
    def imbalance(self) -> float:
        return self.cpu_std + self.mem_std

    def as_dict(self) -> dict[str, float]:
        return {
            "cpu_std": round(self.cpu_std, 6),
            "mem_std": round(self.mem_std, 6),
            "cpu_max": round(self.cpu_max, 6),
            "mem_max": round(self.mem_max, 6),
            "imbalance": round(self.imbalance, 6),
        }


def host_loads(snapshot: ClusterSnapshot, placement: Placement) -> tuple[list[int], list[int]]:
    """CPU demand (millicores) and memory demand (MiB) per host under ``placement``."""
    cpu = [0] * len(snapshot.hosts)
    mem = [0] * len(snapshot.hosts)
    for vm, h in zip(snapshot.vms, placement, strict=True):
        cpu[h] += vm.cpu_demand
        mem[h] += vm.mem_demand
    return cpu, mem


def _pstd(values: list[float]) -> float:
    if not values:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((x - mean) ** 2 for x in values) / len(values))


def util_stats(snapshot: ClusterSnapshot, placement: Placement) -> UtilStats:
    """Population standard deviation and maximum of CPU and memory demand utilisation.

    Computed over active hosts only; hosts in maintenance or standby are being emptied and do
    not count towards balance (their load shows up in the active hosts once evacuated).
    """
    cpu, mem = host_loads(snapshot, placement)
    active = snapshot.active_hosts()
    cu = [cpu[h] / snapshot.hosts[h].cpu_capacity for h in active]
    mu = [mem[h] / snapshot.hosts[h].mem_capacity for h in active]
    return UtilStats(
        cpu_std=_pstd(cu),
        mem_std=_pstd(mu),
        cpu_max=max(cu, default=0.0),
        mem_max=max(mu, default=0.0),
    )


__all__ = [
    "Automation",
    "ClusterSnapshot",
    "Host",
    "HostState",
    "Move",
    "MoveKind",
    "Placement",
    "Rule",
    "RuleType",
    "UtilStats",
    "VM",
    "host_loads",
    "util_stats",
]
