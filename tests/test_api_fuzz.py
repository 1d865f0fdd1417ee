"""Property-based fuzzing of the API from its OpenAPI schema (schemathesis): no input, valid
or not, gets a 5xx. Runs against a real uvicorn server with an inventory, samples and
recommendations loaded, and with the bearer token, so mutating endpoints are exercised too."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client import CollectorRegistry
from schemathesis.checks import not_a_server_error

from balancer.api.testing import samples_for, serve_in_thread
from balancer.config import parse_config
from balancer.serve_cli import build

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = parse_config({
        "server": {"api_token": TOKEN},
        "loop": {"imbalance_cycles": 1, "cooldown_s": 0},
        "cluster": {"automation": "fully", "time_limit_s": 0.5, "seed": 1},
        "ingest": {"source": "push", "window_s": 300, "stale_after_s": 120},
        "store": {"path": str(tmp / "state.db")},
    })
    controller, app, _ = build(cfg, registry=CollectorRegistry())
    doc = json.loads((Path(__file__).parent / "scenarios/hot-cold.json").read_text())
    try:
        with serve_in_thread(app) as url:
            assert httpx.post(f"{url}/v1/inventory", json=doc, headers=AUTH).status_code == 200
            httpx.post(f"{url}/v1/metrics", json={"samples": samples_for(doc, time.time())},
                       headers=AUTH)
            httpx.post(f"{url}/v1/cycle", headers=AUTH, timeout=60)
            yield schemathesis.openapi.from_url(f"{url}/openapi.json")
    finally:
        controller.close()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_input_gets_a_server_error(case: Any) -> None:
    case.call_and_validate(headers=AUTH, checks=[not_a_server_error])
