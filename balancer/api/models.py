"""Request and response models of the HTTP API (separate, so each side can evolve).

Requests use constrained types only: finite floats within physical ranges, integers within
ranges, names as printable strings of 1..253 characters without lone surrogates (the rule of
``balancer.snapshot.check_name``), and unknown fields are refused. Responses describe every
field the API returns; those that other parts of the service may extend allow extra keys.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from balancer.model import Automation, HostState, RuleType
from balancer.snapshot import (
    MAX_HOST_CORES,
    MAX_MEM_MB,
    MAX_NAME,
    MAX_VCPUS,
    NAME_PATTERN,
    check_name,
)


def _name(value: str) -> str:
    why = check_name(value)
    if why:
        raise ValueError(why)
    return value


def _whole(value: Any) -> Any:
    """JSON Schema's integer: 2.0 is 2; 2.5, true and "2" are not (strict mode refuses them)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    return value


# Constraints before the validator (pydantic renders them as JSON Schema's minimum/maximum).
Threshold = Annotated[int, Field(ge=1, le=5), BeforeValidator(_whole)]
Budget = Annotated[int, Field(ge=0, le=100_000), BeforeValidator(_whole)]
VCPUs = Annotated[int, Field(ge=1, le=int(MAX_VCPUS)), BeforeValidator(_whole)]
MemMB = Annotated[int, Field(ge=1, le=int(MAX_MEM_MB)), BeforeValidator(_whole)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME,
                            json_schema_extra={"pattern": NAME_PATTERN}),
                 AfterValidator(_name)]
MIN_TS = 1e9  # 2001-09-09: a sample older than that is a unit error
MAX_TS = 1e11  # year 5138: anything later is not a time


def snapshot_schema() -> dict[str, Any]:
    """The JSON Schema of a snapshot v1 document (docs/snapshot-format.md), for OpenAPI.

    Everything it states is enforced by ``balancer.snapshot.parse_snapshot``; what JSON Schema
    cannot state is enforced there too (a VM's host is one of the hosts, names are unique,
    demand is within size, the VMs' memory fits the active hosts, rules name known VMs and
    hosts and do not contradict each other), answered 422 naming the field.
    """
    name = {"type": "string", "minLength": 1, "maxLength": MAX_NAME, "pattern": NAME_PATTERN}
    names = {"type": "array", "items": name}
    text = {"type": "string", "maxLength": MAX_NAME, "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$"}
    labels = {"type": "object", "propertyNames": name, "additionalProperties": text}
    compat = {"cpu_model": {"anyOf": [name, {"type": "null"}]}, "cpu_features": names,
              "networks": names, "datastores": names}
    host = {"type": "object", "required": ["name", "cpu_capacity", "mem_capacity_mb"],
            "properties": {
                "name": name,
                "cpu_capacity": {"type": "number", "minimum": 0.001,
                                 "maximum": MAX_HOST_CORES, "description": "cores"},
                "mem_capacity_mb": {"type": "number", "minimum": 1, "maximum": MAX_MEM_MB},
                "state": {"enum": [e.value for e in HostState]},
                "labels": labels, **compat}}
    vm = {"type": "object",
          "required": ["name", "host", "vcpus", "mem_mb", "cpu_demand", "mem_demand_mb"],
          "properties": {
              "name": name, "host": name,
              "vcpus": {"type": "integer", "minimum": 1, "maximum": int(MAX_VCPUS)},
              "mem_mb": {"type": "number", "minimum": 1, "maximum": MAX_MEM_MB},
              "cpu_demand": {"type": "number", "minimum": 0, "maximum": MAX_VCPUS,
                             "description": "cores used, at most vcpus"},
              "mem_demand_mb": {"type": "number", "minimum": 0, "maximum": MAX_MEM_MB,
                                "description": "MiB used, at most mem_mb"},
              "automation": {"enum": [e.value for e in Automation]},
              "local_storage": {"type": "boolean"}, **compat}}
    rule = {"type": "object", "required": ["name", "type", "vms"],
            "properties": {"name": name, "type": {"enum": [e.value for e in RuleType]},
                           "vms": names, "hosts": names, "host_labels": labels,
                           "mandatory": {"type": "boolean"}}}
    return {"type": "object", "required": ["version", "hosts", "vms"],
            "description": "a snapshot v1 document (docs/snapshot-format.md)",
            "properties": {"version": {"enum": [1]},
                           "hosts": {"type": "array", "minItems": 1, "items": host},
                           "vms": {"type": "array", "items": vm},
                           "rules": {"type": "array", "items": rule},
                           "cpu_baseline": names}}


class _In(BaseModel):
    # strict: false is not 0, "1" is not 1 (what the schema says is what is accepted)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class Sample(_In):
    """One utilisation sample of a host or of a VM (exactly one of the two)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True,
                              json_schema_extra={
        "oneOf": [{"required": ["host"]}, {"required": ["vm"]}]})

    ts: float = Field(ge=MIN_TS, le=MAX_TS, description="sample time, Unix epoch seconds")
    # Either name, never null (the schema says so: exactly one of the two is present).
    host: Name = None  # type: ignore[assignment]
    vm: Name = None  # type: ignore[assignment]
    cpu_cores: float = Field(ge=0, le=MAX_HOST_CORES, description="CPU used, cores")
    mem_mb: float = Field(ge=0, le=MAX_MEM_MB, description="memory used, MiB")

    @model_validator(mode="after")
    def _one_subject(self) -> Sample:
        if (self.host is None) == (self.vm is None):
            raise ValueError("give exactly one of 'host' and 'vm'")
        return self


class MetricsBatch(_In):
    samples: list[Sample] = Field(max_length=100_000)


class MetricsAccepted(BaseModel):
    accepted: int
    total: int


class WhatIfRequest(_In):
    snapshot: dict[str, Any] = Field(json_schema_extra=snapshot_schema())
    threshold: Threshold = 3
    max_migrations: Budget | None = None
    time_limit_s: float | None = Field(None, gt=0, le=30)


class PlacementRequest(_In):
    name: Name
    vcpus: VCPUs
    mem_mb: MemMB
    cpu_demand: float | None = Field(None, ge=0, le=MAX_VCPUS,
                                     description="expected cores used (default: vcpus)")
    mem_demand_mb: float | None = Field(None, ge=0, le=MAX_MEM_MB,
                                        description="expected MiB used (default: mem_mb)")


# -- responses ---------------------------------------------------------------------------------
class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class Candidate(BaseModel):
    host: str
    imbalance_after: float


class PlacementResponse(BaseModel):
    vm: str
    host: str
    reason: str
    imbalance_before: float
    imbalance_after: float
    candidates: list[Candidate]
    applied: bool


class Recommendation(_Out):
    id: int
    created: float
    cycle: int | None
    kind: Literal["balance", "mandatory", "evacuation", "power", "standby", "wake"] = Field(
        description="why the VM moves (balance, mandatory, evacuation; power: it empties a "
                    "host for standby), or a host power action (standby, wake: vm is empty, "
                    "source and target name the host)")
    vm: str
    source: str
    target: str
    reason: str
    mem_mb: int
    gain: float = Field(description="imbalance (CPU std + memory std) the plan loses without "
                                    "it; for a standby, the watts the host draws now")
    state: Literal["pending", "applying", "applied", "failed", "dismissed", "superseded"]
    updated: float
    detail: str | None


class Migration(_Out):
    id: int
    rec_id: int | None
    vm: str
    source: str
    target: str
    mem_mb: int
    trigger: str
    state: Literal["started", "completed", "failed", "cancelled", "skipped"]
    started: float
    finished: float | None
    error: str | None


class PowerAction(BaseModel):
    rec_id: int
    host: str
    action: Literal["standby", "wake"]
    trigger: str
    command: list[str] | None = Field(default=None,
                                      description="the command run (argv), if configured")
    exit: int | None = Field(default=None, description="its exit code (None: not run)")
    output: str = Field(default="", description="the end of its output")
    state: Literal["completed", "failed", "skipped"] = Field(
        description="skipped: its host was not ready (e.g. a move emptying it failed)")
    detail: str


class ApplyResponse(BaseModel):
    recommendation: Recommendation
    migration: Migration | None = Field(description="the last migration leg run for it")
    power: PowerAction | None = Field(default=None,
                                      description="a host power action: what was run")


class InventoryAccepted(BaseModel):
    hosts: int
    vms: int
    rules: int


class Health(BaseModel):
    status: str
    detail: str | None = None


class Imbalance(_Out):
    """Utilisation statistics over active hosts (fractions of capacity)."""

    cpu_std: float
    mem_std: float
    cpu_max: float
    mem_max: float
    imbalance: float = Field(description="cpu_std + mem_std")


class PlanMove(_Out):
    vm: str
    from_: str = Field(alias="from")
    to: str
    reason: str
    mem_mb: int
    gain: float | None = Field(None, description="what-if: imbalance the plan loses without it")


class Efficacy(_Out):
    before: Imbalance
    after: Imbalance
    migrations: int
    moved_mem_mb: int


class Plan(_Out):
    """A plan: the moves with their reasons, the balance before and after, the solver's run."""

    migrations: list[PlanMove]
    efficacy: Efficacy
    solver: dict[str, Any] = Field(description="engine name, status, objective, bound, "
                                               "seconds, seed, time limit")
    notes: list[str]
    eligibility: dict[str, list[str]] = Field(description="VM -> why it has fewer hosts")


class ClusterHost(_Out):
    name: str
    state: Literal["active", "maintenance", "standby"]
    cpu_capacity: float
    mem_capacity_mb: int
    cpu_used: float
    mem_used_mb: int
    cpu_util: float
    mem_util: float
    vms: int
    fresh: bool
    sample_age_s: float | None


class ClusterVM(_Out):
    name: str
    host: str
    vcpus: int
    mem_mb: int
    cpu_demand: float
    mem_demand_mb: int
    automation: str
    fresh: bool
    sample_age_s: float | None
    held: str | None = Field(description="why the VM is not moved for balance now")
    eligibility: list[str]


class Freshness(_Out):
    stale_after_s: float
    newest_sample_age_s: float | None
    stale_vms: list[str]
    stale_hosts: list[str]
    pinned_vms: dict[str, str]
    clamped_estimates: int
    samples_for_unknown_names: int


class LastCycle(_Out):
    cycle: int
    duration_s: float
    recommendations: int
    executed: int
    notes: list[str]
    imbalance_streak: int


class ClusterState(_Out):
    cluster: str
    automation: str
    as_of: float
    hosts: list[ClusterHost]
    vms: list[ClusterVM]
    imbalance: Imbalance
    freshness: Freshness
    last_cycle: LastCycle | None


class CycleReport(_Out):
    cycle: int
    duration_s: float
    solve_s: float | None
    recommendations: list[Recommendation]
    executed: list[Migration]
    power: list[PowerAction] = Field(default_factory=list,
                                     description="host power actions carried out this cycle")
    notes: list[str]
    imbalance_before: float | None
    imbalance_after: float | None
    streak: int


class MaintenanceResponse(_Out):
    host: str
    state: Literal["active", "maintenance"]
    plan: Plan | None = Field(description="the evacuation plan (enter only)")
    recommendations: list[Recommendation]
    executed: list[Migration]
