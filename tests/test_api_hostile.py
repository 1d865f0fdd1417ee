"""Hostile input against a real uvicorn server: authorization before the body, size limits,
the one error shape, and every POST endpoint x eleven kinds of bad input answered with a 4xx
(never a 5xx or a dropped connection), the service still answering afterwards."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from prometheus_client import CollectorRegistry

from balancer.api.testing import samples_for, serve_in_thread
from balancer.config import parse_config
from balancer.serve_cli import build

SCENARIOS = Path(__file__).parent / "scenarios"
TOKEN = "hostile-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
X = "__HOSTILE__"  # placeholder replaced by the raw JSON text of the hostile value


def scenario(name: str = "hot-cold") -> dict[str, Any]:
    return json.loads((SCENARIOS / f"{name}.json").read_text())


def make(tmp_path: Path, **server: Any) -> tuple[Any, Any]:
    cfg = parse_config({
        "server": {"api_token": TOKEN, **server},
        "loop": {"imbalance_cycles": 1, "cooldown_s": 0},
        "cluster": {"automation": "manual", "time_limit_s": 1.0, "seed": 1},
        "ingest": {"source": "push", "window_s": 300, "stale_after_s": 120},
        "store": {"path": str(tmp_path / "state.db")},
    })
    controller, app, _ = build(cfg, registry=CollectorRegistry())
    return controller, app


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Any]]:
    monkeypatch.delenv("BALANCER_API_TOKEN", raising=False)
    controller, app = make(tmp_path)
    try:
        with serve_in_thread(app) as url:
            yield url, controller
    finally:
        controller.close()


def raw_request(url: str, head: str, body: bytes = b"", timeout: float = 5.0
                ) -> tuple[int, dict[str, Any], float]:
    """Send ``head`` (and ``body``) on a raw socket; (status, JSON reply, seconds to reply)."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        t0 = time.monotonic()
        s.sendall(head.encode("latin-1") + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < _expected(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        took = time.monotonic() - t0
    head_raw, _, rest = data.partition(b"\r\n\r\n")
    status = int(head_raw.split(b" ", 2)[1])
    return status, json.loads(rest), took


def _expected(data: bytes) -> int:
    head, sep, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + len(sep) + int(line.split(b":")[1])
    return 1 << 30


def assert_error_shape(body: dict[str, Any]) -> None:
    assert set(body) == {"detail"} and body["detail"], body
    for item in body["detail"]:
        assert {"loc", "msg", "type"} <= set(item), item
        assert isinstance(item["loc"], list) and isinstance(item["msg"], str)
        assert len(item.get("input", "")) <= 64


# -- authorization before the body, and the size limit ----------------------------------------
def test_20mb_without_token_is_refused_before_the_body_is_read(
        server: tuple[str, Any]) -> None:
    url, controller = server
    host = urlsplit(url).netloc
    n = 20 * 1024 * 1024
    # Only the headers are sent: the answer comes without waiting for a byte of the body.
    status, body, took = raw_request(url, f"POST /v1/metrics HTTP/1.1\r\nHost: {host}\r\n"
                                          f"Content-Type: application/json\r\n"
                                          f"Content-Length: {n}\r\n\r\n")
    assert status == 401 and took < 2.0
    assert body["detail"][0]["loc"] == ["header", "authorization"]
    assert body["detail"][0]["type"] == "unauthorized"
    # With the token, the declared size alone is refused: 413, still without the body.
    status, body, took = raw_request(url, f"POST /v1/metrics HTTP/1.1\r\nHost: {host}\r\n"
                                          f"Authorization: Bearer {TOKEN}\r\n"
                                          f"Content-Type: application/json\r\n"
                                          f"Content-Length: {n}\r\n\r\n")
    assert status == 413 and took < 2.0 and body["detail"][0]["type"] == "too_large"
    assert controller.push.total == 0


def test_a_chunked_body_past_the_limit_is_refused_while_streaming(
        server: tuple[str, Any]) -> None:
    url, _ = server
    u = urlsplit(url)
    chunk = b"[" * 65536
    sent = 0
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(f"POST /v1/inventory HTTP/1.1\r\nHost: {u.netloc}\r\n"
                  f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        while sent < 20 * 1024 * 1024:
            readable, _, _ = select.select([s], [], [], 0)
            if readable:
                break  # the server answered: stop sending
            s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            sent += len(chunk)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply) < _expected(reply):
            more = s.recv(65536)
            if not more:
                break
            reply += more
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    # Refused while streaming: the reply came before the 20 MB were sent (what was sent past
    # 10 MB sat in the two sockets' buffers, a few MB on loopback).
    assert 10 * 1024 * 1024 < sent < 20 * 1024 * 1024
    body = json.loads(reply.partition(b"\r\n\r\n")[2])
    assert_error_shape(body)
    assert body["detail"][0]["type"] == "too_large"


def test_the_limit_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALANCER_API_TOKEN", raising=False)
    controller, app = make(tmp_path, max_body_mb=0.001)  # 1,048 bytes
    try:
        with serve_in_thread(app) as url:
            small = {"samples": samples_for(scenario(), time.time())[:2]}
            big = {"samples": samples_for(scenario(), time.time())[:40]}
            assert httpx.post(f"{url}/v1/metrics", json=small, headers=AUTH).status_code == 200
            r = httpx.post(f"{url}/v1/metrics", json=big, headers=AUTH)
            assert r.status_code == 413 and r.json()["detail"][0]["loc"] == ["body"]
    finally:
        controller.close()


def test_compute_endpoints_need_the_token(server: tuple[str, Any]) -> None:
    url, _ = server
    r = httpx.post(f"{url}/v1/whatif", json={"snapshot": scenario()})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["detail"][0]["loc"] == ["header", "authorization"]
    r = httpx.post(f"{url}/v1/placement", json={"name": "n", "vcpus": 1, "mem_mb": 1},
                   headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    # Reads stay open unless [server] read_auth is on.
    assert httpx.get(f"{url}/v1/recommendations").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_read_auth_protects_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALANCER_API_TOKEN", raising=False)
    controller, app = make(tmp_path, read_auth=True)
    try:
        with serve_in_thread(app) as url:
            for path in ("/v1/recommendations", "/v1/history", "/v1/cluster", "/metrics"):
                r = httpx.get(f"{url}{path}")
                assert r.status_code == 401, path
                assert_error_shape(r.json())
            assert httpx.get(f"{url}/v1/recommendations", headers=AUTH).status_code == 200
            assert httpx.get(f"{url}/metrics", headers=AUTH).status_code == 200
            assert httpx.get(f"{url}/healthz").status_code == 200  # probes stay open
            schema = httpx.get(f"{url}/openapi.json").json()
            assert schema["paths"]["/v1/cluster"]["get"]["security"]
            assert "401" in schema["paths"]["/v1/cluster"]["get"]["responses"]
    finally:
        controller.close()


def test_a_422_echoes_only_a_short_prefix(server: tuple[str, Any]) -> None:
    url, _ = server
    huge = "x" * 2_000_000
    r = httpx.post(f"{url}/v1/placement", json={"name": "n", "vcpus": huge, "mem_mb": 1},
                   headers=AUTH)
    assert r.status_code == 422 and len(r.content) < 2000
    item = r.json()["detail"][0]
    assert item["loc"] == ["body", "vcpus"] and item["input"] == "x" * 61 + "..."
    doc = scenario()
    doc["hosts"][0]["name"] = huge
    r = httpx.post(f"{url}/v1/inventory", json=doc, headers=AUTH)
    assert r.status_code == 422 and len(r.content) < 2000
    assert r.json()["detail"][0]["loc"] == ["body", "hosts", 0, "name"]


def test_a_bad_inventory_is_refused_and_breaks_nothing(server: tuple[str, Any]) -> None:
    url, _ = server
    with httpx.Client(base_url=url, headers=AUTH) as c:
        assert c.post("/v1/inventory", json=scenario()).status_code == 200
        for field, value, where in (("name", "\ud800", "name"),
                                    ("cpu_capacity", 1e-300, "cpu_capacity"),
                                    ("mem_capacity_mb", 1e308, "mem_capacity_mb"),
                                    ("name", "h\x00", "name")):
            doc = scenario()
            doc["hosts"][1][field] = value
            r = c.post("/v1/inventory", content=json.dumps(doc).encode(),
                       headers={"Content-Type": "application/json"})
            assert r.status_code == 422, (field, r.text)
            assert r.json()["detail"][0]["loc"] == ["body", "hosts", 1, where]
        assert c.get("/v1/cluster").status_code == 200
        assert c.get("/metrics").status_code == 200
        r = c.post("/v1/placement", content=json.dumps({"name": "\ud800x", "vcpus": 1,
                                                        "mem_mb": 1}).encode(),
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"]
        r = c.post("/v1/metrics", json={"samples": [
            {"ts": time.time(), "vm": "\u0085", "cpu_cores": 1, "mem_mb": 1}]})
        assert r.status_code == 422


# -- every POST endpoint x eleven hostile inputs ---------------------------------------------
def _bodies() -> dict[str, tuple[dict[str, Any], dict[str, str]]]:
    """A valid body per endpoint with placeholders: kind -> the field it goes into."""
    snap = scenario()
    return {
        "/v1/inventory": (snap, {}),
        "/v1/whatif": ({"snapshot": snap, "time_limit_s": 0.5}, {}),
        "/v1/metrics": ({"samples": [{"ts": 1.7e9, "vm": "a0", "cpu_cores": 1.0,
                                      "mem_mb": 100.0}]}, {}),
        "/v1/placement": ({"name": "new", "vcpus": 1, "mem_mb": 512}, {}),
    }


def _inject(endpoint: str, kind: str) -> bytes:
    """The body for ``endpoint`` carrying the hostile input ``kind``."""
    body, _ = _bodies()[endpoint]
    body = json.loads(json.dumps(body))
    # Where each kind goes: a number, a name, a capacity, a vCPU count.
    if endpoint in ("/v1/inventory", "/v1/whatif"):
        s = body if endpoint == "/v1/inventory" else body["snapshot"]
        num, name, cap, vcpu = ((s["hosts"][0], "cpu_capacity"), (s["hosts"][0], "name"),
                                (s["hosts"][0], "mem_capacity_mb"), (s["vms"][0], "vcpus"))
    elif endpoint == "/v1/metrics":
        smp = body["samples"][0]
        num, name, cap, vcpu = (smp, "cpu_cores"), (smp, "vm"), (smp, "mem_mb"), \
            (smp, "cpu_cores")
        if kind == "capacity_1e-300":
            cap = (smp, "ts")  # samples carry no capacity: a time of 1e-300 s is as absurd
    else:
        num, name, cap, vcpu = (body, "mem_mb"), (body, "name"), (body, "mem_mb"), \
            (body, "vcpus")
    raw = {"nan": "NaN", "infinity": "Infinity", "1e309": "1e309",
           "surrogate": '"\\ud800"', "capacity_1e308": "1e308", "capacity_1e-300": "1e-300",
           "vcpus_1e18": "1e18", "int_400_digits": "9" * 400,
           "deep_nesting": "[" * 5000 + "]" * 5000}
    if kind == "truncated":
        text = json.dumps(body)
        return text[: len(text) // 2].encode()
    if kind == "wrong_types":
        return json.dumps([body]).encode() if endpoint != "/v1/placement" else \
            json.dumps({**body, "vcpus": "four", "mem_mb": [1]}).encode()
    target = {"surrogate": name, "capacity_1e308": cap, "capacity_1e-300": cap,
              "vcpus_1e18": vcpu}.get(kind, num)
    target[0][target[1]] = X
    return json.dumps(body).replace(json.dumps(X), raw[kind]).encode()


KINDS = ["nan", "infinity", "1e309", "surrogate", "capacity_1e308", "capacity_1e-300",
         "vcpus_1e18", "int_400_digits", "deep_nesting", "truncated", "wrong_types"]
# Endpoints without a body get the hostile value where they take input: in the path, and as
# a body they must refuse.
PATH_VALUE = {"nan": "NaN", "infinity": "Infinity", "1e309": "1e309",
              "surrogate": "\ud800", "capacity_1e308": "1e308", "capacity_1e-300": "1e-300",
              "vcpus_1e18": "1000000000000000000", "int_400_digits": "9" * 400,
              "deep_nesting": "[" * 5000, "truncated": '{"a": ', "wrong_types": "[]"}


def test_every_post_endpoint_refuses_hostile_input_with_a_4xx(server: tuple[str, Any]) -> None:
    url, controller = server
    doc = scenario()
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        assert c.post("/v1/inventory", json=doc).status_code == 200
        assert c.post("/v1/metrics", json={"samples": samples_for(doc, time.time())}
                      ).status_code == 200
        assert c.post("/v1/cycle").status_code == 200
        rec = c.get("/v1/recommendations").json()[0]["id"]
        before = c.get("/v1/cluster").json()
        results: dict[tuple[str, str], int] = {}
        for kind in KINDS:
            for endpoint in _bodies():
                r = c.post(endpoint, content=_inject(endpoint, kind),
                           headers={"Content-Type": "application/json"})
                results[(endpoint, kind)] = r.status_code
                if 400 <= r.status_code < 500:
                    assert_error_shape(r.json())
            v = PATH_VALUE[kind]
            hostile_body = _inject("/v1/placement", kind)
            q = quote(v, errors="surrogatepass")
            for label, endpoint in (("apply {x}", f"/v1/recommendations/{q}/apply"),
                                    ("dismiss {x}", f"/v1/recommendations/{q}/dismiss"),
                                    ("enter {x}", f"/v1/hosts/{q}/maintenance/enter"),
                                    ("exit {x}", f"/v1/hosts/{q}/maintenance/exit"),
                                    ("apply + body", f"/v1/recommendations/{rec}/apply"),
                                    ("cycle + body", "/v1/cycle"),
                                    ("enter h1 + body", "/v1/hosts/h1/maintenance/enter")):
                r = c.post(endpoint, content=hostile_body,
                           headers={"Content-Type": "application/json"})
                results[(label, kind)] = r.status_code
                if 400 <= r.status_code < 500:
                    assert_error_shape(r.json())
        bad = {k: s for k, s in results.items() if not 400 <= s < 500}
        assert not bad, bad
        assert len(results) == 11 * 11
        # The service still answers, and nothing hostile got in.
        assert c.get("/healthz").status_code == 200
        after = c.get("/v1/cluster")
        assert after.status_code == 200
        assert [h["name"] for h in after.json()["hosts"]] == [h["name"] for h in before["hosts"]]
        assert c.get("/metrics").status_code == 200
        assert c.get(f"/v1/recommendations/{rec}").json()["state"] == "pending"
    assert controller.inventory.hosts[0].state.value == "active"
