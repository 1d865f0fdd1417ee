"""Placement rules: VM-VM affinity and anti-affinity, VM-host rules, per-VM automation.

Description
    Mandatory rules are hard constraints; should-rules (``mandatory: false``) are soft terms
    whose penalty (``soft_weight`` per violation) outweighs any balance gain, so they hold
    whenever they can, as DRS treats "should" rules. ``automation: manual`` VMs never move.
    A mandatory rule the cluster breaks now makes its VMs candidates for a mandatory move (a
    rule fix, made even at threshold 1).
Requirements
    Snapshot rules, validated by ``balancer.snapshot`` (no contradictions between mandatory rules).
Limitations
    VM-host rules are "run on one of these hosts"; "must not run on" is expressed by listing the
    other hosts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from balancer.errors import InputError
from balancer.model import Automation, RuleType
from policies.base import Draft, register


@dataclass(frozen=True)
class RulesArgs:
    soft_weight: int = 10**13  # objective units per should-rule violation (above any move cost)

    def __post_init__(self) -> None:
        if self.soft_weight < 0:
            raise InputError(f"soft_weight: must be >= 0, got {self.soft_weight}")


@register
class Rules:
    name: ClassVar[str] = "rules"
    Args = RulesArgs

    def __init__(self, args: RulesArgs | None = None) -> None:
        self.args = args or RulesArgs()

    def apply(self, draft: Draft) -> None:
        snap = draft.snapshot
        start = snap.placement()
        for v, vm in enumerate(snap.vms):
            if vm.automation is Automation.MANUAL:
                draft.pinned.add(v)
        for rule in snap.rules:
            vms = [snap.vm_index[n] for n in rule.vms]
            weight = None if rule.mandatory else self.args.soft_weight
            if rule.type is RuleType.AFFINITY:
                draft.together.append((rule.name, vms, weight))
            elif rule.type is RuleType.ANTI_AFFINITY:
                draft.apart.append((rule.name, vms, weight))
                if rule.mandatory:
                    by_host: dict[int, list[int]] = {}
                    for v in vms:
                        by_host.setdefault(start[v], []).append(v)
                    for group in by_host.values():
                        if len(group) > 1:
                            for v in group:
                                draft.mandatory_reason.setdefault(
                                    v, f"fixes rule {rule.name} (anti_affinity)")
            else:
                hosts = {snap.host_index[h] for h in rule.hosts}
                if rule.mandatory:
                    for v in vms:
                        draft.restrict(v, hosts)
                        if start[v] not in hosts:
                            draft.mandatory_reason.setdefault(
                                v, f"fixes rule {rule.name} (vm_host)")
                else:
                    draft.prefer.append((rule.name, vms, hosts, self.args.soft_weight))
