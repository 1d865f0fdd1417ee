"""``/v1/whatif``: the plan for a posted snapshot; changes nothing."""

# No "from __future__ import annotations": FastAPI must see the Annotated aliases.

from typing import Any

from fastapi import APIRouter

from balancer.api.deps import WRITE_AUTH, ControllerDep, SolverDep
from balancer.api.errors import responses
from balancer.api.models import Plan, WhatIfRequest
from balancer.errors import SnapshotError

router = APIRouter(tags=["planning"])


@router.post("/v1/whatif", response_model=Plan, dependencies=[WRITE_AUTH],
             responses=responses(400, 401, 403, 409, 413, 422, 429, 503))
async def whatif(req: WhatIfRequest, controller: ControllerDep, solver: SolverDep) -> Any:
    """The plan for a posted snapshot; changes nothing.

    Needs the token (it is computation). Takes a solver slot (429 with Retry-After when none
    is free); the engine's time limit is at most ``[server] solve_wall_s`` and the request
    answers 503 if the whole solve runs past it."""
    limit = req.time_limit_s
    if limit is not None:
        limit = min(limit, solver.wall_s)
    try:
        return await solver.run(controller.whatif, req.snapshot, req.threshold,
                                req.max_migrations, limit)
    except SnapshotError as exc:
        exc._loc_prefix = ("body", "snapshot")  # type: ignore[attr-defined]
        raise
