"""The HTTP API, versioned under ``/v1``: an app factory with injected services.

``create_app(controller, telemetry)`` builds the FastAPI app; nothing (settings, engines,
metrics) is created at import time. Mutating endpoints need ``Authorization: Bearer <token>``
(the token from ``[server] api_token`` or ``BALANCER_API_TOKEN``): 401 without or with a wrong
one; with no token configured they are refused (403) rather than left open. Bad input gets a
4xx JSON body ``{"detail": [{"loc": [...], "msg": ...}]}`` naming the field.
"""

# No "from __future__ import annotations": FastAPI must see the local Annotated aliases.

import re
import secrets
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from balancer.api.models import (
    ApplyResponse,
    Health,
    InventoryAccepted,
    MetricsAccepted,
    MetricsBatch,
    Migration,
    PlacementRequest,
    PlacementResponse,
    Recommendation,
    WhatIfRequest,
)
from balancer.console import mount_console
from balancer.daemon import Conflict, Controller, NotFound, Unavailable
from balancer.errors import BalancerError, InfeasibleError, InputError, SnapshotError
from balancer.telemetry import Telemetry

_WHERE = re.compile(r"^(hosts|vms|rules)\[(\d+)\]")
_FIELD = re.compile(r"field '([^']+)'")
_TOP = re.compile(r"^(hosts|vms|rules)\b")
MAX_FUTURE_S = 300.0


def snapshot_loc(message: str, prefix: tuple[str, ...] = ("body",)) -> list[str | int]:
    """The JSON location a snapshot error message names, e.g. ["body", "vms", 3, "host"]."""
    loc: list[str | int] = list(prefix)
    m = _WHERE.match(message)
    if m:
        loc += [m.group(1), int(m.group(2))]
    else:
        m2 = _TOP.match(message)
        if m2:
            loc.append(m2.group(1))
    f = _FIELD.search(message)
    if f:
        loc.append(f.group(1))
    return loc


def _error(status: int, msg: str, loc: list[Any] | None = None, **extra: Any) -> JSONResponse:
    item: dict[str, Any] = {"loc": loc or [], "msg": msg}
    item.update(extra)
    return JSONResponse(status_code=status, content={"detail": [item]})


def create_app(controller: Controller, telemetry: Telemetry, *,
               token: Callable[[], str | None] | None = None,
               clock: Callable[[], float] = time.time) -> FastAPI:
    """The API over ``controller``; ``token()`` gives the bearer token (None: refuse writes)."""
    get_token = token or controller.cfg.token
    app = FastAPI(title="balancer", version="1",
                  description="An open, optimal DRS for KVM/QEMU clusters: cluster state, "
                              "recommendations, what-if plans, maintenance and placement.")
    bearer = HTTPBearer(auto_error=False, description="the API token")

    def require_token(
        cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        expected = get_token()
        if not expected:
            raise HTTPException(403, detail=[{
                "loc": ["header", "authorization"],
                "msg": "mutating endpoints are disabled: no API token configured "
                       "(set [server] api_token or BALANCER_API_TOKEN)"}])
        if cred is None or not secrets.compare_digest(cred.credentials.encode(),
                                                      expected.encode()):
            raise HTTPException(401, detail=[{"loc": ["header", "authorization"],
                                              "msg": "missing or wrong bearer token"}],
                                headers={"WWW-Authenticate": "Bearer"})

    Auth = Depends(require_token)

    @app.exception_handler(SnapshotError)
    async def _snapshot_error(_: Request, exc: SnapshotError) -> JSONResponse:
        return _error(422, str(exc), snapshot_loc(str(exc), getattr(exc, "_loc_prefix",
                                                                      ("body",))))

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return _error(404, str(exc), exc.loc)

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, exc: Conflict) -> JSONResponse:
        f = _FIELD.search(str(exc))
        return _error(409, str(exc), ["body", f.group(1)] if f else [])

    @app.exception_handler(InputError)
    async def _input_error(_: Request, exc: InputError) -> JSONResponse:
        f = _FIELD.search(str(exc))
        return _error(422, str(exc), ["body", f.group(1)] if f else ["body"])

    @app.exception_handler(InfeasibleError)
    async def _infeasible(_: Request, exc: InfeasibleError) -> JSONResponse:
        return _error(409, str(exc), ["body"], culprits=exc.culprits)

    @app.exception_handler(Unavailable)
    async def _unavailable(_: Request, exc: Unavailable) -> JSONResponse:
        return _error(503, str(exc))

    @app.exception_handler(BalancerError)
    async def _balancer_error(_: Request, exc: BalancerError) -> JSONResponse:
        return _error(503, f"failed: {exc}")

    # -- health -------------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        """The process is up and serving."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, tags=["health"],
             responses={503: {"model": Health}})
    async def readyz() -> Any:
        """Ready when an inventory is loaded and a first control cycle has run."""
        if controller.inventory is None:
            return JSONResponse(status_code=503, content={"status": "not ready",
                                                          "detail": "no inventory yet"})
        if not controller.ready.is_set():
            return JSONResponse(status_code=503, content={"status": "not ready",
                                                          "detail": "first cycle not run yet"})
        return Health(status="ready")

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(telemetry.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- ingestion -------------------------------------------------------------------------------
    @app.post("/v1/inventory", response_model=InventoryAccepted, tags=["ingest"],
              dependencies=[Auth])
    def post_inventory(doc: dict[str, Any]) -> InventoryAccepted:
        """Replace the inventory (hosts, VMs, rules) with a snapshot v1 document."""
        snap = controller.set_inventory(doc)
        return InventoryAccepted(hosts=len(snap.hosts), vms=len(snap.vms), rules=len(snap.rules))

    @app.post("/v1/metrics", response_model=MetricsAccepted, tags=["ingest"],
              dependencies=[Auth])
    def post_metrics(batch: MetricsBatch) -> Any:
        """Push a batch of samples (timestamp, host or VM, CPU cores used, memory MiB used)."""
        limit = clock() + MAX_FUTURE_S
        n = len(batch.samples)
        ts, kind, name, cpu, mem = [0.0] * n, [""] * n, [""] * n, [0.0] * n, [0.0] * n
        for i, s in enumerate(batch.samples):
            if s.ts > limit:
                return _error(422, f"samples[{i}]: field 'ts': {s.ts:g} is more than "
                                   f"{MAX_FUTURE_S:g} s in the future",
                              ["body", "samples", i, "ts"])
            ts[i] = s.ts
            if s.vm is not None:
                kind[i], name[i] = "vm", s.vm
            else:
                kind[i], name[i] = "host", s.host  # type: ignore[assignment]
            cpu[i] = s.cpu_cores
            mem[i] = s.mem_mb
        accepted = controller.ingest(ts, kind, name, cpu, mem)
        return MetricsAccepted(accepted=accepted, total=controller.push.total)

    # -- state -------------------------------------------------------------------------------
    @app.get("/v1/cluster", tags=["state"])
    def get_cluster() -> dict[str, Any]:
        """Hosts, VMs, utilisation, imbalance and data freshness (what is held and why)."""
        return controller.cluster_state()

    @app.get("/v1/recommendations", response_model=list[Recommendation], tags=["recommendations"])
    async def list_recommendations(
        state: Annotated[Literal["pending", "applying", "applied", "failed", "dismissed",
                                 "superseded", "all"], Query()] = "pending",
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> Any:
        """Recommendations, each with its reason and expected gain (pending by default)."""
        if state == "pending" and len(controller.store.recommendations("pending")) <= limit:
            # The hot path: the cached JSON of the pending set (same shape as the model).
            return Response(controller.store.pending_json(), media_type="application/json")
        return controller.store.recommendations(None if state == "all" else state, limit)

    RecId = Annotated[int, Path(ge=1, le=2**62)]

    @app.get("/v1/recommendations/{rec_id}", response_model=Recommendation,
             tags=["recommendations"])
    def get_recommendation(rec_id: RecId) -> Any:
        rec = controller.store.recommendation(rec_id)
        if rec is None:
            raise NotFound(f"recommendation {rec_id} does not exist", ["path", "rec_id"])
        return rec

    @app.post("/v1/recommendations/{rec_id}/apply", response_model=ApplyResponse,
              tags=["recommendations"], dependencies=[Auth])
    def apply_recommendation(rec_id: RecId) -> Any:
        """Carry out the migration now through the executor; returns its journal entry."""
        return controller.apply(rec_id)

    @app.post("/v1/recommendations/{rec_id}/dismiss", response_model=Recommendation,
              tags=["recommendations"], dependencies=[Auth])
    def dismiss_recommendation(rec_id: RecId) -> Any:
        """Dismiss it; the VM is then held for balance for the cool-down."""
        return controller.dismiss(rec_id)

    @app.post("/v1/cycle", tags=["recommendations"], dependencies=[Auth])
    def run_cycle() -> dict[str, Any]:
        """Run one control cycle now (ingest, estimate, solve, store, execute by level)."""
        return controller.run_cycle().to_dict()

    # -- planning ------------------------------------------------------------------------------
    @app.post("/v1/whatif", tags=["planning"])
    def whatif(req: WhatIfRequest) -> dict[str, Any]:
        """The plan for a posted snapshot; changes nothing."""
        try:
            return controller.whatif(req.snapshot, req.threshold, req.max_migrations,
                                     req.time_limit_s)
        except SnapshotError as exc:
            exc._loc_prefix = ("body", "snapshot")  # type: ignore[attr-defined]
            raise

    HostName = Annotated[str, Path(min_length=1, max_length=253)]

    @app.post("/v1/hosts/{host}/maintenance/enter", tags=["planning"], dependencies=[Auth])
    def enter_maintenance(host: HostName) -> dict[str, Any]:
        """Put the host in maintenance; returns the evacuation plan (run when fully automated)."""
        return controller.maintenance(host, enter=True)

    @app.post("/v1/hosts/{host}/maintenance/exit", tags=["planning"], dependencies=[Auth])
    def exit_maintenance(host: HostName) -> dict[str, Any]:
        """Take the host out of maintenance."""
        return controller.maintenance(host, enter=False)

    @app.post("/v1/placement", response_model=PlacementResponse, tags=["planning"],
              dependencies=[Auth])
    def placement(req: PlacementRequest) -> Any:
        """Best host for a new VM and why (recorded when partially or fully automated)."""
        return controller.place(name=req.name, vcpus=req.vcpus, mem_mb=req.mem_mb,
                                cpu_demand=req.cpu_demand, mem_demand_mb=req.mem_demand_mb)

    @app.get("/v1/history", response_model=list[Migration], tags=["state"])
    def history(limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
                vm: Annotated[str | None, Query(min_length=1, max_length=253)] = None) -> Any:
        """Migrations carried out, newest first, with outcome and error."""
        return controller.store.migrations(limit=limit, vm=vm)

    mount_console(app, controller, telemetry, token=get_token)  # the web console at /ui/
    return app
