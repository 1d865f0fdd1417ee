"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) from local assets: nothing from another host.

KVM clusters are often air-gapped, so the pages load their JavaScript, CSS and favicon from
files installed with the ``fastapi-offline`` package (Swagger UI and ReDoc builds), served by
the app under ``/static/docs``; the Swagger validator badge and ReDoc's Google fonts are off.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = "/static/docs"


def install(app: FastAPI) -> None:
    """Serve the docs pages on ``app`` (built with ``docs_url=None, redoc_url=None``)."""
    assets = resources.files("fastapi_offline").joinpath("static")
    app.mount(STATIC, StaticFiles(directory=str(assets)), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}", title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
            swagger_js_url=f"{root}{STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None})

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}{openapi_url}", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{STATIC}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{STATIC}/favicon.png",
                              with_google_fonts=False)
