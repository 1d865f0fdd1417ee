"""One error shape for every 4xx/5xx: ``{"detail": [{"loc", "msg", "type"}]}``.

Inputs are echoed only as a short prefix (``input``, at most ``ECHO`` characters), messages are
cut at ``MAX_MSG`` characters and every string is made encodable (a lone surrogate in a posted
name cannot break the reply). ``responses(...)`` documents the codes of an endpoint with this
schema in OpenAPI.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from balancer.daemon import Conflict, NotFound, Unavailable
from balancer.errors import BalancerError, InfeasibleError, InputError, SnapshotError

ECHO = 64
MAX_MSG = 500
MAX_ITEMS = 20

_WHERE = re.compile(r"^(hosts|vms|rules)\[(\d+)\]")
_FIELD = re.compile(r"field '([^']+)'")
_TOP = re.compile(r"^(hosts|vms|rules)\b")


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="where: e.g. [\"body\", \"vms\", 3, \"host\"]")
    msg: str = Field(description="what is wrong, in one line")
    type: str = Field(description="a stable error kind, e.g. missing, finite_number, "
                                  "unauthorized, too_large, busy")
    input: str | None = Field(None, description=f"the first {ECHO} characters of the value "
                                                "at fault, when there is one")
    culprits: list[str] | None = Field(None, description="409 infeasible: what conflicts")


class ErrorBody(BaseModel):
    detail: list[ErrorItem]


DESCRIPTIONS = {
    400: "The body could not be read (e.g. nested too deeply)",
    401: "Missing or wrong bearer token",
    403: "No API token configured on the server: the endpoint is refused",
    404: "The named item does not exist",
    409: "Not possible in the current state (not pending, name taken, infeasible)",
    413: "Request body larger than [server] max_body_mb",
    422: "Invalid input; loc names the field",
    429: "Every solver slot is busy; retry after Retry-After seconds",
    503: "Not ready (no inventory), the engine failed, or the solve hit the wall-clock cap",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for these error codes, all with the ``ErrorBody`` schema."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        item: dict[str, Any] = {"model": ErrorBody, "description": DESCRIPTIONS[code]}
        if code == 429:
            item["headers"] = {"Retry-After": {
                "description": "seconds until a solver slot is expected to be free",
                "required": True, "schema": {"type": "integer", "minimum": 1}}}
        if code == 401:
            item["headers"] = {"WWW-Authenticate": {
                "description": "Bearer", "required": True, "schema": {"type": "string"}}}
        out[code] = item
    return out


def clean(text: str, limit: int = MAX_MSG) -> str:
    """``text`` cut to ``limit`` characters, lone surrogates and the like escaped."""
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def echo(value: Any) -> str:
    """A short, encodable prefix of an input value."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (ValueError, RecursionError, TypeError):
            text = repr(value)
    return clean(text, ECHO)


def item(loc: Iterable[Any], msg: str, type_: str, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "loc": [x if isinstance(x, int) and not isinstance(x, bool) else clean(str(x), 100)
                for x in loc],
        "msg": clean(msg), "type": type_}
    for k, v in extra.items():
        if v is not None:
            out[k] = v
    return out


def body(items: list[dict[str, Any]]) -> bytes:
    return json.dumps({"detail": items[:MAX_ITEMS]}, ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def error_response(status: int, msg: str, loc: Iterable[Any] = (), type_: str = "error",
                   headers: dict[str, str] | None = None, **extra: Any) -> Response:
    return Response(body([item(loc, msg, type_, **extra)]), status_code=status,
                    headers=headers, media_type="application/json")


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


class SolveTimeout(BalancerError):
    """An HTTP-requested solve ran past the wall-clock cap."""


class Busy(BalancerError):
    """Every solver slot is taken."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _validation_items(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors()[:MAX_ITEMS]:
        loc = list(err.get("loc", ()))
        type_ = str(err.get("type", "value_error"))
        msg = str(err.get("msg", "invalid"))
        if type_ == "json_invalid":
            ctx = err.get("ctx") or {}
            msg = f"not valid JSON: {ctx.get('error', msg)} at character {loc[-1]}" \
                if loc and isinstance(loc[-1], int) else f"not valid JSON: {msg}"
            loc = ["body"]
        extra: dict[str, Any] = {}
        if "input" in err and type_ not in ("missing", "json_invalid"):
            extra["input"] = echo(err["input"])
        out.append(item(loc, msg, type_, **extra))
    return out


def install_handlers(app: FastAPI) -> None:
    """Every exception the API raises becomes the one error shape."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        return Response(body(_validation_items(exc)), status_code=422,
                        media_type="application/json")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        d = exc.detail
        if isinstance(d, list) and all(isinstance(x, dict) for x in d):
            items = [item(x.get("loc", ()), str(x.get("msg", "")), str(x.get("type", "error")))
                     for x in d]
        else:
            kind = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(
                exc.status_code, "http_error")
            loc = ["body"] if exc.status_code == 400 else ["path"] if exc.status_code in (
                404, 405) else []
            items = [item(loc, str(d), kind)]
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Every method of the path, not only those of the first route that matched it.
            from balancer.api.middleware import allowed_methods

            documented = allowed_methods(request.app.openapi(), request.url.path)
            if documented:
                headers["Allow"] = ", ".join(documented)
        return Response(body(items), status_code=exc.status_code, headers=headers or None,
                        media_type="application/json")

    @app.exception_handler(SnapshotError)
    async def _snapshot_error(_: Request, exc: SnapshotError) -> Response:
        prefix = getattr(exc, "_loc_prefix", ("body",))
        return error_response(422, str(exc), snapshot_loc(str(exc), prefix), "snapshot")

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> Response:
        return error_response(404, str(exc), exc.loc, "not_found")

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, exc: Conflict) -> Response:
        f = _FIELD.search(str(exc))
        return error_response(409, str(exc), ["body", f.group(1)] if f else [], "conflict")

    @app.exception_handler(InputError)
    async def _input_error(_: Request, exc: InputError) -> Response:
        f = _FIELD.search(str(exc))
        return error_response(422, str(exc), ["body", f.group(1)] if f else ["body"],
                              "value_error")

    @app.exception_handler(InfeasibleError)
    async def _infeasible(_: Request, exc: InfeasibleError) -> Response:
        return error_response(409, str(exc), ["body"], "infeasible",
                              culprits=[clean(str(c), 200) for c in exc.culprits][:100])

    @app.exception_handler(Busy)
    async def _busy(_: Request, exc: Busy) -> Response:
        return error_response(429, str(exc), [], "busy",
                              headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(SolveTimeout)
    async def _timeout(_: Request, exc: SolveTimeout) -> Response:
        return error_response(503, str(exc), [], "solve_timeout")

    @app.exception_handler(Unavailable)
    async def _unavailable(_: Request, exc: Unavailable) -> Response:
        return error_response(503, str(exc), [], "unavailable")

    @app.exception_handler(BalancerError)
    async def _balancer_error(_: Request, exc: BalancerError) -> Response:
        return error_response(503, f"failed: {exc}", [], "failed")
