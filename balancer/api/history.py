"""``/v1/history``: migrations carried out."""

# No "from __future__ import annotations": FastAPI must see the Annotated aliases.

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from balancer.api.deps import ControllerDep
from balancer.api.errors import responses
from balancer.api.models import Migration
from balancer.snapshot import MAX_NAME

router = APIRouter(tags=["state"])


@router.get("/v1/history", response_model=list[Migration], responses=responses(422))
async def history(controller: ControllerDep,
                  limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
                  vm: Annotated[str | None, Query(min_length=1, max_length=MAX_NAME)] = None
                  ) -> Any:
    """Migrations carried out, newest first, with outcome and error."""
    store = controller.store
    if vm is None and limit == store.HISTORY_PAGE:
        # The hot path (a console or follower polling): cached JSON of the newest page.
        return Response(store.history_json(), media_type="application/json")
    return store.migrations(limit=limit, vm=vm)
