"""The balancer's one exception tree.

::

    BalancerError
    ├── InputError                 bad input from a user or an outside tool (CLI exit 2, HTTP 4xx)
    │   └── SnapshotError          a snapshot file or payload that breaks the format
    ├── InfeasibleError            no placement satisfies the hard constraints; names the culprits
    └── SolverError                the solver failed for a reason other than infeasibility

Every message is one readable line naming the item and the field at fault.
"""

from __future__ import annotations

from pathlib import Path


class BalancerError(Exception):
    """Root of every error the balancer raises on purpose."""


class InputError(BalancerError):
    """Bad input: the message names the item and field at fault."""


class SnapshotError(InputError):
    """A snapshot that does not follow the format (docs/snapshot-format.md)."""


class InfeasibleError(BalancerError):
    """The hard constraints cannot all hold; ``culprits`` names the rules or hosts involved."""

    def __init__(self, message: str, culprits: list[str] | None = None) -> None:
        super().__init__(message)
        self.culprits = culprits or []


class SolverError(BalancerError):
    """The solver stopped without an answer for a reason other than infeasibility."""


def read_text(path: str | Path, error: type[InputError] = InputError) -> str:
    """A UTF-8 input file's text; a missing or unreadable file raises ``error`` in one line."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{p}: cannot read: {exc}") from None
