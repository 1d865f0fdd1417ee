"""The gate in front of the app (pure ASGI): authorization, then the body size limit.

Nothing of a request is parsed before its token is checked: the middleware finds the route
from the method and path, and if that route needs the token (every mutation and computation;
reads too with ``[server] read_auth``), checks the ``Authorization`` header and answers
401/403 without reading a byte of the body. Then the body is read here, up to
``max_body_bytes``: a ``Content-Length`` above it is refused at once with 413, and a body that
streams (chunked) past it is refused with 413 as soon as it does. The app gets the body only
once it is known to fit.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Any

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from balancer.api.errors import body, item

WRITE = "write"  # route marks (balancer.api.deps.route_level)
READ = "read"


def token_error(expected: str | None, authorization: str | None
                ) -> tuple[int, str, str] | None:
    """(status, message, type) when ``authorization`` does not carry ``expected``."""
    if not expected:
        return (403, "this endpoint is disabled: no API token configured "
                     "(set [server] api_token or BALANCER_API_TOKEN)", "forbidden")
    scheme, _, cred = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(cred.strip().encode(),
                                                                expected.encode()):
        return 401, "missing or wrong bearer token", "unauthorized"
    return None


async def _send_error(send: Send, status: int, msg: str, loc: list[Any], type_: str,
                      headers: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    payload = body([item(loc, msg, type_)])
    # No "Connection: close": uvicorn then discards the rest of an unread body (up to its
    # keep-alive timeout) instead of resetting the connection, so the client sees this reply.
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


def operations(spec: dict[str, Any]) -> list[tuple[re.Pattern[str], str, bool, bool]]:
    """(path regex, METHOD, needs the token, takes a solver slot) of every documented
    operation."""
    out = []
    for template, ops in spec.get("paths", {}).items():
        regex, _, _ = compile_path(template)
        for method, op in ops.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            out.append((regex, method.upper(), bool(op.get("security")),
                        "429" in op["responses"]))
    return out


def allowed_methods(spec: dict[str, Any], path: str) -> list[str]:
    """The documented methods of every operation on ``path`` (for a 405's ``Allow``)."""
    return sorted({m for regex, m, _, _ in operations(spec) if regex.match(path)})


class Gate:
    """ASGI middleware: token check (before the body), then a bounded body read."""

    def __init__(self, app: ASGIApp, *, spec: Callable[[], dict[str, Any]],
                 token: Callable[[], str | None], read_auth: bool, max_body_bytes: int,
                 solver_full: Callable[[], int | None] = lambda: None) -> None:
        self.app = app
        self.spec = spec  # the app's OpenAPI document: which operation needs what
        self.token = token
        self.read_auth = read_auth
        self.max_body_bytes = max_body_bytes
        self.solver_full = solver_full  # Retry-After seconds when every slot is busy, or None
        self._table: list[tuple[re.Pattern[str], str, bool, bool]] | None = None

    def _route(self, scope: Scope) -> tuple[bool, bool]:
        """(needs the token, takes a solver slot) for this request.

        Read from the OpenAPI document, the contract every router (ours and those mounted by
        other parts, such as the console) declares: an operation with a security requirement
        needs the token; one that documents 429 takes a solver slot. ``/metrics`` is not in the
        document; it is a read.
        """
        if self._table is None:
            self._table = operations(self.spec())
        path, method = scope.get("path", ""), scope.get("method", "")
        if path == "/metrics" and method in ("GET", "HEAD"):
            return self.read_auth, False
        for regex, m, secured, solves in self._table:
            if m == method and regex.match(path):
                return secured, solves
        return False, False  # 404/405 come from the router; nothing is done for them

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        needs_token, solves = self._route(scope)
        if needs_token:
            auth = headers.get(b"authorization")
            err = token_error(self.token(), auth.decode("latin-1") if auth else None)
            if err:
                status, msg, type_ = err
                extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
                await _send_error(send, status, msg, ["header", "authorization"], type_, extra)
                return
        if solves:
            retry = self.solver_full()
            if retry is not None:  # refused before the body is read or parsed
                await _send_error(send, 429, "all solver slots are busy; retry later", [],
                                  "busy", [(b"retry-after", str(retry).encode())])
                return
        limit = self.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                await _send_error(send, 400, "Content-Length is not a number",
                                  ["header", "content-length"], "bad_request")
                return
            if n > limit:
                await _send_error(send, 413, f"request body of {n} bytes is larger than the "
                                  f"limit of {limit} bytes", ["body"], "too_large")
                return
        elif b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_error(send, 413, f"request body is larger than the limit of "
                                  f"{limit} bytes", ["body"], "too_large")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        buffered = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": buffered, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
