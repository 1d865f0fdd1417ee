"""The console's server side without a browser: the event bus, the executor's events reaching
it, the server-sent event stream, the automation endpoints and the what-if of the current
cluster, through a real uvicorn server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from balancer.api.testing import samples_for, serve_in_thread
from balancer.config import parse_config
from balancer.events import EventBus
from balancer.serve_cli import build

SCENARIOS = Path(__file__).parent / "scenarios"
TOKEN = "console-api-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# -- the event bus ---------------------------------------------------------------------------
def test_bus_fans_out_in_order_and_tracks_what_is_in_flight() -> None:
    bus = EventBus()
    a, b = bus.subscribe(), bus.subscribe()
    bus.publish({"kind": "start", "key": "p:0", "vm": "x"})
    bus.publish({"kind": "progress", "key": "p:0", "vm": "x", "percent": 40.0})
    bus.publish({"kind": "start", "key": "p:1", "vm": "y"})
    assert [e["key"] for e in bus.in_flight()] == ["p:0", "p:1"]
    assert bus.in_flight()[0]["percent"] == 40.0
    bus.publish({"kind": "end", "key": "p:0", "vm": "x"})
    assert [e["key"] for e in bus.in_flight()] == ["p:1"]
    for sub in (a, b):
        got = sub.drain()
        assert [e["kind"] for e in got] == ["start", "progress", "start", "end"]
        assert [e["seq"] for e in got] == sorted(e["seq"] for e in got)
    a.close()
    assert bus.subscribers == 1
    bus.publish({"kind": "skip", "key": "p:1"})
    assert a.drain() == [] and [e["kind"] for e in b.drain()] == ["skip"]
    assert bus.in_flight() == []
    b.close()


def test_a_slow_subscriber_loses_its_oldest_events_not_the_publisher_its_time() -> None:
    bus = EventBus(maxlen=3)
    sub = bus.subscribe()
    for i in range(5):
        bus.publish({"kind": "progress", "key": "p:0", "n": i})
    assert [e["n"] for e in sub.drain()] == [2, 3, 4]
    assert sub.dropped == 2
    assert sub.get(timeout=0.01) is None  # nothing left: returns after the timeout
    sub.close()


def test_bus_is_thread_safe() -> None:
    bus = EventBus(maxlen=100_000)
    sub = bus.subscribe()

    def pub(t: int) -> None:
        for i in range(2000):
            bus.publish({"kind": "progress", "key": f"{t}:{i % 7}"})

    threads = [threading.Thread(target=pub, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = sub.drain()
    assert len(got) == 8000 and len({e["seq"] for e in got}) == 8000
    assert len(bus.in_flight()) == 28
    sub.close()


def test_get_wakes_up_when_an_event_arrives() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    timer = threading.Timer(0.1, bus.publish, args=({"kind": "start", "key": "k"},))
    timer.start()
    t0 = time.monotonic()
    ev = sub.get(timeout=10)
    timer.join()
    assert ev is not None and ev["kind"] == "start" and time.monotonic() - t0 < 5
    sub.close()


# -- through the service ------------------------------------------------------------------------
def make(tmp_path: Path, **cluster: Any) -> tuple[Any, Any, Any]:
    cfg = parse_config({
        "server": {"api_token": TOKEN},
        "loop": {"imbalance_cycles": 1, "cooldown_s": 600},
        "cluster": {"automation": "manual", "time_limit_s": 2.0, "seed": 1, **cluster},
        "ingest": {"source": "push", "window_s": 300, "stale_after_s": 120},
        "store": {"path": str(tmp_path / "state.db")},
    })
    return build(cfg, registry=CollectorRegistry())


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[httpx.Client, Any]]:
    monkeypatch.delenv("BALANCER_API_TOKEN", raising=False)
    controller, app, _ = make(tmp_path)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        doc = json.loads((SCENARIOS / "hot-cold.json").read_text())
        assert client.post("/v1/inventory", json=doc, headers=AUTH).status_code == 200
        r = client.post("/v1/metrics", json={"samples": samples_for(doc, time.time())},
                        headers=AUTH)
        assert r.status_code == 200
        yield client, controller
    controller.close()


def test_applying_publishes_the_executor_events_and_the_stream_carries_them(
        api: tuple[httpx.Client, Any]) -> None:
    client, controller = api
    assert client.post("/v1/cycle", headers=AUTH).status_code == 200
    recs = client.get("/v1/recommendations").json()
    assert recs
    rec = recs[0]
    sub = controller.telemetry.events.subscribe()
    got: list[dict[str, Any]] = []
    opened = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", f"{client.base_url}/ui/events", timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            opened.set()
            for line in r.iter_lines():
                if line.startswith("data: "):
                    ev = json.loads(line[6:])
                    got.append(ev)
                    if ev["kind"] == "end":
                        return

    t = threading.Thread(target=listen)
    t.start()
    assert opened.wait(10)
    time.sleep(0.3)  # the stream has subscribed once its first bytes came
    r = client.post(f"/v1/recommendations/{rec['id']}/apply", headers=AUTH)
    assert r.status_code == 200 and r.json()["recommendation"]["state"] == "applied"
    t.join(timeout=30)
    assert not t.is_alive()
    events = sub.drain()
    sub.close()
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and "progress" in kinds
    prog = next(e for e in events if e["kind"] == "progress")
    assert prog["vm"] == rec["vm"] and prog["source"] == rec["source"]
    assert prog["target"] == rec["target"]
    assert 0 < prog["transferred_mb"] <= prog["total_mb"] and prog["rate_mbps"] > 0
    assert events[-1]["state"] == "succeeded"
    assert [e["kind"] for e in got] == kinds  # the browser's stream saw the same
    assert controller.telemetry.events.in_flight() == []


def test_automation_endpoints_need_the_token_and_change_the_next_cycle(
        api: tuple[httpx.Client, Any], tmp_path: Path) -> None:
    client, controller = api
    assert client.get("/v1/automation").json() == {
        "automation": "manual", "threshold": 3, "max_migrations": None, "vm_automation": {}}
    r = client.put("/v1/automation", json={"automation": "fully"})
    assert r.status_code == 401 and r.json()["detail"][0]["loc"] == ["header", "authorization"]
    r = client.put("/v1/automation", json={"automation": "sometimes"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "automation"]
    r = client.put("/v1/automation", json={"threshold": 9}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "threshold"]
    r = client.put("/v1/automation", json={"automation": None}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "automation"]
    r = client.put("/v1/automation", json={"threshold": 4, "max_migrations": 2}, headers=AUTH)
    assert r.status_code == 200
    assert r.json() == {"automation": "manual", "threshold": 4, "max_migrations": 2,
                        "vm_automation": {}}
    assert controller.options().threshold == 4 and controller.options().max_migrations == 2

    r = client.put("/v1/automation/vms/nope", json={"level": "disabled"}, headers=AUTH)
    assert r.status_code == 404 and r.json()["detail"][0]["loc"] == ["path", "vm"]
    r = client.put("/v1/automation/vms/a0", json={"level": "never"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "level"]
    r = client.put("/v1/automation/vms/a0", json={"level": "disabled"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["vm_automation"] == {"a0": "disabled"}
    vms = {v["name"]: v for v in client.get("/v1/cluster").json()["vms"]}
    assert vms["a0"]["automation"] == "disabled"
    assert vms["a0"]["held"] == "automation disabled for this VM"
    client.post("/v1/cycle", headers=AUTH)
    assert all(r["vm"] != "a0" for r in client.get("/v1/recommendations").json())

    # Fully automated from the next cycle: the moves are executed at once.
    r = client.put("/v1/automation", json={"automation": "fully"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["automation"] == "fully"
    report = client.post("/v1/cycle", headers=AUTH).json()
    assert report["executed"] and all(m["state"] == "completed" for m in report["executed"])

    # Kept across a restart (in the store), until changed again.
    assert client.delete("/v1/automation/vms/a0").status_code == 401
    r = client.delete("/v1/automation/vms/b0", headers=AUTH)
    assert r.status_code == 404
    controller2, _, _ = make(tmp_path / "other")  # a fresh store: config defaults
    assert controller2.cfg.cluster.automation == "manual"
    controller2.close()
    again, _, _ = _rebuild_on(controller)
    try:
        assert again.cfg.cluster.automation == "fully"
        assert again.cfg.cluster.vm_automation == {"a0": "disabled"}
        assert again.cfg.cluster.threshold == 4
    finally:
        again.close()
    r = client.delete("/v1/automation/vms/a0", headers=AUTH)
    assert r.status_code == 200 and r.json()["vm_automation"] == {}


def _rebuild_on(controller: Any) -> tuple[Any, Any, Any]:
    """A second service on the same store file (as after a restart)."""
    cfg = parse_config({
        "server": {"api_token": TOKEN},
        "cluster": {"automation": "manual", "time_limit_s": 2.0, "seed": 1},
        "store": {"path": controller.store.path},
    })
    return build(cfg, registry=CollectorRegistry())


def test_whatif_of_the_current_cluster_changes_nothing(api: tuple[httpx.Client, Any]) -> None:
    client, controller = api
    client.post("/v1/cycle", headers=AUTH)
    before = client.get("/v1/recommendations").json()
    r = client.post("/v1/whatif/current", json={"threshold": 1})
    assert r.status_code == 401  # computation: the token, as POST /v1/whatif
    r = client.post("/v1/whatif/current", json={"threshold": 1}, headers=AUTH)
    assert r.status_code == 200 and r.json()["migrations"] == []  # nothing mandatory
    r = client.post("/v1/whatif/current", json={"threshold": 5, "max_migrations": 1,
                                                "time_limit_s": 2}, headers=AUTH)
    assert r.status_code == 200
    plan = r.json()
    assert len(plan["migrations"]) == 1 and plan["migrations"][0]["gain"] > 0
    assert plan["efficacy"]["after"]["imbalance"] < plan["efficacy"]["before"]["imbalance"]
    r = client.post("/v1/whatif/current", json={"threshold": 0}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "threshold"]
    assert client.get("/v1/recommendations").json() == before
    assert client.get("/v1/auth").status_code == 401
    assert client.get("/v1/auth", headers=AUTH).json() == {"ok": True}


def test_part_fragments_answer_304_when_nothing_changed(api: tuple[httpx.Client, Any]) -> None:
    client, _ = api
    client.post("/v1/cycle", headers=AUTH)
    r = client.get("/ui/part/recommendations")
    assert r.status_code == 200 and "data-rec" in r.text
    etag = r.headers["etag"]
    again = client.get("/ui/part/recommendations", headers={"If-None-Match": etag})
    assert again.status_code == 304
    rec = client.get("/v1/recommendations").json()[0]
    client.post(f"/v1/recommendations/{rec['id']}/dismiss", headers=AUTH)
    changed = client.get("/ui/part/recommendations", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert client.get("/ui/part/nothing").status_code == 404


def test_with_read_auth_the_console_is_off_and_says_why(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALANCER_API_TOKEN", raising=False)
    cfg = parse_config({"server": {"api_token": TOKEN, "read_auth": True},
                        "store": {"path": str(tmp_path / "state.db")}})
    controller, app, _ = build(cfg, registry=CollectorRegistry())
    try:
        with serve_in_thread(app) as url:
            for path in ("/ui/", "/ui/part/cluster", "/ui/events", "/ui/recommendations"):
                r = httpx.get(f"{url}{path}")
                assert r.status_code == 401 and "read_auth" in r.text, path
            assert httpx.get(f"{url}/v1/automation").status_code == 401
            assert httpx.get(f"{url}/v1/automation", headers=AUTH).status_code == 200
    finally:
        controller.close()
