"""``/v1/cycle``: run one control cycle now."""

# No "from __future__ import annotations": FastAPI must see the Annotated aliases.

from typing import Any

from fastapi import APIRouter

from balancer.api.deps import NO_BODY, WRITE_AUTH, ControllerDep, SolverDep
from balancer.api.errors import responses
from balancer.api.models import CycleReport

router = APIRouter(tags=["recommendations"])


@router.post("/v1/cycle", response_model=CycleReport, dependencies=[WRITE_AUTH, NO_BODY],
             responses=responses(401, 403, 409, 413, 422, 429, 503))
async def run_cycle(controller: ControllerDep, solver: SolverDep) -> Any:
    """Run one control cycle now (ingest, estimate, solve, store, execute by level).

    Takes a solver slot (429 when none is free); past ``[server] solve_wall_s`` the request
    answers 503 while the cycle finishes and records its result."""
    report = await solver.run(controller.run_cycle)
    return report.to_dict()
