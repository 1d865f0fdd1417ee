"""Prometheus metrics of the service, on an injected ``CollectorRegistry``.

Nothing is created at import time: ``Telemetry(registry)`` registers the metrics below on the
registry it is given (one per service instance; tests use a fresh registry each). Names are
fixed and documented in docs/service.md. Labels are bounded: ``resource`` (cpu, mem),
``outcome`` (completed, failed, cancelled, skipped) and ``host`` (the cluster's hosts, a set
fixed by the inventory); no per-VM labels.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from balancer.events import EventBus

NAMES = (
    "balancer_cluster_imbalance",
    "balancer_host_utilization",
    "balancer_solve_duration_seconds",
    "balancer_migrations_total",
    "balancer_pending_recommendations",
    "balancer_cycle_duration_seconds",
    "balancer_ingestion_age_seconds",
    "balancer_samples_ingested_total",
    "balancer_stale_vms",
    "balancer_vms",
    "balancer_cycles_total",
    "balancer_leader",
    "balancer_leader_term",
)

OUTCOMES = ("completed", "failed", "cancelled", "skipped")


class Telemetry:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events = EventBus()  # the executor's migration events, for the console (SSE)
        self.imbalance = Gauge(
            "balancer_cluster_imbalance",
            "Population std of host utilisation (demand/capacity) over active hosts",
            ["resource"], registry=registry)
        self.host_util = Gauge(
            "balancer_host_utilization", "Host demand / capacity, 0..1+",
            ["host", "resource"], registry=registry)
        self.solve = Histogram(
            "balancer_solve_duration_seconds", "Wall time of one engine solve",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 4, 5, 8, 13, 30), registry=registry)
        self.migrations = Counter(
            "balancer_migrations", "Migrations carried out, by outcome", ["outcome"],
            registry=registry)
        for o in OUTCOMES:
            self.migrations.labels(outcome=o)
        self.pending = Gauge(
            "balancer_pending_recommendations", "Recommendations waiting for apply or dismiss",
            registry=registry)
        self.cycle = Histogram(
            "balancer_cycle_duration_seconds",
            "Wall time of one control cycle (ingest, estimate, solve, store)",
            buckets=(0.1, 0.25, 0.5, 1, 2, 3, 4, 5, 8, 13, 30, 60), registry=registry)
        self.ingestion_age = Gauge(
            "balancer_ingestion_age_seconds",
            "Age of the newest utilisation sample at the last estimate (NaN: none yet)",
            registry=registry)
        self.ingestion_age.set(float("nan"))
        self.samples = Counter(
            "balancer_samples_ingested", "Samples accepted by POST /v1/metrics",
            registry=registry)
        self.stale_vms = Gauge(
            "balancer_stale_vms", "VMs without fresh samples at the last estimate",
            registry=registry)
        self.vms = Gauge(
            "balancer_vms", "VMs in the inventory at the last estimate (balancer_stale_vms / "
            "balancer_vms: the stale share)", registry=registry)
        self.power_actions = Counter(
            "balancer_power_actions", "Host power actions (standby, wake) carried out, by "
            "outcome", ["action", "result"], registry=registry)
        self.hosts_standby = Gauge(
            "balancer_hosts_standby", "Hosts in standby in the inventory", registry=registry)
        self.forecast_wape = Gauge(
            "balancer_power_forecast_wape", "[power] forecast = true: the last cycle's forecast "
            "against this cycle's estimate, sum |estimate - forecast| / sum estimate",
            registry=registry)
        self.cycles = Counter(
            "balancer_cycles", "Control cycles run, by result", ["result"], registry=registry)
        self.leader = Gauge(
            "balancer_leader", "1 while this daemon leads (runs cycles and migrations), "
            "0 while it follows", registry=registry)
        self.term = Gauge(
            "balancer_leader_term", "The leadership term this daemon last saw",
            registry=registry)
        for r in ("ok", "error"):  # both series exist from the start (alerts compare them)
            self.cycles.labels(result=r)

    def set_hosts(self, util: dict[str, tuple[float, float]]) -> None:
        """Per-host (cpu, mem) utilisation; hosts gone from the inventory are removed."""
        self.host_util.clear()
        for host, (cpu, mem) in util.items():
            self.host_util.labels(host=host, resource="cpu").set(cpu)
            self.host_util.labels(host=host, resource="mem").set(mem)

    def render(self) -> bytes:
        return generate_latest(self.registry)
