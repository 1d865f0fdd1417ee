"""``/v1/metrics``: pushed utilisation samples."""

# No "from __future__ import annotations": FastAPI must see the Annotated aliases.

from typing import Any

from fastapi import APIRouter

from balancer.api.deps import WRITE_AUTH, ControllerDep, SettingsDep
from balancer.api.errors import error_response, responses
from balancer.api.models import MetricsAccepted, MetricsBatch

router = APIRouter(tags=["ingest"])
MAX_FUTURE_S = 300.0


@router.post("/v1/metrics", response_model=MetricsAccepted, dependencies=[WRITE_AUTH],
             responses=responses(400, 401, 403, 409, 413, 422))
def post_metrics(batch: MetricsBatch, controller: ControllerDep, settings: SettingsDep) -> Any:
    """Push a batch of samples (timestamp, host or VM, CPU cores used, memory MiB used)."""
    limit = settings.clock() + MAX_FUTURE_S
    n = len(batch.samples)
    ts, kind, name, cpu, mem = [0.0] * n, [""] * n, [""] * n, [0.0] * n, [0.0] * n
    for i, s in enumerate(batch.samples):
        if s.ts > limit:
            return error_response(422, f"samples[{i}]: field 'ts': {s.ts:g} is more than "
                                       f"{MAX_FUTURE_S:g} s in the future",
                                  ["body", "samples", i, "ts"], "value_error")
        ts[i] = s.ts
        if s.vm is not None:
            kind[i], name[i] = "vm", s.vm
        else:
            kind[i], name[i] = "host", s.host  # type: ignore[assignment]
        cpu[i] = s.cpu_cores
        mem[i] = s.mem_mb
    accepted = controller.ingest(ts, kind, name, cpu, mem)
    return MetricsAccepted(accepted=accepted, total=controller.push.total)
