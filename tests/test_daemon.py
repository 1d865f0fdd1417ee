"""The daemon: end to end through the API, automation levels, anti-flapping, crash recovery,
SIGTERM, and the ``balancer serve`` command line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from balancer.api.testing import samples_for, serve_in_thread
from balancer.config import parse_config
from balancer.executor.base import MigrationRequest, MigrationStatus
from balancer.executor.config import ExecutorConfig, FaultsConfig, SimulatedConfig
from balancer.executor.simulated import SimulatedBackend
from balancer.serve_cli import build

SCENARIOS = Path(__file__).parent / "scenarios"
TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def scenario_doc(name: str) -> dict[str, Any]:
    return json.loads((SCENARIOS / f"{name}.json").read_text())


def make(tmp_path: Path, *, automation: str = "manual", imbalance_cycles: int = 1,
         vm_automation: dict[str, str] | None = None,
         time_limit_s: float = 2.0, solvers: Any = None) -> tuple[Any, Any, Any]:
    cfg = parse_config({
        "server": {"api_token": TOKEN},
        "loop": {"imbalance_cycles": imbalance_cycles, "cooldown_s": 600},
        "cluster": {"automation": automation, "time_limit_s": time_limit_s, "seed": 1,
                    "vm_automation": vm_automation or {}},
        "ingest": {"source": "push", "window_s": 300, "stale_after_s": 120},
        "store": {"path": str(tmp_path / "state.db")},
    })
    return build(cfg, registry=CollectorRegistry(), solvers=solvers)


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"([a-z_]+)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if got == labels:
            return float(m.group(3))
    raise AssertionError(f"metric {name}{labels} not found")


def test_metrics_in_recommendation_out_apply_and_state_reflects_it(tmp_path: Path) -> None:
    controller, app, _ = make(tmp_path)
    doc = scenario_doc("hot-cold")
    with serve_in_thread(app) as url, httpx.Client(base_url=url, headers=AUTH) as c:
        assert c.post("/v1/inventory", json=doc).status_code == 200
        assert c.post("/v1/metrics", json={"samples": samples_for(doc, time.time())}
                      ).status_code == 200
        c.post("/v1/cycle")
        recs = c.get("/v1/recommendations").json()
        assert recs
        before = c.get("/v1/cluster").json()["imbalance"]["imbalance"]
        m0 = c.get("/metrics").text
        assert metric(m0, "balancer_pending_recommendations") == len(recs)
        assert metric(m0, "balancer_cluster_imbalance", resource="cpu") > 0.3
        rec = recs[0]
        r = c.post(f"/v1/recommendations/{rec['id']}/apply")
        assert r.status_code == 200, r.text
        mig = r.json()["migration"]
        assert (mig["vm"], mig["source"], mig["target"], mig["state"]) == (
            rec["vm"], rec["source"], rec["target"], "completed")
        # The migration is in the history, the VM on its new host, the backend agrees.
        hist = c.get("/v1/history").json()
        assert hist[0]["id"] == mig["id"] and hist[0]["trigger"] == "api"
        assert controller.backend.locate(rec["vm"]) == rec["target"]
        # Fresh samples report the VM's load on its new host.
        moved = {**doc, "vms": [dict(v, host=rec["target"]) if v["name"] == rec["vm"] else v
                                for v in doc["vms"]]}
        c.post("/v1/metrics", json={"samples": samples_for(moved, time.time(), times=(0.0,))})
        state = c.get("/v1/cluster").json()
        vms = {v["name"]: v for v in state["vms"]}
        assert vms[rec["vm"]]["host"] == rec["target"]
        assert state["imbalance"]["imbalance"] < before
        m1 = c.get("/metrics").text
        assert metric(m1, "balancer_migrations_total", outcome="completed") == 1
        assert metric(m1, "balancer_pending_recommendations") == len(recs) - 1
        assert metric(m1, "balancer_cluster_imbalance", resource="cpu") < \
            metric(m0, "balancer_cluster_imbalance", resource="cpu")
        host_util = metric(m1, "balancer_host_utilization", host=rec["target"], resource="cpu")
        assert host_util == pytest.approx(
            next(h for h in state["hosts"] if h["name"] == rec["target"])["cpu_util"],
            abs=1e-6)
        assert metric(m1, "balancer_samples_ingested_total") > 0
        assert metric(m1, "balancer_cycles_total", result="ok") == 1
    controller.close()


def test_fully_automated_cycle_executes_the_plan(tmp_path: Path) -> None:
    controller, app, _ = make(tmp_path, automation="fully", vm_automation={"a0": "manual"})
    doc = scenario_doc("hot-cold")
    controller.set_inventory(doc)
    s = samples_for(doc, time.time())
    controller.ingest([x["ts"] for x in s], ["vm" if "vm" in x else "host" for x in s],
                      [x.get("vm") or x["host"] for x in s], [x["cpu_cores"] for x in s],
                      [x["mem_mb"] for x in s])
    report = controller.run_cycle()
    assert report.recommendations and report.executed
    assert all(m["state"] == "completed" for m in report.executed)
    applied = controller.store.recommendations("applied")
    executed_vms = {m["vm"] for m in report.executed}
    assert {r["vm"] for r in applied} == executed_vms
    for m in report.executed:
        assert controller.inventory.vms[controller.inventory.vm_index[m["vm"]]].host == \
            m["target"] == controller.backend.locate(m["vm"])
    # A per-VM "manual" override keeps a0's recommendation a recommendation.
    pending = controller.store.recommendations("pending")
    assert all(r["vm"] == "a0" for r in pending)
    assert controller.store.cycles()[0]["executed"] == len(report.executed)
    controller.close()


def test_imbalance_must_persist_before_balancing(tmp_path: Path) -> None:
    controller, _, _ = make(tmp_path, imbalance_cycles=3)
    doc = scenario_doc("hot-cold")
    controller.set_inventory(doc)
    for k in (1, 2):
        s = samples_for(doc, time.time(), times=(0.0,))
        controller.ingest([x["ts"] for x in s], ["vm" if "vm" in x else "host" for x in s],
                          [x.get("vm") or x["host"] for x in s], [x["cpu_cores"] for x in s],
                          [x["mem_mb"] for x in s])
        report = controller.run_cycle()
        assert report.recommendations == []
        assert any(f"imbalance seen {k} of 3 cycles" in n for n in report.notes)
    report = controller.run_cycle()
    assert report.streak == 3 and report.recommendations
    controller.close()


def test_evacuation_is_not_delayed_by_anti_flapping(tmp_path: Path) -> None:
    controller, _, _ = make(tmp_path, imbalance_cycles=5)
    doc = scenario_doc("hot-cold")
    doc["hosts"][3]["state"] = "maintenance"  # h4 is empty; put h2 in maintenance instead
    doc["hosts"][3]["state"] = "active"
    doc["hosts"][1]["state"] = "maintenance"
    controller.set_inventory(doc)
    report = controller.run_cycle()  # no samples at all: evacuation still happens
    kinds = {r["kind"] for r in report.recommendations}
    on_h2 = {v["name"] for v in doc["vms"] if v["host"] == "h2"}
    assert kinds == {"evacuation"}
    assert {r["vm"] for r in report.recommendations} == on_h2
    controller.close()


def test_crash_leaves_no_migration_unknown(tmp_path: Path) -> None:
    controller, _, _ = make(tmp_path)
    doc = scenario_doc("hot-cold")
    controller.set_inventory(doc)
    store = controller.store
    # Two migrations were in flight when the process died.
    first = store.migration_started(vm="a0", source="h1", target="h3", mem_mb=4096,
                                    trigger="auto", rec_id=None)
    second = store.migration_started(vm="a1", source="h1", target="h4", mem_mb=8192,
                                     trigger="api", rec_id=None)
    controller.close()  # the process dies: its journal lock goes with it
    controller2, _, _ = make(tmp_path)  # restart on the same SQLite state
    rows = controller2.recover()
    # The (new, simulated) backend has both VMs on their sources: both did not happen.
    assert {r["id"]: r["state"] for r in rows} == {first: "failed", second: "failed"}
    assert all("interrupted by a restart" in r["error"] for r in rows)
    assert controller2.store.unfinished_migrations() == []
    assert {m["state"] for m in controller2.store.migrations()} == {"failed"}
    controller2.close()


def test_recovery_marks_a_finished_migration_completed(tmp_path: Path) -> None:
    controller, _, _ = make(tmp_path)
    controller.set_inventory(scenario_doc("hot-cold"))
    mig = controller.store.migration_started(vm="a0", source="h1", target="h3", mem_mb=4096,
                                             trigger="auto", rec_id=None)
    # The backend did move it before the "crash" (our row was never finished).
    backend = controller.backend
    handle = backend.start(MigrationRequest(vm="a0", source="h1", target="h3", mem_mb=4096))
    backend.wait(120)
    assert backend.poll(handle).status is MigrationStatus.COMPLETED
    rows = controller.recover()
    assert [(r["id"], r["state"]) for r in rows] == [(mig, "completed")]
    inv = controller.inventory
    assert inv.vms[inv.vm_index["a0"]].host == "h3"
    controller.close()


def test_failed_migration_is_recorded_and_counted(tmp_path: Path) -> None:
    controller, app, telemetry = make(tmp_path)
    doc = scenario_doc("hot-cold")
    controller.set_inventory(doc)
    s = samples_for(doc, time.time())
    controller.ingest([x["ts"] for x in s], ["vm" if "vm" in x else "host" for x in s],
                      [x.get("vm") or x["host"] for x in s], [x["cpu_cores"] for x in s],
                      [x["mem_mb"] for x in s])
    rec = controller.run_cycle().recommendations[0]
    faulty = ExecutorConfig(simulated=SimulatedConfig(faults=FaultsConfig(failure_rate=1.0)))
    controller.set_backend(SimulatedBackend.from_snapshot(controller.inventory, faulty,
                                                          persist=False))
    out = controller.apply(rec["id"])
    assert out["migration"]["state"] == "failed"
    assert out["recommendation"]["state"] == "failed"
    inv = controller.inventory
    assert inv.vms[inv.vm_index[rec["vm"]]].host == rec["source"]
    assert metric(telemetry.render().decode(), "balancer_migrations_total",
                  outcome="failed") == 1
    controller.close()


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "balancer.cli", "serve", *args],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, **(env or {})})


def _wait_listening(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            return m.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}")
    raise AssertionError("serve did not start")


def test_serve_demo_answers_and_stops_cleanly_on_sigterm() -> None:
    proc = _serve("--demo", "--port", "0", "--interval", "600",
                  env={"BALANCER_API_TOKEN": "demo"})
    try:
        url = _wait_listening(proc)
        assert url.startswith("http://127.0.0.1:")
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "first demo cycle did not finish"
            time.sleep(0.3)
        recs = httpx.get(f"{url}/v1/recommendations").json()
        assert recs and all(r["reason"] for r in recs)
        r = httpx.post(f"{url}/v1/recommendations/{recs[0]['id']}/apply",
                       headers={"Authorization": "Bearer demo"}, timeout=30)
        assert r.status_code == 200 and r.json()["migration"]["state"] == "completed"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        rest = proc.stderr.read() if proc.stderr else ""
        assert "stopped" in rest and "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_serve_argument_and_config_errors(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "balancer.cli", "serve"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--config" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[loop]\ninterval_s = -5\n')
    r = subprocess.run([sys.executable, "-m", "balancer.cli", "serve", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "[loop] interval_s: must be a number > 0, got -5" in r.stderr
    r = subprocess.run([sys.executable, "-m", "balancer.cli", "serve", "--demo", "--port",
                        "99999"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--port must be 0..65535" in r.stderr


def test_sigterm_during_execution_leaves_no_migration_unknown(tmp_path: Path) -> None:
    import sqlite3

    doc = scenario_doc("hot-cold")
    doc["hosts"][0]["state"] = "maintenance"  # h1's five VMs are evacuated at once
    inv = tmp_path / "inventory.json"
    inv.write_text(json.dumps(doc))
    # Slow simulated migrations: 4-12 GiB at 1 Gbit/s, 0.05 wall s per simulated second.
    (tmp_path / "executor.toml").write_text(
        '[limits]\nmax_outgoing_per_host = 1\n[migration]\nbandwidth_mbps = 1000.0\n'
        f'[journal]\npath = "{tmp_path / "journal.sqlite"}"\nsynchronous = "normal"\n'
        '[simulated]\ntime_scale = 0.05\n')
    (tmp_path / "svc.toml").write_text(f"""
[server]
api_token = "{TOKEN}"
[loop]
interval_s = 3600
[cluster]
automation = "fully"
inventory = "{inv}"
time_limit_s = 1
[executor]
config = "{tmp_path / 'executor.toml'}"
[store]
path = "{tmp_path / 'state.db'}"
""")
    proc = _serve("--config", str(tmp_path / "svc.toml"), "--port", "0")
    try:
        url = _wait_listening(proc)
        deadline = time.monotonic() + 60
        while not any(m["state"] == "completed" for m in httpx.get(f"{url}/v1/history").json()):
            assert time.monotonic() < deadline, "no migration finished"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # while the rest of the evacuation runs
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        states = [r[0] for r in db.execute("SELECT state FROM migrations")]
    with sqlite3.connect(tmp_path / "journal.sqlite") as db:
        journal = [r[0] for r in db.execute("SELECT state FROM migrations")]
    assert "completed" in states and "started" not in states
    assert "cancelled" in states  # the run was stopped part-way, and says so
    assert journal and not {"running", "planned"} & set(journal)


def test_inventory_follows_the_backend(tmp_path: Path) -> None:
    """The libvirt source: VM placement, new and gone VMs come from the backend's inventory."""
    from balancer.executor.base import VMInfo

    controller, _, _ = make(tmp_path)
    doc = scenario_doc("hot-cold")
    controller.set_inventory(doc)
    vms = [VMInfo(v["name"], "h4" if v["name"] == "a1" else v["host"], v["vcpus"], v["mem_mb"])
           for v in doc["vms"] if v["name"] != "a0"]
    vms.append(VMInfo("fresh-vm", "h3", 2, 2048))
    controller.set_backend(SimulatedBackend({h["name"]: h["mem_capacity_mb"]
                                             for h in doc["hosts"]}, vms))
    controller.refresh_from_backend()
    inv = controller.inventory
    where = {v.name: v.host for v in inv.vms}
    assert "a0" not in where and where["a1"] == "h4" and where["fresh-vm"] == "h3"
    state = controller.cluster_state()
    held = {v["name"]: v["held"] for v in state["vms"]}
    assert held["fresh-vm"] == "no fresh samples"  # known from libvirt, no metrics yet
    controller.close()
