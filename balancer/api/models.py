"""Request and response models of the HTTP API (separate, so each side can evolve)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Sample(_In):
    """One utilisation sample of a host or of a VM (exactly one of the two)."""

    ts: float = Field(gt=0, description="sample time, Unix epoch seconds")
    host: str | None = Field(None, min_length=1, max_length=253)
    vm: str | None = Field(None, min_length=1, max_length=253)
    cpu_cores: float = Field(ge=0, le=1e6, description="CPU used, cores")
    mem_mb: float = Field(ge=0, le=1e12, description="memory used, MiB")

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
    snapshot: dict[str, Any] = Field(description="a snapshot v1 document (docs/snapshot-format.md)")
    threshold: int = Field(3, ge=1, le=5)
    max_migrations: int | None = Field(None, ge=0, le=100_000)
    time_limit_s: float | None = Field(None, gt=0, le=30)


class PlacementRequest(_In):
    name: str = Field(min_length=1, max_length=253)
    vcpus: int = Field(ge=1, le=4096)
    mem_mb: int = Field(ge=1, le=64 * 1024 * 1024)
    cpu_demand: float | None = Field(None, ge=0,
                                     description="expected cores used (default: vcpus)")
    mem_demand_mb: float | None = Field(None, ge=0,
                                        description="expected MiB used (default: mem_mb)")


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


class Recommendation(BaseModel):
    id: int
    created: float
    cycle: int | None
    kind: Literal["balance", "mandatory", "evacuation"]
    vm: str
    source: str
    target: str
    reason: str
    mem_mb: int
    gain: float = Field(description="imbalance (CPU std + memory std) the plan loses without it")
    state: Literal["pending", "applying", "applied", "failed", "dismissed", "superseded"]
    updated: float
    detail: str | None


class Migration(BaseModel):
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


class ApplyResponse(BaseModel):
    recommendation: Recommendation
    migration: Migration | None = Field(description="the last migration leg run for it")


class InventoryAccepted(BaseModel):
    hosts: int
    vms: int
    rules: int


class Health(BaseModel):
    status: str
    detail: str | None = None
