"""The executor's config file (TOML or JSON): limits, timeouts, retry, bandwidth, journal.

Every field has a default, so an empty file is a valid config. Unknown fields are rejected, and
every error names the file, the field and the problem in one line, e.g.
``exec.toml: field 'limits.max_incoming_per_host': must be >= 1, got 0``.
The documented example is ``configs/executor-simulated.toml``.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from balancer.errors import InputError, read_text


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LimitsConfig(_Strict):
    """Concurrency limits; the planner orders waves within them and the runner enforces them."""

    max_incoming_per_host: int = Field(2, ge=1)
    max_outgoing_per_host: int = Field(2, ge=1)
    max_concurrent: int = Field(16, ge=1)  # cluster-wide migrations in flight
    mem_overcommit: float = Field(1.0, gt=0)  # room = capacity x this


class MigrationConfig(_Strict):
    """What the migration-time model and the backends are told about each migration."""

    bandwidth_mbps: float = Field(10000.0, gt=0)  # per migration stream, Mbit/s
    downtime_ms: int = Field(300, ge=1)
    dirty_rate_mbps: float = Field(0.0, ge=0)  # assumed guest dirty rate for estimates
    timeout_factor: float = Field(3.0, ge=1)  # timeout = max(timeout_min_s, factor x estimate)
    timeout_min_s: float = Field(30.0, gt=0)
    poll_interval_s: float = Field(0.5, gt=0)
    # how often (backend clock) the runner re-reads where every VM is from the backend's
    # inventory to re-check room; also re-read before a move is skipped for lack of room
    inventory_refresh_s: float = Field(30.0, ge=0)


class RetryConfig(_Strict):
    """Retries of failed migrations; off by default (``attempts = 1``)."""

    attempts: int = Field(1, ge=1)  # total attempts per migration, 1 = no retry
    backoff_s: float = Field(5.0, ge=0)
    backoff_factor: float = Field(2.0, ge=1)
    max_backoff_s: float = Field(300.0, ge=0)

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait before the next attempt after ``failed_attempts`` failures."""
        return min(self.max_backoff_s,
                   self.backoff_s * self.backoff_factor ** max(0, failed_attempts - 1))


class JournalConfig(_Strict):
    path: str = "balancer-journal.sqlite"
    # NORMAL survives a crash of the process (kill -9); FULL also survives power loss.
    synchronous: Literal["normal", "full"] = "full"


class FaultsConfig(_Strict):
    """Fault injection for the simulated backend; each rate is a probability per migration."""

    failure_rate: float = Field(0.0, ge=0, le=1)
    slow_link_rate: float = Field(0.0, ge=0, le=1)
    slow_link_factor: float = Field(0.1, gt=0, le=1)  # bandwidth share left on a slow link
    dest_death_rate: float = Field(0.0, ge=0, le=1)
    nonconvergence_rate: float = Field(0.0, ge=0, le=1)
    # Kill the executor's own process with SIGKILL at its N-th backend call (0: never), either
    # just "before" the call takes effect or just "after" it did. Used by the crash tests.
    kill_executor_at_call: int = Field(0, ge=0)
    kill_phase: Literal["before", "after"] = "before"

    @model_validator(mode="after")
    def _rates(self) -> FaultsConfig:
        total = (self.failure_rate + self.dest_death_rate + self.nonconvergence_rate)
        if total > 1.0:
            raise ValueError("failure_rate + dest_death_rate + nonconvergence_rate must be <= 1")
        return self


class SimulatedConfig(_Strict):
    seed: int = Field(0, ge=0)
    # Persist the simulated cluster in this SQLite file, so a restarted executor sees where
    # the VMs really are ("" keeps it in memory).
    state_path: str = ""
    time_scale: float = Field(0.0, ge=0)  # wall seconds slept per simulated second
    dirty_rate_mbps: float = Field(0.0, ge=0)  # guests' true dirty rate in the simulation
    faults: FaultsConfig = FaultsConfig()


class ExecutorConfig(_Strict):
    limits: LimitsConfig = LimitsConfig()
    migration: MigrationConfig = MigrationConfig()
    retry: RetryConfig = RetryConfig()
    journal: JournalConfig = JournalConfig()
    simulated: SimulatedConfig = SimulatedConfig()
    # Options of the real backends, passed through unread: [backend.qemu], [backend.libvirt].
    backend: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def timeout_for(self, est_seconds: float) -> float:
        m = self.migration
        return max(m.timeout_min_s, m.timeout_factor * est_seconds)


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-after"))


def parse_config(data: Any, *, source: str = "config") -> ExecutorConfig:
    """Validate a decoded config document; errors name the field (``InputError``)."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: must be a table/object, got {type(data).__name__}")
    try:
        return ExecutorConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = _field(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        else:
            msg = msg[0].lower() + msg[1:]
        got = err.get("input")
        tail = "" if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) \
            else f", got {got!r}"
        label = f"field '{where}'" if where else "config"
        raise InputError(f"{source}: {label}: {msg}{tail}") from None


def load_config(path: str | Path | None) -> ExecutorConfig:
    """Read a ``.toml`` or ``.json`` config file; ``None`` gives the defaults."""
    if path is None:
        return ExecutorConfig()
    p = Path(path)
    text = read_text(p)
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{p}: not valid JSON: {exc.msg} at line {exc.lineno}") from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"{p}: not valid TOML: {exc}") from None
    return parse_config(data, source=str(p))


def backend_section(config: ExecutorConfig, name: str, model: type[BaseModel], host_names: set[str],
                    needs: str) -> Any:
    """Validate ``[backend.NAME]`` of an executor config against ``model``.

    Errors name the field (``InputError``): a missing section (saying what it ``needs``), a bad
    or unknown field, duplicate host names, or a snapshot host without an entry. The model must
    have a ``hosts`` list whose items have a ``name``.
    """
    raw = config.backend.get(name)
    if raw is None:
        raise InputError(f"config: field 'backend.{name}' is missing: the {name} backend needs "
                         f"its hosts ({needs})")
    try:
        section = model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in ("backend", name, *err["loc"]))
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise InputError(f"config: field '{where}': {msg}") from None
    names = [h.name for h in section.hosts]  # type: ignore[attr-defined]
    if len(set(names)) != len(names):
        raise InputError(f"config: field 'backend.{name}.hosts': duplicate host names {names}")
    missing = sorted(host_names - set(names))
    if missing:
        raise InputError(f"config: field 'backend.{name}.hosts': no entry for snapshot hosts "
                         f"{missing}")
    return section
