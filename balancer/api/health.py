"""Liveness, readiness and the Prometheus exposition."""

# No "from __future__ import annotations": FastAPI must see the Annotated aliases.

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from balancer.api.deps import READ_AUTH, ControllerDep, TelemetryDep
from balancer.api.models import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up and serving."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health,
            responses={503: {"model": Health, "description": "Not ready, and why"}})
async def readyz(controller: ControllerDep) -> Any:
    """Ready when an inventory is loaded and a first control cycle has run."""
    if controller.inventory is None:
        return JSONResponse(status_code=503, content={"status": "not ready",
                                                      "detail": "no inventory yet"})
    if not controller.ready.is_set():
        return JSONResponse(status_code=503, content={"status": "not ready",
                                                      "detail": "first cycle not run yet"})
    return Health(status="ready")


@router.get("/metrics", include_in_schema=False, dependencies=[READ_AUTH])
async def metrics(telemetry: TelemetryDep) -> Response:
    return Response(telemetry.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
