"""``/v1/cluster``: hosts, VMs, utilisation, imbalance and data freshness."""

# No "from __future__ import annotations": FastAPI must see the Annotated aliases.

from typing import Any

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from balancer.api.deps import ControllerDep
from balancer.api.errors import responses
from balancer.api.models import ClusterState

router = APIRouter(tags=["state"])


@router.get("/v1/cluster", response_model=ClusterState, responses=responses(503))
async def get_cluster(controller: ControllerDep) -> Any:
    """Hosts, VMs, utilisation, imbalance and data freshness (what is held and why)."""
    # Built once per state (view, last cycle, config) and served as is: with thousands of
    # VMs, building and validating it per request was most of a read's cost. Served from the
    # event loop when ready; estimating and building go to a worker thread.
    body = controller.cluster_state_cached()
    if body is None:
        body = await run_in_threadpool(controller.cluster_state_json)
    return Response(body, media_type="application/json")
