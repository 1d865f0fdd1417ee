"""Pull utilisation from a Prometheus server through its HTTP query API.

Each quantity (host CPU, host memory, VM CPU, VM memory) is one configurable PromQL query
(``[prometheus.queries]``; defaults for the node and libvirt exporters in
``balancer.config.DEFAULT_QUERIES``). Queries run as ``/api/v1/query_range`` over the
estimation window at ``step_s``; every returned point becomes a sample row. A host series is
named by ``host_label`` (an ``instance`` value such as ``node1:9100`` also matches inventory host
``node1``), a VM series by ``vm_label``.

HTTP and Prometheus errors are mapped at this boundary into ``PrometheusError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import httpx
import pandas as pd

from balancer.config import PrometheusConfig
from balancer.errors import BalancerError
from balancer.ingest.samples import empty_frame


class PrometheusError(BalancerError):
    """Prometheus could not be read (unreachable, bad query, bad answer)."""


class PrometheusSource:
    name = "prometheus"

    def __init__(self, cfg: PrometheusConfig, *, window_s: float,
                 host_names: Iterable[str] | Callable[[], Iterable[str]] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.cfg = cfg
        self.window_s = window_s
        self._host_names = host_names
        self._client = httpx.Client(base_url=cfg.url, timeout=cfg.timeout_s,
                                    transport=transport)
        self.last_error: str | None = None

    def close(self) -> None:
        self._client.close()

    def query_range(self, promql: str, start: float, end: float) -> list[dict]:
        try:
            r = self._client.get("/api/v1/query_range", params={
                "query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}",
                "step": f"{self.cfg.step_s:g}"})
        except httpx.HTTPError as exc:
            raise PrometheusError(f"prometheus {self.cfg.url}: {exc}") from None
        try:
            body = r.json()
        except ValueError:
            raise PrometheusError(
                f"prometheus {self.cfg.url}: HTTP {r.status_code}, not JSON") from None
        if r.status_code != 200 or body.get("status") != "success":
            raise PrometheusError(f"prometheus query {promql!r}: HTTP {r.status_code}: "
                                  f"{body.get('errorType', '')} {body.get('error', '')}".strip())
        data = body.get("data", {})
        if data.get("resultType") != "matrix":
            raise PrometheusError(f"prometheus query {promql!r}: expected a range vector, "
                                  f"got {data.get('resultType')!r}")
        return list(data.get("result", []))

    def host_names(self) -> set[str]:
        names = self._host_names() if callable(self._host_names) else self._host_names
        return set(names or ())

    @staticmethod
    def _host_name(value: str, known: set[str]) -> str:
        """An ``instance`` such as ``node1:9100`` names inventory host ``node1``."""
        if value in known:
            return value
        base = value.rsplit(":", 1)[0] if ":" in value else value
        return base if base in known or not known else value

    def frame(self, now: float) -> pd.DataFrame:
        """Samples for all four quantities over the window ending at ``now``."""
        start = now - self.window_s
        known = self.host_names()
        rows: dict[tuple[str, str, float], list[float]] = {}
        for key, kind, col, label in (("host_cpu", "host", 0, self.cfg.host_label),
                                      ("host_mem", "host", 1, self.cfg.host_label),
                                      ("vm_cpu", "vm", 0, self.cfg.vm_label),
                                      ("vm_mem", "vm", 1, self.cfg.vm_label)):
            for series in self.query_range(self.cfg.queries[key], start, now):
                value = series.get("metric", {}).get(label)
                if not value:
                    continue
                name = self._host_name(value, known) if kind == "host" else value
                for ts, v in series.get("values", []):
                    x = float(v)
                    if not math.isfinite(x):
                        continue
                    row = rows.setdefault((kind, name, float(ts)), [math.nan, math.nan])
                    row[col] = x
        if not rows:
            self.last_error = None
            return empty_frame()
        df = pd.DataFrame(
            [(ts, kind, name, c, m) for (kind, name, ts), (c, m) in rows.items()],
            columns=["ts", "kind", "name", "cpu", "mem"])
        # A point needs both quantities; carry the other one forward within its series.
        df = df.sort_values(["kind", "name", "ts"])
        df[["cpu", "mem"]] = df.groupby(["kind", "name"])[["cpu", "mem"]].ffill()
        df = df.dropna(subset=["cpu", "mem"]).reset_index(drop=True)
        self.last_error = None
        return df
