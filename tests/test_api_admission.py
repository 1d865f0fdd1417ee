"""Solves requested over HTTP are admitted into a bounded number of slots (429 with
Retry-After when none is free) and capped in wall time (503), on a real uvicorn server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client import CollectorRegistry

from balancer.api.testing import serve_in_thread
from balancer.config import parse_config
from balancer.serve_cli import build
from simulator.generate import generate

TOKEN = "admission-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make(tmp_path: Path, **server: Any) -> tuple[Any, Any]:
    cfg = parse_config({
        "server": {"api_token": TOKEN, **server},
        "cluster": {"time_limit_s": 1.0, "seed": 1},
        "store": {"path": str(tmp_path / "state.db")},
    })
    controller, app, _ = build(cfg, registry=CollectorRegistry())
    return controller, app


@pytest.fixture
def no_env_token(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("BALANCER_API_TOKEN", raising=False)
    yield


def test_extra_solves_get_429_with_retry_after(tmp_path: Path, no_env_token: None) -> None:
    controller, app = make(tmp_path, max_concurrent_solves=2)
    doc = generate(16, 200, seed=7)
    statuses: list[int] = []
    replies: list[httpx.Response] = []
    lock = threading.Lock()
    try:
        with serve_in_thread(app) as url:
            def one() -> None:
                r = httpx.post(f"{url}/v1/whatif", json={"snapshot": doc, "time_limit_s": 2},
                               headers=AUTH, timeout=60)
                with lock:
                    statuses.append(r.status_code)
                    replies.append(r)

            threads = [threading.Thread(target=one) for _ in range(8)]
            for t in threads:
                t.start()
            time.sleep(0.3)
            t0 = time.monotonic()
            assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
            assert time.monotonic() - t0 < 5
            for t in threads:
                t.join()
            # Once the slots are free again, a what-if is admitted.
            r = httpx.post(f"{url}/v1/whatif", json={"snapshot": doc, "time_limit_s": 1},
                           headers=AUTH, timeout=60)
            assert r.status_code == 200, r.text
    finally:
        controller.close()
    assert set(statuses) <= {200, 429}, statuses
    assert 1 <= statuses.count(200) and statuses.count(429) >= 1, statuses
    for r in replies:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["detail"][0]["type"] == "busy"


def test_a_solve_past_the_wall_cap_answers_503_and_keeps_its_slot(
        tmp_path: Path, no_env_token: None) -> None:
    controller, app = make(tmp_path, max_concurrent_solves=1, solve_wall_s=1.0)
    real = controller.whatif
    release = threading.Event()

    def slow_whatif(*args: Any) -> Any:  # a solve that overruns (e.g. a huge snapshot)
        release.wait(10)
        return real(*args)

    controller.whatif = slow_whatif
    doc = generate(4, 20, seed=3)
    try:
        with serve_in_thread(app) as url:
            t0 = time.monotonic()
            r = httpx.post(f"{url}/v1/whatif", json={"snapshot": doc}, headers=AUTH,
                           timeout=30)
            took = time.monotonic() - t0
            assert r.status_code == 503 and 0.9 < took < 3.0, (r.status_code, took)
            assert r.json()["detail"][0]["type"] == "solve_timeout"
            # The overrunning solve still holds its slot: no second one piles up behind it.
            r = httpx.post(f"{url}/v1/whatif", json={"snapshot": doc}, headers=AUTH,
                           timeout=30)
            assert r.status_code == 429
            # ... and refused before its body is read: only the headers are sent here.
            u = urlsplit(url)
            with socket.create_connection((u.hostname, u.port), timeout=5) as sock:
                sock.sendall(f"POST /v1/whatif HTTP/1.1\r\nHost: {u.netloc}\r\n"
                             f"Authorization: Bearer {TOKEN}\r\n"
                             "Content-Type: application/json\r\n"
                             "Content-Length: 5000000\r\n\r\n".encode())
                head = sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 429") and b"retry-after" in head.lower()
            release.set()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                r = httpx.post(f"{url}/v1/whatif", json={"snapshot": doc, "time_limit_s": 0.5},
                               headers=AUTH, timeout=30)
                if r.status_code != 429:
                    break
                time.sleep(0.1)
            assert r.status_code == 200, r.text
    finally:
        release.set()
        controller.close()
