"""The HTTP API through a real uvicorn server on a free loopback port."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from balancer.api.testing import samples_for, serve_in_thread
from balancer.config import parse_config
from balancer.serve_cli import build

SCENARIOS = Path(__file__).parent / "scenarios"
TOKEN = "s3cret-token"


def scenario_doc(name: str) -> dict[str, Any]:
    return json.loads((SCENARIOS / f"{name}.json").read_text())


def make(tmp_path: Path, *, token: str | None = TOKEN, automation: str = "manual",
         **sections: dict[str, Any]) -> tuple[Any, Any, Any]:
    data: dict[str, Any] = {
        "server": {"api_token": token} if token else {},
        "loop": {"imbalance_cycles": 1, "cooldown_s": 600},
        "cluster": {"automation": automation, "time_limit_s": 2.0, "seed": 1},
        "ingest": {"source": "push", "window_s": 300, "stale_after_s": 120},
        "store": {"path": str(tmp_path / "state.db")},
    }
    for key, extra in sections.items():
        data.setdefault(key, {}).update(extra)
    cfg = parse_config(data)
    return build(cfg, registry=CollectorRegistry())


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[httpx.Client, Any]]:
    monkeypatch.delenv("BALANCER_API_TOKEN", raising=False)
    controller, app, _ = make(tmp_path)
    with serve_in_thread(app) as url, httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
        yield client, controller
    controller.close()


def load(client: httpx.Client, name: str = "hot-cold", **kw: Any) -> dict[str, Any]:
    doc = scenario_doc(name)
    r = client.post("/v1/inventory", json=doc)
    assert r.status_code == 200, r.text
    r = client.post("/v1/metrics", json={"samples": samples_for(doc, time.time(), **kw)})
    assert r.status_code == 200, r.text
    return doc


def test_health_and_readiness(api: tuple[httpx.Client, Any]) -> None:
    client, _ = api
    assert client.get("/healthz").json() == {"status": "ok", "detail": None}
    r = client.get("/readyz")
    assert r.status_code == 503 and "inventory" in r.json()["detail"]
    load(client)
    assert client.get("/readyz").status_code == 503  # no cycle yet
    assert client.post("/v1/cycle").status_code == 200
    assert client.get("/readyz").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "/v1/recommendations/{rec_id}/apply" in schema["paths"]


def test_mutating_endpoints_need_the_token(api: tuple[httpx.Client, Any]) -> None:
    client, _ = api
    body = {"samples": []}
    r = httpx.post(f"{client.base_url}/v1/metrics", json=body)
    assert r.status_code == 401
    assert r.json()["detail"][0]["loc"] == ["header", "authorization"]
    r = httpx.post(f"{client.base_url}/v1/metrics", json=body,
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert client.post("/v1/metrics", json=body).status_code == 200
    # Reads need no token.
    assert httpx.get(f"{client.base_url}/v1/recommendations").status_code == 200


def test_no_token_configured_refuses_writes(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALANCER_API_TOKEN", raising=False)
    controller, app, _ = make(tmp_path, token=None)
    with serve_in_thread(app) as url:
        r = httpx.post(f"{url}/v1/inventory", json=scenario_doc("hot-cold"),
                       headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403
        assert "no API token configured" in r.json()["detail"][0]["msg"]
        monkeypatch.setenv("BALANCER_API_TOKEN", "from-env")
        r = httpx.post(f"{url}/v1/inventory", json=scenario_doc("hot-cold"),
                       headers={"Authorization": "Bearer from-env"})
        assert r.status_code == 200 and r.json() == {"hosts": 4, "vms": 11, "rules": 0}
    controller.close()


def test_bad_inventory_names_the_field(api: tuple[httpx.Client, Any]) -> None:
    client, _ = api
    doc = scenario_doc("hot-cold")
    doc["vms"][3]["cpu_demand"] = "lots"
    r = client.post("/v1/inventory", json=doc)
    assert r.status_code == 422
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "vms", 3, "cpu_demand"]
    assert "must be a number" in detail["msg"]
    r = client.post("/v1/inventory", content=b"{not json", headers={
        "Content-Type": "application/json"})
    assert r.status_code == 422
    r = client.post("/v1/inventory", json=[1, 2])
    assert r.status_code == 422


def test_bad_samples_name_the_field(api: tuple[httpx.Client, Any]) -> None:
    client, controller = api
    now = time.time()
    good = {"ts": now, "vm": "a0", "cpu_cores": 1.0, "mem_mb": 100}
    r = client.post("/v1/metrics", json={"samples": [good, {**good, "cpu_cores": -1}]})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "samples", 1, "cpu_cores"]
    r = client.post("/v1/metrics", json={"samples": [{**good, "host": "h1"}]})
    assert r.status_code == 422 and "exactly one" in r.json()["detail"][0]["msg"]
    r = client.post("/v1/metrics", json={"samples": [{**good, "ts": now + 3600}]})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "samples", 0, "ts"]
    assert controller.push.total == 0  # a rejected batch stores nothing
    r = client.post("/v1/metrics", json={"samples": [good, good]})
    assert r.json() == {"accepted": 2, "total": 2}


def test_cluster_state_and_recommendations(api: tuple[httpx.Client, Any]) -> None:
    client, _ = api
    load(client)
    state = client.get("/v1/cluster").json()
    assert {h["name"] for h in state["hosts"]} == {"h1", "h2", "h3", "h4"}
    h1 = next(h for h in state["hosts"] if h["name"] == "h1")
    assert h1["fresh"] and h1["cpu_util"] == pytest.approx(0.66, abs=0.01)
    assert state["imbalance"]["imbalance"] == pytest.approx(0.4446, abs=0.001)
    assert state["freshness"]["stale_vms"] == []
    report = client.post("/v1/cycle").json()
    assert len(report["recommendations"]) >= 3
    recs = client.get("/v1/recommendations").json()
    assert recs and all(r["state"] == "pending" and r["kind"] == "balance" for r in recs)
    assert all(r["reason"].startswith("balance:") and r["gain"] > 0 for r in recs)
    assert {r["source"] for r in recs} <= {"h1", "h2"}
    assert {r["target"] for r in recs} <= {"h3", "h4"}
    one = client.get(f"/v1/recommendations/{recs[0]['id']}").json()
    assert one == recs[0]
    assert client.get("/v1/recommendations/999999").status_code == 404
    assert client.get("/v1/recommendations", params={"state": "bogus"}).status_code == 422


def test_stale_vm_is_not_moved_and_stale_host_receives_nothing(
        api: tuple[httpx.Client, Any]) -> None:
    client, _ = api
    # a2 and a4 (the VMs the plan would move off h1) send nothing; h3 sends nothing.
    load(client, skip_vms=("a2", "a4"), skip_hosts=("h3",))
    state = client.get("/v1/cluster").json()
    held = {v["name"]: v["held"] for v in state["vms"] if v["held"]}
    assert held["a2"] == "no fresh samples" and held["a4"] == "no fresh samples"
    assert state["freshness"]["stale_hosts"] == ["h3"]
    assert next(h for h in state["hosts"] if h["name"] == "h3")["fresh"] is False
    client.post("/v1/cycle")
    recs = client.get("/v1/recommendations").json()
    assert recs, "the other VMs still balance"
    assert not {r["vm"] for r in recs} & {"a2", "a4"}
    assert all(r["target"] != "h3" for r in recs)


def test_whatif_plans_a_posted_snapshot(api: tuple[httpx.Client, Any]) -> None:
    client, _ = api
    doc = scenario_doc("hot-cold")
    r = client.post("/v1/whatif", json={"snapshot": doc, "threshold": 3, "time_limit_s": 2})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["efficacy"]["after"]["imbalance"] < out["efficacy"]["before"]["imbalance"]
    assert all("gain" in m and m["reason"] for m in out["migrations"])
    assert client.get("/v1/recommendations").json() == []  # changes nothing
    doc["vms"][0]["host"] = "nowhere"
    r = client.post("/v1/whatif", json={"snapshot": doc})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "snapshot", "vms", 0, "host"]
    r = client.post("/v1/whatif", json={"snapshot": scenario_doc("hot-cold"), "threshold": 9})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "threshold"]


def test_initial_placement_picks_the_emptiest_host(api: tuple[httpx.Client, Any]) -> None:
    client, controller = api
    load(client)
    req = {"name": "new-1", "vcpus": 4, "mem_mb": 8192, "cpu_demand": 2, "mem_demand_mb": 4096}
    r = client.post("/v1/placement", json=req)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["host"] in {"h3", "h4"} and out["host"] in out["reason"]
    assert out["imbalance_after"] < out["imbalance_before"]
    assert out["applied"] is False  # manual: an answer only
    assert "new-1" not in controller.inventory.vm_index
    r = client.post("/v1/placement", json={**req, "name": "a0"})
    assert r.status_code == 409 and r.json()["detail"][0]["loc"] == ["body", "name"]
    r = client.post("/v1/placement", json={**req, "mem_mb": 10**7, "mem_demand_mb": None})
    assert r.status_code == 409 and "no host can take" in r.json()["detail"][0]["msg"]
    r = client.post("/v1/placement", json={**req, "cpu_demand": 9})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "cpu_demand"]


def test_placement_is_applied_when_partially_automated(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALANCER_API_TOKEN", raising=False)
    controller, app, _ = make(tmp_path, automation="partially")
    with serve_in_thread(app) as url, httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        load(client)
        out = client.post("/v1/placement", json={"name": "new-1", "vcpus": 2,
                                                 "mem_mb": 4096}).json()
        assert out["applied"] is True
        vms = {v["name"]: v for v in client.get("/v1/cluster").json()["vms"]}
        assert vms["new-1"]["host"] == out["host"]
        assert vms["new-1"]["held"] == "no fresh samples"  # not moved until it reports
    controller.close()


def test_dismiss_and_apply_states(api: tuple[httpx.Client, Any]) -> None:
    client, _ = api
    load(client)
    client.post("/v1/cycle")
    recs = client.get("/v1/recommendations").json()
    first, second = recs[0], recs[1]
    r = client.post(f"/v1/recommendations/{first['id']}/dismiss")
    assert r.status_code == 200 and r.json()["state"] == "dismissed"
    assert client.post(f"/v1/recommendations/{first['id']}/apply").status_code == 409
    assert client.post("/v1/recommendations/424242/apply").status_code == 404
    r = client.post(f"/v1/recommendations/{second['id']}/apply")
    assert r.status_code == 200, r.text
    assert r.json()["migration"]["state"] == "completed"
    assert r.json()["recommendation"]["state"] == "applied"
    states = {x["id"]: x["state"] for x in
              client.get("/v1/recommendations", params={"state": "all"}).json()}
    assert states[first["id"]] == "dismissed" and states[second["id"]] == "applied"
    # The dismissed VM is held for the cool-down in the next cycle.
    client.post("/v1/cycle")
    vms = {v["name"]: v for v in client.get("/v1/cluster").json()["vms"]}
    assert "dismissed" in vms[first["vm"]]["held"]
    assert "moved" in vms[second["vm"]]["held"]
    assert all(r["vm"] not in (first["vm"], second["vm"])
               for r in client.get("/v1/recommendations").json())


def test_maintenance_returns_the_evacuation_plan(api: tuple[httpx.Client, Any]) -> None:
    client, controller = api
    load(client)
    r = client.post("/v1/hosts/h1/maintenance/enter")
    assert r.status_code == 200, r.text
    out = r.json()
    on_h1 = {v["name"] for v in scenario_doc("hot-cold")["vms"] if v["host"] == "h1"}
    assert {m["vm"] for m in out["plan"]["migrations"]} == on_h1
    assert {x["vm"] for x in out["recommendations"]} == on_h1
    assert all(x["kind"] == "evacuation" for x in out["recommendations"])
    assert out["executed"] == []  # manual: recommendations only
    hosts = {h["name"]: h for h in client.get("/v1/cluster").json()["hosts"]}
    assert hosts["h1"]["state"] == "maintenance"
    assert client.post("/v1/hosts/nope/maintenance/enter").status_code == 404
    r = client.post("/v1/hosts/h1/maintenance/exit")
    assert r.status_code == 200 and r.json()["state"] == "active"
    assert not [x for x in client.get("/v1/recommendations").json()
                if x["kind"] == "evacuation"]
    assert controller.inventory.hosts[0].state.value == "active"


def test_history_and_server_defaults(api: tuple[httpx.Client, Any]) -> None:
    client, _ = api
    assert client.get("/v1/history").json() == []
    assert client.get("/v1/history", params={"limit": 0}).status_code == 422
    assert parse_config({}).server.host == "127.0.0.1"


def test_maintenance_runs_the_evacuation_when_fully_automated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALANCER_API_TOKEN", raising=False)
    controller, app, _ = make(tmp_path, automation="fully")
    with serve_in_thread(app) as url, httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
        load(client)
        out = client.post("/v1/hosts/h2/maintenance/enter").json()
        on_h2 = {v["name"] for v in scenario_doc("hot-cold")["vms"] if v["host"] == "h2"}
        assert {m["vm"] for m in out["executed"]} == on_h2
        assert all(m["state"] == "completed" and m["trigger"] == "evacuation"
                   for m in out["executed"])
        hosts = {h["name"]: h for h in client.get("/v1/cluster").json()["hosts"]}
        assert hosts["h2"]["vms"] == 0 and hosts["h2"]["state"] == "maintenance"
        assert all(controller.backend.locate(vm) != "h2" for vm in on_h2)
        history = client.get("/v1/history").json()
        assert {m["vm"] for m in history} == on_h2
        applied = client.get("/v1/recommendations", params={"state": "applied"}).json()
        assert {r["vm"] for r in applied} == on_h2
    controller.close()


def test_cluster_state_and_whatif_say_why_a_vm_has_fewer_hosts(
        api: tuple[httpx.Client, Any]) -> None:
    client, _ = api
    doc = scenario_doc("hot-cold")
    for h in doc["hosts"]:
        h["networks"] = ["prod"] + (["prod-vlan42"] if h["name"] in ("h1", "h3") else [])
    doc["vms"][0]["networks"] = ["prod-vlan42"]
    r = client.post("/v1/inventory", json=doc)
    assert r.status_code == 200, r.text
    r = client.post("/v1/metrics", json={"samples": samples_for(doc, time.time())})
    assert r.status_code == 200, r.text
    vms = {v["name"]: v for v in client.get("/v1/cluster").json()["vms"]}
    why = "needs network prod-vlan42: present on 2 of 4 active hosts"
    assert vms[doc["vms"][0]["name"]]["eligibility"] == [why]
    assert vms[doc["vms"][1]["name"]]["eligibility"] == []
    plan = client.post("/v1/whatif", json={"snapshot": doc, "threshold": 5,
                                           "time_limit_s": 2}).json()
    assert plan["eligibility"] == {doc["vms"][0]["name"]: [why]}
    moved = {m["vm"]: m["to"] for m in plan["migrations"]}
    assert moved.get(doc["vms"][0]["name"], "h1") in ("h1", "h3")
