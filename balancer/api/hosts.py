"""``/v1/hosts/{host}/maintenance``: enter (with its evacuation plan) and exit."""

# No "from __future__ import annotations": FastAPI must see the Annotated aliases.

from typing import Annotated, Any

from fastapi import APIRouter, Path

from balancer.api.deps import NO_BODY, WRITE_AUTH, ControllerDep, SolverDep
from balancer.api.errors import responses
from balancer.api.models import MaintenanceResponse
from balancer.snapshot import MAX_NAME

router = APIRouter(tags=["planning"])
HostName = Annotated[str, Path(min_length=1, max_length=MAX_NAME)]


@router.post("/v1/hosts/{host}/maintenance/enter", response_model=MaintenanceResponse,
             dependencies=[WRITE_AUTH, NO_BODY],
             responses=responses(401, 403, 404, 409, 413, 422, 429, 503))
async def enter_maintenance(host: HostName, controller: ControllerDep,
                            solver: SolverDep) -> Any:
    """Put the host in maintenance; returns the evacuation plan (run when fully automated)."""
    return await solver.run(controller.maintenance, host, enter=True)


@router.post("/v1/hosts/{host}/maintenance/exit", response_model=MaintenanceResponse,
             dependencies=[WRITE_AUTH, NO_BODY],
             responses=responses(401, 403, 404, 409, 413, 422, 503))
def exit_maintenance(host: HostName, controller: ControllerDep) -> Any:
    """Take the host out of maintenance."""
    return controller.maintenance(host, enter=False)
