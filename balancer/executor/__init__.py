"""Executing plans: the Backend protocol, the runner (limits, timeouts, retries, journal,
crash recovery), the simulated backend and the ``balancer execute`` command.

See docs/executor.md.
"""

from balancer.executor.base import (
    Backend,
    BackendError,
    Handle,
    HostUnreachable,
    IncompatibleHost,
    MigrationFailed,
    MigrationRequest,
    MigrationStatus,
    MigrationTimeout,
    Progress,
    VMInfo,
    VMNotFound,
)

__all__ = [
    "Backend",
    "BackendError",
    "Handle",
    "HostUnreachable",
    "IncompatibleHost",
    "MigrationFailed",
    "MigrationRequest",
    "MigrationStatus",
    "MigrationTimeout",
    "Progress",
    "VMInfo",
    "VMNotFound",
]
