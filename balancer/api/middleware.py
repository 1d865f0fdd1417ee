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

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from balancer.api.errors import body, item

WRITE = "write"
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


class Gate:
    """ASGI middleware: token check (before the body), then a bounded body read."""

    def __init__(self, app: ASGIApp, *, table: list[tuple[re.Pattern[str], set[str], str]],
                 token: Callable[[], str | None], read_auth: bool, max_body_bytes: int) -> None:
        self.app = app
        self.table = table  # (path regex, methods, level) of every route that has a level
        self.token = token
        self.read_auth = read_auth
        self.max_body_bytes = max_body_bytes

    def _needs_token(self, scope: Scope) -> bool:
        path, method = scope.get("path", ""), scope.get("method", "")
        for regex, methods, level in self.table:
            if method in methods and regex.match(path):
                return level == WRITE or (level == READ and self.read_auth)
        return False  # 404/405 come from the router; nothing is done for them

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self._needs_token(scope):
            auth = headers.get(b"authorization")
            err = token_error(self.token(), auth.decode("latin-1") if auth else None)
            if err:
                status, msg, type_ = err
                extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
                await _send_error(send, status, msg, ["header", "authorization"], type_, extra)
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
