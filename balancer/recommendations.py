"""Recommendations: what the service proposes, their states, and the rules between them.

::

    pending ──► applying ──► applied
       │            └──────► failed
       ├──► dismissed
       └──► superseded   (its move changed or left the plan; ``detail`` says which)

``Recommendation`` is one row of the store as a typed object (``RecState``, ``MoveKind``);
``Recommendations`` makes the transitions, each conditional on the state it leaves, so two
callers can never both move one recommendation (apply vs dismiss vs a new cycle). Stability
across cycles (same move, same id) is the store's ``replace_pending``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from balancer.model import Move, MoveKind
from balancer.store import NewRecommendation, Store


class RecState(str, Enum):
    PENDING = "pending"
    APPLYING = "applying"
    APPLIED = "applied"
    FAILED = "failed"
    DISMISSED = "dismissed"
    SUPERSEDED = "superseded"


@dataclass(frozen=True)
class Recommendation:
    id: int
    created: float
    cycle: int | None
    kind: MoveKind
    vm: str
    source: str
    target: str
    reason: str
    mem_mb: int
    gain: float
    state: RecState
    updated: float
    detail: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Recommendation:
        return cls(**{**row, "kind": MoveKind(row["kind"]), "state": RecState(row["state"])})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"], d["state"] = self.kind.value, self.state.value
        return d

    def move(self) -> Move:
        return Move(vm=self.vm, source=self.source, target=self.target, reason=self.reason,
                    mem=self.mem_mb, kind=self.kind)


class Recommendations:
    """The recommendations in the store, typed."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, rec_id: int) -> Recommendation | None:
        row = self.store.recommendation(rec_id)
        return None if row is None else Recommendation.from_row(row)

    def in_state(self, state: RecState, limit: int = 10_000) -> list[Recommendation]:
        return [Recommendation.from_row(r) for r in self.store.recommendations(state.value,
                                                                                 limit)]

    def pending_count(self) -> int:
        return len(self.store.recommendations(RecState.PENDING.value, 1_000_000))

    def move(self, rec_id: int, to: RecState, *, expect: RecState | None = None,
             detail: str | None = None) -> bool:
        """``rec_id`` to ``to``, only from ``expect`` when given; False if it was not there."""
        return self.store.set_recommendation_state(
            rec_id, to.value, expect=None if expect is None else expect.value, detail=detail)

    def propose(self, moves: list[Move], gains: list[float], *, cycle: int | None,
                kinds: tuple[MoveKind, ...] | None = None) -> list[Recommendation]:
        """Make ``moves`` the pending recommendations (of ``kinds``), keeping stable ones."""
        new = [NewRecommendation(kind=m.kind.value, vm=m.vm, source=m.source, target=m.target,
                                 reason=m.reason, mem_mb=m.mem, gain=g)
               for m, g in zip(moves, gains, strict=True)]
        rows = self.store.replace_pending(
            new, cycle=cycle, kinds=None if kinds is None else tuple(k.value for k in kinds))
        return [Recommendation.from_row(r) for r in rows]
