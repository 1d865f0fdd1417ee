"""``/v1/recommendations``: what the service proposes, and apply/dismiss."""

# No "from __future__ import annotations": FastAPI must see the Annotated aliases.

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from balancer.api.deps import NO_BODY, WRITE_AUTH, ControllerDep
from balancer.api.errors import responses
from balancer.api.models import ApplyResponse, Recommendation
from balancer.daemon import NotFound

router = APIRouter(tags=["recommendations"])
RecId = Annotated[int, Path(ge=1, le=2**62)]
State = Literal["pending", "applying", "applied", "failed", "dismissed", "superseded", "all"]


@router.get("/v1/recommendations", response_model=list[Recommendation],
            responses=responses(422))
async def list_recommendations(
    controller: ControllerDep,
    state: Annotated[State, Query()] = "pending",
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Any:
    """Recommendations, each with its reason and expected gain (pending by default)."""
    if state == "pending":
        # The hot path: the cached JSON of the pending set (same shape as the model).
        body = controller.store.pending_page(limit)
        if body is not None:
            return Response(body, media_type="application/json")
    return controller.store.recommendations(None if state == "all" else state, limit)


@router.get("/v1/recommendations/{rec_id}", response_model=Recommendation,
            responses=responses(404, 422))
def get_recommendation(rec_id: RecId, controller: ControllerDep) -> Any:
    rec = controller.store.recommendation(rec_id)
    if rec is None:
        raise NotFound(f"recommendation {rec_id} does not exist", ["path", "rec_id"])
    return rec


@router.post("/v1/recommendations/{rec_id}/apply", response_model=ApplyResponse,
             dependencies=[WRITE_AUTH, NO_BODY],
             responses=responses(401, 403, 404, 409, 413, 422, 503))
def apply_recommendation(rec_id: RecId, controller: ControllerDep) -> Any:
    """Carry out the migration now through the executor; returns its journal entry."""
    return controller.apply(rec_id)


@router.post("/v1/recommendations/{rec_id}/dismiss", response_model=Recommendation,
             dependencies=[WRITE_AUTH, NO_BODY],
             responses=responses(401, 403, 404, 409, 413, 422))
def dismiss_recommendation(rec_id: RecId, controller: ControllerDep) -> Any:
    """Dismiss it; the VM is then held for balance for the cool-down."""
    return controller.dismiss(rec_id)
