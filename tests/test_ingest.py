"""Ingestion: the sample buffer, demand estimation, freshness, Prometheus parsing, configs."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from balancer.config import (
    DEFAULT_QUERIES,
    ConfigError,
    PrometheusConfig,
    load_config,
    parse_config,
)
from balancer.ingest import SampleBuffer, apply_estimates, estimate
from balancer.ingest.demand import FRESH_RULE
from balancer.ingest.prometheus import PrometheusError, PrometheusSource
from balancer.service import plan
from tests.conftest import det, doc, host, snap, vm

ROOT = Path(__file__).parents[1]


def frame(rows: list[tuple[float, str, str, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["ts", "kind", "name", "cpu", "mem"])


def test_estimators_over_the_window() -> None:
    now = 1000.0
    rows = [(now - 500, "vm", "a", 100.0, 100.0)]  # outside the 300 s window
    rows += [(now - 290 + 10 * i, "vm", "a", float(i), 10.0 * i) for i in range(21)]
    f = frame(rows)
    mean = estimate(f, now, window_s=300, method="mean")
    assert mean.vm_cpu["a"] == pytest.approx(10.0)
    assert mean.vm_mem["a"] == pytest.approx(100.0)
    p95 = estimate(f, now, window_s=300, method="percentile", percentile=95)
    assert p95.vm_cpu["a"] == pytest.approx(19.0)
    assert estimate(f, now, window_s=300, method="max").vm_cpu["a"] == 20.0
    assert mean.vm_last["a"] == now - 90
    assert estimate(f, now, window_s=300).newest == now - 90
    assert estimate(frame([]), now, window_s=300).vm_cpu == {}


def test_samples_after_now_are_ignored() -> None:
    f = frame([(90.0, "vm", "a", 1.0, 1.0), (200.0, "vm", "a", 9.0, 9.0)])
    est = estimate(f, 100.0, window_s=60, method="max")
    assert est.vm_cpu == {"a": 1.0} and est.newest == 90.0


def cluster() -> tuple[dict, object]:
    d = doc([host("h1"), host("h2"), host("h3")],
            [vm("a", "h1", cpu=2.0), vm("b", "h1", cpu=2.0), vm("c", "h2", cpu=1.0)])
    return d, snap(d["hosts"], d["vms"])


def fresh_frame(now: float, vms: dict[str, float], hosts: tuple[str, ...]) -> pd.DataFrame:
    rows = [(now - 10, "vm", n, c, 1000.0) for n, c in vms.items()]
    rows += [(now - 10, "host", h, 1.0, 1000.0) for h in hosts]
    return frame(rows)


def test_estimates_replace_inventory_demand_and_are_clamped() -> None:
    _, inv = cluster()
    now = 5000.0
    est = estimate(fresh_frame(now, {"a": 3.0, "b": 9.0, "c": 0.5}, ("h1", "h2", "h3")), now,
                   window_s=300, method="mean")
    s, fresh = apply_estimates(inv, est, now, stale_after_s=60)
    d = {v.name: v for v in s.vms}
    assert d["a"].cpu_demand == 3000 and d["c"].cpu_demand == 500
    assert d["b"].cpu_demand == 4000 and fresh.clamped == 1  # vcpus = 4
    assert d["a"].mem_demand == 1000
    assert fresh.pinned == {} and fresh.stale_vms == [] and fresh.stale_hosts == []
    assert not any(r.name == FRESH_RULE for r in s.rules)


def test_stale_vm_is_pinned_and_stale_host_receives_nothing() -> None:
    _, inv = cluster()
    now = 5000.0
    rows = fresh_frame(now, {"a": 3.0, "c": 0.5}, ("h1", "h2"))
    rows = pd.concat([rows, frame([(now - 900, "vm", "b", 1.0, 1.0)])], ignore_index=True)
    est = estimate(rows, now, window_s=300, method="mean")
    s, fresh = apply_estimates(inv, est, now, stale_after_s=60)
    assert fresh.pinned["b"] == "newest sample 900 s old"
    assert fresh.stale_vms == ["b"] and fresh.stale_hosts == ["h3"]
    assert fresh.vm_age["b"] == 900 and fresh.host_age["h3"] is None
    d = {v.name: v for v in s.vms}
    assert d["b"].automation.value == "manual" and d["b"].cpu_demand == 2000  # inventory value
    rule = next(r for r in s.rules if r.name == FRESH_RULE)
    assert rule.hosts == ("h1", "h2") and set(rule.vms) == {"a", "c"}
    # The engine honours it: nothing goes to h3 although it is empty.
    result = plan(s, det(threshold=5))
    assert all(m.target != "h3" for m in result.moves)
    assert all(m.vm != "b" for m in result.moves)


def test_no_fresh_host_pins_everything_but_evacuation_goes_on() -> None:
    d, _ = cluster()
    d["hosts"][0]["state"] = "maintenance"
    inv = snap(d["hosts"], d["vms"])
    s, fresh = apply_estimates(inv, None, 100.0, stale_after_s=60)
    assert fresh.pinned == {"c": "no fresh samples"}
    result = plan(s, det())
    assert {m.vm for m in result.moves} == {"a", "b"}  # evacuated with inventory demand
    assert all(m.reason.startswith("evacuates h1") for m in result.moves)


def test_affinity_group_is_pinned_together() -> None:
    d, _ = cluster()
    rules = [{"name": "ab", "type": "affinity", "vms": ["a", "b"]}]
    inv = snap(d["hosts"], d["vms"], rules)
    now = 100.0
    est = estimate(fresh_frame(now, {"a": 1.0, "c": 1.0}, ("h1", "h2", "h3")), now,
                   window_s=60, method="mean")
    _, fresh = apply_estimates(inv, est, now, stale_after_s=60)
    assert fresh.pinned == {"a": "affine to pinned VM b", "b": "no fresh samples"}


def test_buffer_keeps_every_sample_under_concurrent_push() -> None:
    buf = SampleBuffer(retention_s=10_000)
    n_threads, batches, size = 4, 50, 200

    def push(k: int) -> None:
        for b in range(batches):
            ts = [1000.0 + b] * size
            buf.add(ts, ["vm"] * size, [f"vm-{k}-{i}" for i in range(size)],
                    [1.0] * size, [2.0] * size)

    threads = [threading.Thread(target=push, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    seen = 0
    while any(t.is_alive() for t in threads):
        seen = len(buf.frame(1100.0))  # readers run meanwhile
    for t in threads:
        t.join()
    f = buf.frame(1100.0)
    assert len(f) == n_threads * batches * size == buf.total
    assert seen <= len(f)
    assert len(buf.frame(1040.0 + 10_000)) == n_threads * 9 * size  # older ones dropped
    assert buf.frame(1050.0 + 10_000).empty


def prom_answer(series: list[dict]) -> dict:
    return {"status": "success", "data": {"resultType": "matrix", "result": series}}


def test_prometheus_source_maps_series_to_samples() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        q = request.url.params["query"]
        calls.append(q)
        if q == DEFAULT_QUERIES["host_cpu"]:
            return httpx.Response(200, json=prom_answer([
                {"metric": {"instance": "h1:9100"}, "values": [[100, "3.5"], [130, "4.5"]]}]))
        if q == DEFAULT_QUERIES["host_mem"]:
            return httpx.Response(200, json=prom_answer([
                {"metric": {"instance": "h1:9100"}, "values": [[100, "2048"], [130, "NaN"]]}]))
        if q == DEFAULT_QUERIES["vm_cpu"]:
            return httpx.Response(200, json=prom_answer([
                {"metric": {"domain": "a"}, "values": [[100, "1.25"]]},
                {"metric": {}, "values": [[100, "9"]]}]))
        return httpx.Response(200, json=prom_answer([
            {"metric": {"domain": "a"}, "values": [[100, "512"]]}]))

    src = PrometheusSource(PrometheusConfig(url="http://prom.test"), window_s=600,
                           host_names=["h1", "h2"], transport=httpx.MockTransport(handler))
    f = src.frame(130.0).sort_values(["kind", "name", "ts"]).reset_index(drop=True)
    assert len(calls) == 4
    assert f.to_dict("records") == [
        {"ts": 100.0, "kind": "host", "name": "h1", "cpu": 3.5, "mem": 2048.0},
        {"ts": 130.0, "kind": "host", "name": "h1", "cpu": 4.5, "mem": 2048.0},
        {"ts": 100.0, "kind": "vm", "name": "a", "cpu": 1.25, "mem": 512.0},
    ]
    src.close()


@pytest.mark.parametrize("status,body,match", [
    (400, {"status": "error", "errorType": "bad_data", "error": "parse error"}, "parse error"),
    (200, {"status": "success", "data": {"resultType": "vector", "result": []}}, "range vector"),
    (502, None, "not JSON"),
])
def test_prometheus_errors_are_mapped(status: int, body: dict | None, match: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if body is None:
            return httpx.Response(status, text="<html>bad gateway</html>")
        return httpx.Response(status, json=body)

    src = PrometheusSource(PrometheusConfig(url="http://prom.test"), window_s=60,
                           transport=httpx.MockTransport(handler))
    with pytest.raises(PrometheusError, match=match):
        src.frame(100.0)
    src.close()


def test_prometheus_unreachable_is_a_prometheus_error() -> None:
    src = PrometheusSource(PrometheusConfig(url="http://127.0.0.1:1", timeout_s=2), window_s=60)
    with pytest.raises(PrometheusError, match="127.0.0.1:1"):
        src.frame(100.0)
    src.close()


def test_example_configs_load() -> None:
    for name in ("demo", "prometheus-recommend", "libvirt-full-auto"):
        cfg = load_config(ROOT / "configs" / f"{name}.toml")
        assert cfg.server.host == "127.0.0.1"
    assert load_config(ROOT / "configs/prometheus-recommend.toml").prometheus.queries == \
        DEFAULT_QUERIES


@pytest.mark.parametrize("data,message", [
    ({"loop": {"interval_s": 0}}, "[loop] interval_s: must be a number > 0, got 0"),
    ({"loop": {"intervall_s": 5}}, "[loop] intervall_s: unknown key"),
    ({"cluster": {"automation": "auto"}},
     "[cluster] automation: must be one of manual, partially, fully, got 'auto'"),
    ({"cluster": {"vm_automation": {"v1": "sometimes"}}}, "[cluster.vm_automation] v1:"),
    ({"cluster": {"threshold": 6}}, "[cluster] threshold: must be 1..5, got 6"),
    ({"ingest": {"percentile": 101}}, "[ingest] percentile: must be in (0, 100]"),
    ({"ingest": {"window_s": 600, "retention_s": 60}}, "[ingest] retention_s: must be >="),
    ({"prometheus": {"url": "localhost:9090"}}, "[prometheus] url: must start with http://"),
    ({"prometheus": {"queries": {"vm_disk": "x"}}}, "[prometheus.queries] vm_disk: unknown"),
    ({"server": {"port": 70000}}, "[server] port: must be <= 65535"),
    ({"servr": {}}, "[servr]: unknown section"),
    ({"ingest": {"source": "libvirt"}}, "[ingest] source: 'libvirt' needs [executor] backend"),
    ({"cluster": {"inventory": "/nonexistent.json"}}, "[cluster] inventory: no such file"),
])
def test_config_errors_name_section_and_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, where="svc.toml")
    assert message in str(info.value) and str(info.value).startswith("svc.toml: ")


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[loop\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_env_token_overrides_config(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config({"server": {"api_token": "from-file"}})
    monkeypatch.delenv("BALANCER_API_TOKEN", raising=False)
    assert cfg.token() == "from-file"
    monkeypatch.setenv("BALANCER_API_TOKEN", "from-env")
    assert cfg.token() == "from-env"
    assert np.isfinite(parse_config({}).ingest.window_s)
