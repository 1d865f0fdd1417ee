"""Pluggable balancing policies and rules.

Each policy is one module with a typed ``Args`` and a class registered by name; a config names
the enabled policies, and an unknown name is rejected at load time (``policies.base.make``).
``build_problem`` runs them in a fixed order over a snapshot and freezes the result.
"""

from __future__ import annotations

from typing import Any

from balancer.model import ClusterSnapshot
from balancer.model.problem import Problem
from policies import (  # noqa: F401  (registration)
    balance,
    budget,
    capacity,
    compatibility,
    evacuation,
    rules,
)
from policies.base import Draft, Policy, lookup, make, register, registered

# The order policies apply in; a later one may narrow what an earlier one allowed.
DEFAULT_POLICIES = ("capacity", "evacuation", "compatibility", "rules", "balance", "budget")


def build_problem(snapshot: ClusterSnapshot, config: dict[str, dict[str, Any]] | None = None,
                  enabled: tuple[str, ...] = DEFAULT_POLICIES,
                  policies: list[Policy] | None = None) -> Problem:
    """Apply policies and freeze the problem: the ``policies`` objects as given (the typed
    path, ``balancer.service.PlanOptions.policies``), or else the ``enabled`` names built
    through the registry with arguments from ``config`` (a service config's profile)."""
    draft = Draft.new(snapshot)
    if policies is None:
        config = config or {}
        for name in config:
            lookup(name)  # unknown names fail loudly
        policies = [make(name, config.get(name)) for name in enabled]
    for policy in policies:
        policy.apply(draft)
    return draft.freeze()


__all__ = ["DEFAULT_POLICIES", "Draft", "Policy", "build_problem", "lookup", "make", "register",
           "registered"]
