"""The contract between the executor and its backends (simulated, qemu, libvirt).

Every backend implements ``Backend``; the executor's runner is the only caller, and it is the
single chokepoint for limits, timeouts, retries and the journal. Backends map their vendor errors
(QMP, libvirt, sockets) into ``BackendError`` subclasses at their boundary, so the runner never
sees a vendor exception.

The protocol is synchronous and poll-based: ``start`` returns at once with a handle, ``poll``
reports progress without blocking for long, ``cancel`` asks the migration to stop. A backend with
its own clock (the simulated one) advances it in ``wait``; real backends sleep there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable

from balancer.errors import BalancerError


class BackendError(BalancerError):
    """A backend could not do what was asked; ``vm``/``host`` name what it concerns."""

    def __init__(self, message: str, *, vm: str | None = None, host: str | None = None) -> None:
        super().__init__(message)
        self.vm = vm
        self.host = host


class VMNotFound(BackendError):
    """The VM is on no host the backend knows."""


class HostUnreachable(BackendError):
    """The backend cannot talk to a host (daemon down, connection refused)."""


class MigrationFailed(BackendError):
    """The migration ended without moving the VM; the VM still runs on its source."""


class MigrationTimeout(BackendError):
    """The migration did not finish in time and was cancelled; the VM runs on its source."""


class IncompatibleHost(BackendError):
    """The destination cannot run the VM (CPU model, network, storage); nothing was started."""


class MigrationStatus(str, Enum):
    """What a backend says of one migration in flight."""

    ACTIVE = "active"  # copying memory
    COMPLETED = "completed"  # the VM runs on the destination; the source copy is gone
    FAILED = "failed"  # ended; the VM runs on the source
    CANCELLED = "cancelled"  # ended by cancel(); the VM runs on the source


@dataclass(frozen=True)
class MigrationRequest:
    vm: str
    source: str
    target: str
    mem_mb: int
    bandwidth_mbps: float | None = None  # cap on the migration stream, Mbit/s (None: default)
    downtime_ms: int | None = None  # allowed stop-and-copy downtime


@dataclass
class Progress:
    status: MigrationStatus
    transferred_mb: float = 0.0
    total_mb: float = 0.0
    rate_mbps: float = 0.0  # current transfer rate, Mbit/s
    downtime_ms: float | None = None
    error: str | None = None

    @property
    def percent(self) -> float:
        return 100.0 * self.transferred_mb / self.total_mb if self.total_mb else 0.0


@dataclass(frozen=True)
class VMInfo:
    name: str
    host: str
    vcpus: int
    mem_mb: int
    running: bool = True


@dataclass(frozen=True)
class Handle:
    """Identifies one migration in flight; opaque to the runner beyond ``request``."""

    request: MigrationRequest
    token: str
    extra: dict[str, str] = field(default_factory=dict, compare=False)


@runtime_checkable
class Backend(Protocol):
    name: str

    def inventory(self) -> list[VMInfo]:
        """Every VM on every host the backend manages."""
        ...

    def locate(self, vm: str) -> str | None:
        """The host the VM runs on now, or None when no host runs it."""
        ...

    def check(self, request: MigrationRequest) -> None:
        """Raise ``IncompatibleHost`` (or another BackendError) if the move must not start."""
        ...

    def start(self, request: MigrationRequest) -> Handle:
        """Start a live migration and return at once."""
        ...

    def poll(self, handle: Handle) -> Progress:
        """Progress of a migration started by ``start``."""
        ...

    def cancel(self, handle: Handle) -> None:
        """Ask the migration to stop; the VM keeps running on its source."""
        ...

    def now(self) -> float:
        """The backend's clock, seconds (simulated time for the simulated backend)."""
        ...

    def wait(self, seconds: float) -> None:
        """Let ``seconds`` pass (sleep, or advance the simulated clock)."""
        ...

    def close(self) -> None:
        ...

    # Optional: ``find_migration(vm) -> Handle | None`` — a migration of ``vm`` already in
    # flight (after a restart of the executor). The runner uses it when a backend has it.
