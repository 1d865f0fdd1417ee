"""The HTTP API, versioned under ``/v1``: an app factory with injected services.

``create_app(controller, telemetry)`` builds the FastAPI app from one router per resource
(``balancer/api/<resource>.py``); nothing (settings, engines, metrics) is created at import
time. In front of it, the ``Gate`` middleware checks the bearer token before any byte of the
body is read, then bounds the body (413). Mutations and computations (what-if, placement,
cycle, maintenance) need ``Authorization: Bearer <token>`` (``[server] api_token`` or
``BALANCER_API_TOKEN``): 401 without or with a wrong one, 403 when no token is configured;
with ``[server] read_auth`` reads need it too. Solves requested over HTTP take one of
``[server] max_concurrent_solves`` slots (429 with ``Retry-After`` when none is free) and are
capped at ``[server] solve_wall_s`` of wall time (503). Every error is
``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`` (balancer/api/errors.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI

from balancer.api import (
    automation,
    cluster,
    cycle,
    docs,
    health,
    history,
    hosts,
    inventory,
    placement,
    recommendations,
    samples,
    whatif,
)
from balancer.api.admission import SolverGate
from balancer.api.deps import READ_AUTH, ApiSettings
from balancer.api.errors import install_handlers, responses, snapshot_loc
from balancer.api.middleware import Gate
from balancer.console import mount_console

if TYPE_CHECKING:
    from balancer.daemon import Controller
    from balancer.telemetry import Telemetry

__all__ = ["create_app", "snapshot_loc"]

MB = 1024 * 1024


def create_app(controller: Controller, telemetry: Telemetry, *,
               token: Callable[[], str | None] | None = None,
               clock: Callable[[], float] = time.time,
               read_auth: bool | None = None,
               max_body_bytes: int | None = None,
               max_concurrent_solves: int | None = None,
               solve_wall_s: float | None = None) -> FastAPI:
    """The API over ``controller``; settings default to the controller's ``[server]``.

    ``token()`` gives the bearer token (None: refuse mutations and computations).
    """
    server = controller.cfg.server
    settings = ApiSettings(
        token=token or controller.cfg.token,
        read_auth=server.read_auth if read_auth is None else read_auth,
        max_body_bytes=(max_body_bytes if max_body_bytes is not None
                        else int(server.max_body_mb * MB)),
        clock=clock,
        solver=SolverGate(max_concurrent_solves or server.max_concurrent_solves,
                          solve_wall_s or server.solve_wall_s))
    app = FastAPI(title="balancer", version="1", docs_url=None, redoc_url=None,
                  description="An open, optimal DRS for KVM/QEMU clusters: cluster state, "
                              "recommendations, what-if plans, maintenance and placement.\n\n"
                              "Every error answers `{\"detail\": [{\"loc\", \"msg\", "
                              "\"type\"}]}`.")
    app.state.controller = controller
    app.state.telemetry = telemetry
    app.state.api = settings
    install_handlers(app)

    reads = [READ_AUTH] if settings.read_auth else []
    for module in (health, inventory, samples, whatif, placement, cycle, hosts, cluster,
                   recommendations, history, automation):
        if module in (cluster, recommendations, history, automation) and reads:
            app.include_router(module.router, dependencies=reads,
                               responses=responses(401, 403))
        else:
            app.include_router(module.router)

    docs.install(app)  # /docs and /redoc from local assets
    mount_console(app, controller, telemetry)  # the web console at /ui/ (balancer/console)
    app.add_middleware(Gate, spec=app.openapi, token=settings.token,
                       read_auth=settings.read_auth, max_body_bytes=settings.max_body_bytes,
                       solver_full=settings.solver.full)
    return app
