"""What every policy shares: the draft a policy writes into, and the policy registry.

A policy is one module with a typed ``Args`` dataclass (defaults on the fields, cross-field
checks in ``__post_init__``) and a class that contributes to a ``Draft``: which hosts a VM may
use, which VMs stay put, groups of VMs kept apart or together, capacity limits, objective
weights and budgets. The draft is then frozen into a ``Problem`` (``balancer.model.problem``)
that the solvers and the verifier read. Policies import ``balancer.model`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from balancer.errors import InfeasibleError, InputError
from balancer.model import ClusterSnapshot
from balancer.model.problem import WEIGHT_ONE, Group, Preference, Problem, Unit


@dataclass
class Draft:
    """A problem under construction; policies write into it in registry order."""

    snapshot: ClusterSnapshot
    # per VM: allowed hosts (None = every receiving host)
    allowed: list[set[int] | None] = field(default_factory=list)
    pinned: set[int] = field(default_factory=set)  # VMs that never move
    receiving: set[int] = field(default_factory=set)
    balanced: set[int] = field(default_factory=set)
    cpu_limit: list[int] = field(default_factory=list)
    mem_limit: list[int] = field(default_factory=list)
    apart: list[tuple[str, list[int], int | None]] = field(default_factory=list)  # over VMs
    together: list[tuple[str, list[int], int | None]] = field(default_factory=list)
    prefer: list[tuple[str, list[int], set[int], int]] = field(default_factory=list)
    balance_weights: tuple[int, int] = (WEIGHT_ONE, WEIGHT_ONE)
    move_cost: list[int] = field(default_factory=list)
    max_migrations: int | None = None
    max_moved_mem: int | None = None
    mandatory_reason: dict[int, str] = field(default_factory=dict)  # VM -> why it must move
    eligibility: dict[int, list[str]] = field(default_factory=dict)  # VM -> why fewer hosts
    only_mandatory: bool = False
    notes: list[str] = field(default_factory=list)

    @classmethod
    def new(cls, snapshot: ClusterSnapshot) -> Draft:
        n_v = len(snapshot.vms)
        active = {i for i, h in enumerate(snapshot.hosts) if h.active}
        return cls(
            snapshot=snapshot,
            allowed=[None] * n_v,
            receiving=set(active),
            balanced=set(active),
            cpu_limit=[h.cpu_capacity for h in snapshot.hosts],
            mem_limit=[h.mem_capacity for h in snapshot.hosts],
            move_cost=[0] * n_v,
        )

    def restrict(self, vm: int, hosts: set[int]) -> None:
        cur = self.allowed[vm]
        self.allowed[vm] = set(hosts) if cur is None else cur & hosts

    def freeze(self) -> Problem:
        snap = self.snapshot
        start = snap.placement()
        n_v = len(snap.vms)
        # Units: mandatory "together" groups merged with union-find.
        parent = list(range(n_v))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        unit_rule: dict[int, str] = {}
        for _rule, vms, weight in self.together:
            if weight is None:
                for v in vms[1:]:
                    parent[find(v)] = find(vms[0])
        for rule, vms, weight in self.together:
            if weight is None:
                unit_rule.setdefault(find(vms[0]), rule)
        roots: dict[int, list[int]] = {}
        for v in range(n_v):
            roots.setdefault(find(v), []).append(v)
        units: list[Unit] = []
        unit_of = [0] * n_v
        mandatory_reason: dict[int, str] = {}
        receiving = frozenset(self.receiving)
        shared: dict[frozenset[int], tuple[int, ...]] = {}  # one tuple per distinct host set
        for root in sorted(roots, key=lambda r: roots[r][0]):
            members = tuple(roots[root])
            pinned_members = [v for v in members if v in self.pinned]
            limits = [self.allowed[v] for v in members if self.allowed[v] is not None]
            # most units may go to every receiving host: that set is shared, not copied
            cands: frozenset[int] | set[int] = receiving
            if limits:
                cands = set(receiving)
                for allowed in limits:
                    cands &= allowed  # type: ignore[operator]
            if pinned_members:
                fixed = {start[v] for v in pinned_members}
                if len(fixed) > 1:
                    names = ", ".join(snap.vms[v].name for v in pinned_members)
                    raise InfeasibleError(
                        f"rule {unit_rule.get(root)}: VMs {names} must share a host but are "
                        "manual (never moved) and on different hosts",
                        culprits=[unit_rule.get(root, "?")],
                    )
                cands = fixed  # a pinned member holds the whole unit where it is
            starts = {start[v] for v in members}
            reasons = [self.mandatory_reason[v] for v in members if v in self.mandatory_reason]
            if len(starts) > 1:
                reasons.append(f"fixes rule {unit_rule.get(root)} (affinity)")
            if not cands:
                names = ", ".join(snap.vms[v].name for v in members)
                why = sorted({w for v in members for w in self.eligibility.get(v, [])})
                rules = sorted({r.name for r in snap.rules if r.mandatory
                                and set(r.vms) & {snap.vms[v].name for v in members}})
                detail = "; ".join(why) if why else "the hosts their rules allow are not active"
                raise InfeasibleError(
                    f"no host may hold VM(s) {names}: {detail}"
                    + (f" (rules: {', '.join(rules)})" if rules else ""),
                    culprits=[f"VM {snap.vms[v].name}" for v in members] + rules,
                )
            pinned = bool(pinned_members)
            u = len(units)
            key = cands if isinstance(cands, frozenset) else frozenset(cands)
            if key not in shared:
                shared[key] = tuple(sorted(key))
            units.append(Unit(members=members, candidates=shared[key], pinned=pinned,
                              rule=unit_rule.get(root)))
            if reasons:
                mandatory_reason[u] = "; ".join(dict.fromkeys(reasons))
            for v in members:
                unit_of[v] = u

        def to_units(vms: list[int]) -> tuple[int, ...]:
            return tuple(sorted({unit_of[v] for v in vms}))

        apart = [Group(rule, to_units(vms), w) for rule, vms, w in self.apart]
        together = [Group(rule, to_units(vms), w) for rule, vms, w in self.together
                    if w is not None]
        prefer = [Preference(rule, to_units(vms), frozenset(hosts), w)
                  for rule, vms, hosts, w in self.prefer]
        return Problem(
            snapshot=snap,
            start=start,
            units=units,
            unit_of=unit_of,
            receiving=receiving,
            balanced=tuple(sorted(self.balanced)),
            cpu_limit=list(self.cpu_limit),
            mem_limit=list(self.mem_limit),
            apart=apart,
            together=together,
            prefer=prefer,
            balance_weights=self.balance_weights,
            move_cost=list(self.move_cost),
            max_migrations=self.max_migrations,
            max_moved_mem=self.max_moved_mem,
            mandatory_reason=mandatory_reason,
            notes=list(self.notes),
            only_mandatory=self.only_mandatory,
            eligibility={v: list(w) for v, w in self.eligibility.items()},
        )


class Policy(Protocol):
    name: ClassVar[str]

    def apply(self, draft: Draft) -> None: ...


_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add a policy to the registry; a duplicate name is a programming error."""
    name = cls.name  # type: ignore[attr-defined]
    if name in _REGISTRY:
        raise ValueError(f"policy {name!r} is registered twice")
    _REGISTRY[name] = cls
    return cls


def lookup(name: str) -> type:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise InputError(f"policy {name!r} is unknown (known: {known})") from None


def registered() -> list[str]:
    return sorted(_REGISTRY)


def make(name: str, args: dict[str, Any] | None = None) -> Policy:
    """Build a policy from its name and a dict of arguments, with field-named errors."""
    cls = lookup(name)
    args_cls = cls.Args  # type: ignore[attr-defined]
    fields = set(args_cls.__dataclass_fields__)
    for key in args or {}:
        if key not in fields:
            raise InputError(f"policy {name}: field {key!r} is unknown "
                             f"(known: {', '.join(sorted(fields))})")
    try:
        return cls(args_cls(**(args or {})))
    except TypeError as exc:
        raise InputError(f"policy {name}: {exc}") from None
