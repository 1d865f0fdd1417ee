"""A real Prometheus server (Debian package ``prometheus``) scraping an exporter the test
serves, with node-exporter and libvirt-exporter metric names, and the balancer reading it back
through the default PromQL queries."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from balancer.api.testing import serve_in_thread
from balancer.config import DEFAULT_QUERIES, parse_config
from balancer.serve_cli import build

PROMETHEUS = shutil.which("prometheus")
GiB = 1024**3
# rate(x[2m]) divides by the whole range, so it reads low until a series is 2 minutes old.
# The tests use the default queries with the range cut to 5 s and wait for that much history.
RANGE = "5s"
HISTORY_S = 8.0
QUERIES = {k: q.replace("[2m]", f"[{RANGE}]") for k, q in DEFAULT_QUERIES.items()}
# Host hA runs four VMs at 3 cores each; hB is empty.
VMS = {"v1": 3.0, "v2": 3.0, "v3": 3.0, "v4": 3.0}
VM_MEM_MB = 2048.0



class ClusterExporter(Collector):
    """What node exporters on hA/hB and a libvirt exporter would expose, as counters that
    grow at the cluster's CPU use."""

    def __init__(self) -> None:
        self.t0 = time.time()

    def collect(self) -> Iterator[Any]:
        dt = time.time() - self.t0
        cpu = CounterMetricFamily("node_cpu_seconds", "cpu seconds",
                                  labels=["instance", "cpu", "mode"])
        busy = {"hA": sum(VMS.values()), "hB": 0.5}
        for host, cores in busy.items():
            cpu.add_metric([f"{host}:9100", "0", "user"], 1000 + cores * dt)
            cpu.add_metric([f"{host}:9100", "0", "idle"], 1000 + (16 - cores) * dt)
        yield cpu
        total = GaugeMetricFamily("node_memory_MemTotal_bytes", "mem", labels=["instance"])
        avail = GaugeMetricFamily("node_memory_MemAvailable_bytes", "mem", labels=["instance"])
        for host, used_mb in (("hA", VM_MEM_MB * 4 + 1024), ("hB", 1024.0)):
            total.add_metric([f"{host}:9100"], 64 * GiB)
            avail.add_metric([f"{host}:9100"], 64 * GiB - used_mb * 1024 * 1024)
        yield total
        yield avail
        vcpu = CounterMetricFamily("libvirt_domain_info_cpu_time_seconds", "vm cpu",
                                   labels=["domain"])
        vmem = GaugeMetricFamily("libvirt_domain_info_memory_usage_bytes", "vm mem",
                                 labels=["domain"])
        for vm, cores in VMS.items():
            vcpu.add_metric([vm], 50 + cores * dt)
            vmem.add_metric([vm], VM_MEM_MB * 1024 * 1024)
        yield vcpu
        yield vmem


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert PROMETHEUS is not None, "needs the prometheus binary: .ci/install.d/30-prometheus.sh"
    tmp = tmp_path_factory.mktemp("prom")
    registry = CollectorRegistry()
    registry.register(ClusterExporter())
    stack = contextlib.ExitStack()
    exporter_url = stack.enter_context(serve_in_thread(make_asgi_app(registry)))
    exporter_port = int(exporter_url.rsplit(":", 1)[1])
    (tmp / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: cluster
    honor_labels: true
    static_configs:
      - targets: ["127.0.0.1:{exporter_port}"]
""")
    port = free_port()
    log = open(tmp / "prometheus.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        started = time.monotonic()
        while time.monotonic() - started < HISTORY_S:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prometheus did not get data in time"
            try:
                r = httpx.get(f"{url}/api/v1/query", params={
                    "query": "rate(libvirt_domain_info_cpu_time_seconds_total[2m])"})
                if r.status_code != 200 or len(r.json()["data"]["result"]) != len(VMS):
                    started = time.monotonic()  # count history from the first scrape
            except httpx.HTTPError:
                started = time.monotonic()
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        stack.close()


def inventory() -> dict[str, Any]:
    return {"version": 1,
            "hosts": [{"name": h, "cpu_capacity": 16, "mem_capacity_mb": 65536}
                      for h in ("hA", "hB")],
            "vms": [{"name": v, "host": "hA", "vcpus": 4, "mem_mb": 4096, "cpu_demand": 0.1,
                     "mem_demand_mb": 100} for v in VMS]}


def test_balancer_reads_prometheus_with_default_queries(prometheus: str, tmp_path: Path) -> None:
    cfg = parse_config({
        "server": {"api_token": "tok"},
        "loop": {"imbalance_cycles": 1},
        "cluster": {"automation": "manual", "time_limit_s": 2.0, "seed": 1},
        "ingest": {"source": "prometheus", "window_s": 4, "stale_after_s": 30,
                   "estimator": "percentile", "percentile": 50},
        "prometheus": {"url": prometheus, "step_s": 1, "queries": QUERIES},
        "store": {"path": str(tmp_path / "state.db")},
    })
    controller, app, _ = build(cfg, registry=CollectorRegistry())
    try:
        controller.set_inventory(inventory())
        with serve_in_thread(app) as url:
            state = httpx.get(f"{url}/v1/cluster", timeout=30).json()
            vms = {v["name"]: v for v in state["vms"]}
            for vm, cores in VMS.items():
                assert vms[vm]["fresh"] is True
                assert vms[vm]["cpu_demand"] == pytest.approx(cores, rel=0.1)
                assert vms[vm]["mem_demand_mb"] == VM_MEM_MB
                assert vms[vm]["sample_age_s"] < 10
            hosts = {h["name"]: h for h in state["hosts"]}
            assert hosts["hA"]["fresh"] and hosts["hB"]["fresh"]  # "hB:9100" matched "hB"
            assert state["freshness"]["stale_vms"] == []
            report = httpx.post(f"{url}/v1/cycle", headers={"Authorization": "Bearer tok"},
                                timeout=60).json()
            recs = report["recommendations"]
            assert recs and all(r["source"] == "hA" and r["target"] == "hB" for r in recs)
            metrics = httpx.get(f"{url}/metrics").text
            age = [ln for ln in metrics.splitlines()
                   if ln.startswith("balancer_ingestion_age_seconds ")]
            assert age and float(age[0].split()[1]) < 10
    finally:
        controller.close()


def test_unreachable_prometheus_is_reported_not_crashed(tmp_path: Path) -> None:
    cfg = parse_config({
        "cluster": {"time_limit_s": 1.0},
        "ingest": {"source": "prometheus", "window_s": 60, "stale_after_s": 30},
        "prometheus": {"url": f"http://127.0.0.1:{free_port()}", "timeout_s": 2},
        "store": {"path": str(tmp_path / "state.db")},
    })
    controller, _, telemetry = build(cfg, registry=CollectorRegistry())
    try:
        controller.set_inventory(inventory())
        report = controller.run_cycle()
        assert report.recommendations == []
        assert any("cycle failed: prometheus http://127.0.0.1:" in n for n in report.notes)
        assert "balancer_cycles_total{result=\"error\"} 1.0" in telemetry.render().decode()
    finally:
        controller.close()
