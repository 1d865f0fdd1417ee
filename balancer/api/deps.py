"""Dependencies of the API's routers (FastAPI ``Annotated`` aliases).

``ControllerDep``, ``TelemetryDep`` and ``SettingsDep`` hand the injected services to an
endpoint; ``WRITE_AUTH`` (mutations and computations) and ``READ_AUTH`` (reads, enforced when
``[server] read_auth`` is on) mark what needs the bearer token. The ``Gate`` middleware checks
the token from these marks before the body is read; the dependencies check it again (so a
route is safe even mounted without the gate) and put the bearer scheme in the OpenAPI document.
"""

# No "from __future__ import annotations": FastAPI must see the Annotated aliases.

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from balancer.api.admission import SolverGate
from balancer.api.middleware import READ, WRITE, token_error
from balancer.daemon import Controller
from balancer.telemetry import Telemetry


@dataclass
class ApiSettings:
    """What the app was built with (``create_app`` fills it from ``[server]``)."""

    token: Callable[[], str | None]
    read_auth: bool = False
    max_body_bytes: int = 10 * 1024 * 1024
    clock: Callable[[], float] = time.time
    solver: SolverGate = field(default_factory=lambda: SolverGate(2, 60.0))


# The dependencies below only look things up: they are ``async def`` so that FastAPI calls
# them on the event loop. A plain ``def`` dependency is run in the thread pool, a thread hop
# per dependency per request, which was most of a read's cost.
async def get_controller(request: Request) -> Controller:
    return request.app.state.controller  # type: ignore[no-any-return]


async def get_telemetry(request: Request) -> Telemetry:
    return request.app.state.telemetry  # type: ignore[no-any-return]


async def get_settings(request: Request) -> ApiSettings:
    return request.app.state.api  # type: ignore[no-any-return]


ControllerDep = Annotated[Controller, Depends(get_controller)]
TelemetryDep = Annotated[Telemetry, Depends(get_telemetry)]
SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
async def get_solver(request: Request) -> SolverGate:
    return request.app.state.api.solver  # type: ignore[no-any-return]


SolverDep = Annotated[SolverGate, Depends(get_solver)]

_bearer = HTTPBearer(auto_error=False, description="the API token ([server] api_token or "
                                                   "BALANCER_API_TOKEN)")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _check(settings: ApiSettings, cred: HTTPAuthorizationCredentials | None) -> None:
    header = f"{cred.scheme} {cred.credentials}" if cred is not None else None
    err = token_error(settings.token(), header)
    if err:
        status, msg, type_ = err
        raise HTTPException(status, detail=[{"loc": ["header", "authorization"], "msg": msg,
                                             "type": type_}],
                            headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


async def require_token(settings: SettingsDep, cred: Credentials) -> None:
    """Mutations and computations: the bearer token, always."""
    _check(settings, cred)


async def require_read_token(settings: SettingsDep, cred: Credentials) -> None:
    """Reads: the bearer token when ``[server] read_auth`` is on."""
    if settings.read_auth:
        _check(settings, cred)


async def no_body(request: Request) -> None:
    """Endpoints that take no body refuse one (the Gate has bounded it already)."""
    if await request.body():
        raise HTTPException(422, detail=[{"loc": ["body"], "type": "extra_body",
                                          "msg": "this endpoint takes no request body"}])


NO_BODY = Depends(no_body)
WRITE_AUTH = Depends(require_token)
READ_AUTH = Depends(require_read_token)


def _calls(route: Any) -> set[Any]:
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return set()
    stack, calls = list(dependant.dependencies), set()
    while stack:
        d = stack.pop()
        calls.add(d.call)
        stack.extend(d.dependencies)
    return calls


def route_level(route: Any) -> str | None:
    """``write``, ``read`` or None: which token mark a route carries (for the Gate)."""
    calls = _calls(route)
    if require_token in calls:
        return WRITE
    if require_read_token in calls:
        return READ
    return None


def takes_solver_slot(route: Any) -> bool:
    """Whether the route runs a solve through the ``SolverGate`` (for the Gate's early 429)."""
    return get_solver in _calls(route)
