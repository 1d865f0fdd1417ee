"""/docs and /redoc work without internet: every URL their HTML references is served by the
app itself (no other host), and every asset loads."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from prometheus_client import CollectorRegistry

from balancer.api.testing import serve_in_thread
from balancer.config import parse_config
from balancer.serve_cli import build

URL_ATTR = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
JS_URL = re.compile(r"""(?:url|spec-url)\s*:\s*['"]([^'"]+)['"]""")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets(tmp_path: Path, page: str) -> None:
    cfg = parse_config({"store": {"path": str(tmp_path / "state.db")}})
    controller, app, _ = build(cfg, registry=CollectorRegistry())
    try:
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as c:
            r = c.get(page)
            assert r.status_code == 200 and "text/html" in r.headers["content-type"]
            html = r.text
            refs = URL_ATTR.findall(html) + JS_URL.findall(html)
            assert refs, html
            for ref in refs:
                full = urljoin(f"{url}{page}", ref)
                assert urlsplit(full).netloc == urlsplit(url).netloc, ref
            # No absolute URL to another host anywhere in the page (CDN, fonts, validator).
            others = [u for u in re.findall(r"https?://[^\s\"'<>)]+", html)
                      if urlsplit(u).netloc != urlsplit(url).netloc]
            assert others == [], others
            scripts = [x for x in refs if x.endswith(".js")]
            assert scripts, refs
            for ref in refs:
                a = c.get(urljoin(f"{url}{page}", ref))
                assert a.status_code == 200 and len(a.content) > 0, ref
            assert c.get("/openapi.json").json()["info"]["title"] == "balancer"
    finally:
        controller.close()
