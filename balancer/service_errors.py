"""What the service's operations raise, mapped to HTTP statuses by the API: ``NotFound`` 404,
``Conflict`` 409 (``NotLeader``: a mutation on a follower, naming the leader), ``Unavailable``
503."""

from __future__ import annotations

from collections.abc import Sequence

from balancer.errors import BalancerError, InputError


class NotFound(InputError):
    """The named item (recommendation, host) does not exist."""

    def __init__(self, message: str, loc: Sequence[str | int] = ()) -> None:
        super().__init__(message)
        self.loc = list(loc)


class Conflict(InputError):
    """The request is well formed but cannot be done in the current state."""


class Unavailable(BalancerError):
    """The service cannot answer yet (no inventory, backend down)."""


class NotLeader(Conflict):
    """A mutation sent to a follower: the message names the leader."""
