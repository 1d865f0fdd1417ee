"""The OpenAPI contract, tested by a tool no one here wrote: schemathesis with ALL its default
checks (server errors, status codes, content types, headers, response schemas, negative data
rejected, positive data accepted, missing headers, unsupported methods, ignored auth, ...)
against a real uvicorn server with an inventory, samples and recommendations loaded, and the
bearer token, so mutating endpoints are exercised too.

Bounded and repeatable: hypothesis is derandomized (a fixed seed) and each operation gets at
most ``EXAMPLES`` generated cases.
"""

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

from balancer.api.testing import samples_for, serve_in_thread
from balancer.config import parse_config
from balancer.serve_cli import build

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 8
SEED = 20261128

# Every default check runs on every operation. One setting is told what JSON Schema cannot
# say: on these four operations a schema-valid body can still break a rule that spans fields
# or the server's state, and is then refused with 422 naming the field (positive data
# acceptance would otherwise count those as failures). The rules:
#   /v1/inventory, /v1/whatif: a VM's host is one of the hosts; names are unique; demand is
#     within the VM's size; the VMs' memory fits the active hosts; rules name known VMs and
#     hosts and do not contradict each other; CPU models are known (docs/snapshot-format.md);
#   /v1/metrics: a sample is at most 300 s in the future (the schema cannot know "now");
#   /v1/placement: cpu_demand <= vcpus and mem_demand_mb <= mem_mb.
CROSS_FIELD = ("/v1/inventory", "/v1/whatif", "/v1/metrics", "/v1/placement")
CONFIG = schemathesis.config.SchemathesisConfig.from_dict({
    "seed": SEED,
    "operations": [{"include-path": path, "checks": {"positive_data_acceptance": {
        "expected-statuses": ["2xx", "401", "403", "404", "409", "422", "429"]}}}
        for path in CROSS_FIELD],
})


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = parse_config({
        "server": {"api_token": TOKEN, "max_concurrent_solves": 4},
        "loop": {"imbalance_cycles": 1, "cooldown_s": 0},
        "cluster": {"automation": "manual", "time_limit_s": 0.5, "seed": 1},
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
            yield schemathesis.openapi.from_url(f"{url}/openapi.json", config=CONFIG)
    finally:
        controller.close()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_the_api_keeps_its_openapi_contract(case: Any) -> None:
    case.call_and_validate(headers=AUTH, timeout=30)
