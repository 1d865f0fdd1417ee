"""The web console: server-rendered pages at ``/ui/`` over the controller, from package files.

``mount_console(app, controller, telemetry)`` adds everything to the API's FastAPI app:

- ``/`` redirects to ``/ui/``; pages ``/ui/`` (cluster), ``/ui/hosts/{host}``,
  ``/ui/recommendations``, ``/ui/migrations``, ``/ui/whatif``, ``/ui/automation``;
- ``/ui/part/{name}`` (``summary``, ``cluster``, ``host``, ``recommendations``, ``history``,
  ``automation``): the same pages' live regions as HTML fragments with an ``ETag`` (the
  console's script swaps them in, htmx-style, and gets ``304`` when nothing changed);
- ``/ui/events``: the executor's migration events as server-sent events (``balancer.events``);
- ``/ui/static/...``: the stylesheet and the script (no CDN: the console works air-gapped);
- the JSON endpoints the console needs beyond the core API are in ``balancer.api.automation``
  (automation level and per-VM overrides, the what-if plan of the current cluster, a token
  check).

Templates and static files are package data (``balancer/console/templates``, ``static``).
Mutations go through the JSON API with ``Authorization: Bearer``; the browser keeps the token in
``sessionStorage`` (this tab, this session), and the console sets no cookie, so a page on
another site cannot make the browser act with the operator's rights (no CSRF).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from balancer.console import views
from balancer.errors import BalancerError

log = logging.getLogger("balancer.console")

PAGES = (("cluster", "/ui/", "Cluster"), ("recommendations", "/ui/recommendations",
                                          "Recommendations"),
         ("migrations", "/ui/migrations", "Migrations"), ("whatif", "/ui/whatif", "What-if"),
         ("automation", "/ui/automation", "Automation"))
# A server-sent event stream ends after this long; the browser reconnects at once (``retry``)
# and is sent what is in flight again. Bounded streams let the server stop promptly.
STREAM_S = 25.0
KEEPALIVE_S = 10.0
READ_AUTH_PAGE = ("<!doctype html><html lang=en><meta charset=utf-8><title>balancer</title>"
                  "<p>This service requires the API token for reads (<code>[server] "
                  "read_auth</code>), which a browser cannot send when it opens a page: the "
                  "console is off. Use the API with <code>Authorization: Bearer</code>.</p>")


def _env() -> Environment:
    root = resources.files("balancer.console")
    env = Environment(loader=FileSystemLoader(str(root / "templates")),
                      autoescape=select_autoescape(["html"]), trim_blocks=True,
                      lstrip_blocks=True, auto_reload=False)
    env.filters["pct"] = views.pct
    env.filters["mib"] = lambda x: "–" if x is None else f"{x / 1024:.1f} GiB"
    env.filters["num"] = lambda x, d=3: "–" if x is None else f"{x:.{d}f}"
    env.filters["ago"] = _ago
    env.filters["clock"] = lambda t: "–" if t is None else time.strftime(
        "%H:%M:%S", time.localtime(t))
    return env


def _ago(age: float | None) -> str:
    if age is None:
        return "no sample"
    if age < 120:
        return f"{age:.0f} s ago"
    if age < 7200:
        return f"{age / 60:.0f} min ago"
    return f"{age / 3600:.1f} h ago"


def mount_console(app: FastAPI, controller: Any, telemetry: Any) -> None:
    """Serve the console at ``/ui/`` on ``app`` (``/`` redirects there).

    With ``[server] read_auth`` on (``app.state.api.read_auth``), reads need the bearer token,
    which a browser cannot send when it navigates: the console's pages, fragments and event
    stream then answer 401 with a short explanation instead of showing the cluster.
    """
    from balancer.api.automation import restore

    env = _env()
    bus = telemetry.events
    settings = getattr(app.state, "api", None)
    read_auth = bool(getattr(settings, "read_auth", False))
    restore(controller)
    static = resources.files("balancer.console") / "static"
    app.mount("/ui/static", StaticFiles(directory=str(static)), name="console-static")

    def cluster_ctx(_: Request) -> dict[str, Any]:
        return {"c": views.cluster_view(views.summary(controller),
                                        controller.cfg.cluster.threshold)}

    def host_ctx(request: Request) -> dict[str, Any]:
        name = request.path_params.get("host") or request.query_params.get("host", "")
        return {"h": views.host_view(controller, name), "name": name}

    def recs_ctx(_: Request) -> dict[str, Any]:
        recs = controller.store.recommendations("pending")
        decided = [r for st in ("applying", "applied", "failed", "dismissed")
                   for r in controller.store.recommendations(st, 15)]
        recent = sorted(decided, key=lambda r: (-r["updated"], -r["id"]))[:15]
        power = [r for r in recs if r["kind"] in ("standby", "wake")]
        moves = [r for r in recs if r["kind"] not in ("standby", "wake")]
        return {"groups": views.wave_groups(moves, _waves(controller, moves)),
                "power": power, "n": len(recs), "recent": recent}

    def history_ctx(_: Request) -> dict[str, Any]:
        return {"history": controller.store.migrations(limit=50)}

    def automation_ctx(_: Request) -> dict[str, Any]:
        state = views.summary(controller)
        c = controller.cfg.cluster
        return {"automation": c.automation, "overrides": sorted(c.vm_automation.items()),
                "threshold": c.threshold, "max_migrations": c.max_migrations,
                "hosts": state["hosts"]}

    parts: dict[str, tuple[str, Callable[[Request], dict[str, Any]]]] = {
        "cluster": ("_cluster.html", cluster_ctx),
        "summary": ("_summary.html", cluster_ctx),
        "host": ("_host.html", host_ctx),
        "recommendations": ("_recommendations.html", recs_ctx),
        "history": ("_history.html", history_ctx),
        "automation": ("_automation.html", automation_ctx),
    }

    def render(template_: str, /, **ctx: Any) -> str:
        return env.get_template(template_).render(pages=PAGES, **ctx)

    # The cluster fragment of a big cluster is the costly one: it is rendered once per
    # estimate (the controller's view object), configuration and cycle, whoever asks.
    memo: dict[str, Any] = {"key": None, "html": {}}
    memo_lock = threading.Lock()

    def render_part(name: str, request: Request) -> tuple[str, dict[str, Any]]:
        template, fn = parts[name]
        view_of = getattr(controller, "current_view", None)
        if name not in ("cluster", "summary") or view_of is None:
            ctx = fn(request)
            return render(template, **ctx), ctx
        with memo_lock:
            view = view_of()
            key = (id(view), view.built, id(controller.cfg),
                   id(getattr(controller, "last_cycle", None)))
            if memo["key"] != key:
                memo.update(key=key, view=view, ctx=fn(request), html={})
            if name not in memo["html"]:
                memo["html"][name] = render(template, **memo["ctx"])
            return memo["html"][name], memo["ctx"]

    def page(template: str, active: str, title: str, part_name: str | None = None, *,
             extra: Callable[[Request], dict[str, Any]] | None = None) -> Callable[..., Any]:
        def handler(request: Request) -> HTMLResponse:
            if read_auth:
                return HTMLResponse(READ_AUTH_PAGE, status_code=401)
            ctx: dict[str, Any] = {"active": active, "title": title}
            if part_name is not None:
                html, pctx = render_part(part_name, request)
                ctx.update(pctx, part=Markup(html), etag=_etag(html.encode()))
            if part_name == "cluster":
                html, _ = render_part("summary", request)
                ctx.update(summary_part=Markup(html), summary_etag=_etag(html.encode()))
            if extra is not None:
                ctx.update(extra(request))
            return HTMLResponse(render(template, **ctx),
                                headers={"Cache-Control": "no-store"})
        return handler

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @app.get("/ui", include_in_schema=False)
    def ui_no_slash() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    app.get("/ui/", include_in_schema=False)(page("cluster.html", "cluster", "Cluster",
                                                   "cluster"))
    app.get("/ui/recommendations", include_in_schema=False)(
        page("recommendations.html", "recommendations", "Recommendations", "recommendations"))
    app.get("/ui/migrations", include_in_schema=False)(
        page("migrations.html", "migrations", "Migrations", "history"))
    app.get("/ui/whatif", include_in_schema=False)(
        page("whatif.html", "whatif", "What-if", extra=lambda _: {
            "threshold": controller.cfg.cluster.threshold,
            "max_migrations": controller.cfg.cluster.max_migrations,
            "time_limit_s": controller.cfg.cluster.time_limit_s}))
    app.get("/ui/automation", include_in_schema=False)(
        page("automation.html", "automation", "Automation", "automation"))

    host_page = page("host.html", "cluster", "Host", "host",
                     extra=lambda r: {"name": r.path_params["host"]})

    @app.get("/ui/hosts/{host}", include_in_schema=False)
    def host(request: Request, host: str) -> HTMLResponse:
        resp = host_page(request)
        inv = controller.inventory
        if inv is None or host not in inv.host_index:
            resp.status_code = 404
        return resp

    @app.get("/ui/part/{name}", include_in_schema=False)
    def part(request: Request, name: str) -> Response:
        if read_auth:
            return Response(READ_AUTH_PAGE, status_code=401, media_type="text/html")
        if name not in parts:
            return Response(f"no part {name!r}", status_code=404, media_type="text/plain")
        body = render_part(name, request)[0].encode()
        etag = _etag(body)
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type="text/html; charset=utf-8", headers=headers)

    @app.get("/ui/events", include_in_schema=False)
    async def events(request: Request) -> Response:
        if read_auth:
            return Response(READ_AUTH_PAGE, status_code=401, media_type="text/html")
        return StreamingResponse(_stream(request, bus, controller.stopping),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})


def _etag(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def _sse(event: dict[str, Any]) -> bytes:
    return (f"id: {event.get('seq', 0)}\nevent: migration\n"
            f"data: {json.dumps(event, separators=(',', ':'))}\n\n").encode()


async def _stream(request: Request, bus: Any, stopping: Any) -> AsyncIterator[bytes]:
    """What is in flight now, then every new event, until the client goes or time is up."""
    sub = bus.subscribe()
    try:
        yield b"retry: 500\n\n"
        for ev in bus.in_flight():
            yield _sse(dict(ev, replay=True))
        t0 = last = time.monotonic()
        while True:
            for ev in sub.drain():
                yield _sse(ev)
                last = time.monotonic()
            now = time.monotonic()
            if now - t0 > STREAM_S or stopping.is_set() or await request.is_disconnected():
                return
            if now - last > KEEPALIVE_S:
                yield b": keep-alive\n\n"
                last = now
            await asyncio.sleep(0.1)
    finally:
        sub.close()


def _waves(controller: Any, recs: list[dict[str, Any]]) -> dict[str, int] | None:
    """VM -> executor wave of the pending recommendations, as the planner would run them."""
    if not recs:
        return {}
    from balancer.model import Move
    from balancer.planner import PlannerLimits, make_waves

    inv = controller.inventory
    if inv is None:
        return None
    c = controller.exec_cfg
    limits = PlannerLimits(max_incoming_per_host=c.limits.max_incoming_per_host,
                           max_outgoing_per_host=c.limits.max_outgoing_per_host,
                           max_concurrent=c.limits.max_concurrent,
                           mem_overcommit=c.limits.mem_overcommit,
                           bandwidth_mbps=c.migration.bandwidth_mbps,
                           dirty_rate_mbps=c.migration.dirty_rate_mbps,
                           downtime_ms=c.migration.downtime_ms)
    moves = [Move(vm=r["vm"], source=r["source"], target=r["target"], reason=r["reason"],
                  mem=r["mem_mb"]) for r in recs
             if r["vm"] in inv.vm_index and inv.vms[inv.vm_index[r["vm"]]].host == r["source"]]
    try:
        waves = make_waves(inv, moves, limits)
    except (BalancerError, ValueError) as exc:  # display only: fall back to one group
        log.debug("no waves for the pending recommendations: %s", exc)
        return None
    out: dict[str, int] = {}
    for m in waves.migrations:
        out.setdefault(m.vm, m.wave)
    return out
