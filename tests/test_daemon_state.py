"""The daemon's state: stable recommendations across cycles, one line of log per cycle,
migration and API change, and one daemon per SQLite state (a second one is refused)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_daemon import TOKEN, make, scenario_doc


def feed(controller: Any, doc: dict[str, Any]) -> None:
    from balancer.api.testing import samples_for

    s = samples_for(doc, time.time())
    controller.ingest([x["ts"] for x in s], ["vm" if "vm" in x else "host" for x in s],
                      [x.get("vm") or x["host"] for x in s], [x["cpu_cores"] for x in s],
                      [x["mem_mb"] for x in s])


def test_recommendations_keep_their_ids_over_five_cycles(tmp_path: Path) -> None:
    # the search ends on its deterministic effort, never on the wall clock of a busy machine
    controller, _, _ = make(tmp_path, time_limit_s=120.0)
    doc = scenario_doc("hot-cold")
    controller.set_inventory(doc)
    feed(controller, doc)
    seen = []
    for _ in range(5):
        report = controller.run_cycle()
        assert report.recommendations
        seen.append({(r["id"], r["created"], r["vm"], r["target"], r["state"])
                     for r in controller.store.recommendations("pending")})
    assert all(s == seen[0] for s in seen), seen
    # nothing was superseded along the way
    assert controller.store.recommendations("superseded") == []
    controller.close()


def test_a_changed_move_supersedes_with_the_reason(tmp_path: Path) -> None:
    controller, _, _ = make(tmp_path)
    doc = scenario_doc("hot-cold")
    controller.set_inventory(doc)
    feed(controller, doc)
    first = controller.run_cycle().recommendations
    rec = first[0]
    # The VM's destination goes into maintenance: the plan must send it elsewhere.
    controller.maintenance(rec["target"], enter=True)
    controller.run_cycle()
    old = controller.store.recommendation(rec["id"])
    assert old is not None and old["state"] == "superseded"
    assert old["detail"].startswith("superseded: ")
    assert rec["vm"] in old["detail"] or "no longer in the plan" in old["detail"]
    controller.close()


def test_the_daemon_logs_cycles_migrations_and_api_changes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="balancer")
    controller, _, _ = make(tmp_path)
    doc = scenario_doc("hot-cold")
    controller.set_inventory(doc)
    feed(controller, doc)
    report = controller.run_cycle()
    recs = report.recommendations
    controller.apply(recs[0]["id"])
    controller.dismiss(recs[1]["id"])
    controller.maintenance("h4", enter=True)
    controller.place(name="new-vm", vcpus=2, mem_mb=2048, cpu_demand=None, mem_demand_mb=None)
    text = [r.getMessage() for r in caplog.records if r.name.startswith("balancer")]
    assert any(t.startswith("inventory replaced: 4 hosts") for t in text), text
    cycle = next(t for t in text if t.startswith("cycle 1: imbalance "))
    assert f"{len(recs)} recommendations" in cycle and "solve " in cycle
    r0 = recs[0]
    assert any(t.startswith(f"recommendation {r0['id']} applied by api: {r0['vm']}")
               for t in text)
    assert any(f"{r0['vm']} {r0['source']} -> {r0['target']} started" in t for t in text)
    assert any(f"{r0['vm']} {r0['source']} -> {r0['target']} succeeded" in t for t in text)
    assert any(t.startswith(f"recommendation {recs[1]['id']} dismissed") for t in text)
    assert "host h4 enters maintenance" in text
    assert any(t.startswith("placement of new-vm: ") for t in text)
    controller.close()


def test_a_second_daemon_on_the_same_state_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "svc.toml"
    cfg.write_text(f'[server]\napi_token = "{TOKEN}"\nport = 0\n[ingest]\nsource = "push"\n'
                   f'[store]\npath = "{tmp_path / "state.db"}"\n')
    first = subprocess.Popen([sys.executable, "-m", "balancer.cli", "serve", "--config",
                              str(cfg)], stderr=subprocess.PIPE, text=True)
    try:
        assert first.stderr is not None
        deadline = time.monotonic() + 60
        while "listening" not in first.stderr.readline():
            assert time.monotonic() < deadline and first.poll() is None
        second = subprocess.run([sys.executable, "-m", "balancer.cli", "serve", "--config",
                                 str(cfg)], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert f"in use by balancer serve (pid {first.pid} on " in second.stderr
        assert first.poll() is None
    finally:
        first.terminate()
        first.wait(timeout=60)
        if first.stderr is not None:
            first.stderr.close()


def test_an_evacuation_that_failed_runs_again_when_proposed_again(tmp_path: Path) -> None:
    """The same moves proposed after an earlier run of them ended (failed here; cancelled by a
    shutdown or a killed leader in real life) are carried out: a finished run of an identical
    plan must not stand in for a new one (it did, and a host never drained after a failover)."""
    from prometheus_client import CollectorRegistry

    from balancer.config import parse_config
    from balancer.serve_cli import build

    def daemon(failure_rate: float) -> Any:
        cfg = parse_config({
            "server": {"api_token": TOKEN},
            "loop": {"imbalance_cycles": 1, "cooldown_s": 0},
            "cluster": {"automation": "fully", "time_limit_s": 2.0, "seed": 1},
            "ingest": {"source": "push", "window_s": 300, "stale_after_s": 120},
            "store": {"path": str(tmp_path / "state.db")},
            "executor": {"settings": {
                "journal": {"path": str(tmp_path / "journal.sqlite")},
                "simulated": {"faults": {"failure_rate": failure_rate}}}},
        })
        controller, _, _ = build(cfg, registry=CollectorRegistry())
        return controller

    doc = scenario_doc("hot-cold")
    host = doc["hosts"][0]["name"]
    on_host = sorted(v["name"] for v in doc["vms"] if v["host"] == host)
    assert on_host

    first = daemon(failure_rate=1.0)
    first.set_inventory(doc)
    feed(first, doc)
    out = first.maintenance(host, True)
    assert out["executed"] and all(m["state"] == "failed" for m in out["executed"])
    first.close()

    second = daemon(failure_rate=0.0)
    try:
        feed(second, doc)
        out = second.maintenance(host, True)
        assert out["executed"] and all(m["state"] == "completed" for m in out["executed"])
        where = {v.name: v.host for v in second.inventory.vms}
        assert not [vm for vm in on_host if where[vm] == host], where
    finally:
        second.close()


def test_a_cycle_without_a_plan_still_updates_the_view_and_its_metrics(tmp_path: Path) -> None:
    """The estimate runs with the plan (in a solver worker under ``serve``); when there is no
    plan (an evacuation with nowhere to go), the view and the stale-data gauges still follow the
    samples."""
    from prometheus_client import generate_latest

    controller, _, telemetry = make(tmp_path, time_limit_s=120.0)
    doc = {"version": 1,
           "hosts": [{"name": "h1", "cpu_capacity": 16, "mem_capacity_mb": 65536,
                      "state": "maintenance"},
                     {"name": "h2", "cpu_capacity": 16, "mem_capacity_mb": 65536}],
           "vms": [{"name": "big", "host": "h1", "vcpus": 4, "mem_mb": 32768,
                    "cpu_demand": 1.0, "mem_demand_mb": 16384},
                   {"name": "small", "host": "h2", "vcpus": 2, "mem_mb": 4096,
                    "cpu_demand": 1.0, "mem_demand_mb": 2048}],
           # kept apart, and h2 is the only host left: "big" cannot be evacuated
           "rules": [{"name": "apart", "type": "anti_affinity", "vms": ["big", "small"]}]}
    controller.set_inventory(doc)
    # samples for h2 and "small" only: "big" and h1 are stale
    feed(controller, {**doc, "hosts": doc["hosts"][1:], "vms": doc["vms"][1:]})
    report = controller.run_cycle()
    assert any(n.startswith("cycle failed") for n in report.notes), report.notes
    view = controller.view
    assert view is not None and view.freshness.stale_vms == ["big"]
    text = generate_latest(telemetry.registry).decode()
    assert "balancer_stale_vms 1.0" in text and "balancer_vms 2.0" in text, text
    controller.close()
