"""``/v1/placement``: the best host for a new VM, and why."""

# No "from __future__ import annotations": FastAPI must see the Annotated aliases.

from typing import Any

from fastapi import APIRouter

from balancer.api.deps import WRITE_AUTH, ControllerDep, SolverDep
from balancer.api.errors import responses
from balancer.api.models import PlacementRequest, PlacementResponse

router = APIRouter(tags=["planning"])


@router.post("/v1/placement", response_model=PlacementResponse, dependencies=[WRITE_AUTH],
             responses=responses(400, 401, 403, 409, 413, 422, 429, 503))
async def placement(req: PlacementRequest, controller: ControllerDep, solver: SolverDep) -> Any:
    """Best host for a new VM and why (recorded when partially or fully automated)."""
    return await solver.run(lambda: controller.place(
        name=req.name, vcpus=req.vcpus, mem_mb=req.mem_mb, cpu_demand=req.cpu_demand,
        mem_demand_mb=req.mem_demand_mb))
