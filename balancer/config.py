"""Service configuration (``balancer serve --config FILE``): TOML, validated at start.

Every section and key is documented in docs/service.md and in the example files under
``configs/``. Validation names the file, the section and the key at fault in one line, e.g.
``configs/x.toml: [loop] interval_s: must be a number > 0, got -5``; unknown sections and keys
are errors too (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balancer.errors import InputError, read_text

LEVELS = ("manual", "partially", "fully")
VM_LEVELS = ("disabled", "manual", "partially", "fully")
SOURCES = ("push", "prometheus", "simulated", "libvirt")
BACKENDS = ("simulated", "libvirt")
ESTIMATORS = ("mean", "percentile", "max")
QUERY_KEYS = ("host_cpu", "host_mem", "vm_cpu", "vm_mem")

# PromQL defaults for the node exporter (hosts) and the libvirt exporter (VMs). Each query
# returns one series per host (label ``host_label``) or per VM (label ``vm_label``); CPU in
# cores used, memory in MiB used.
DEFAULT_QUERIES = {
    "host_cpu": 'sum by (instance) (rate(node_cpu_seconds_total{mode!="idle"}[2m]))',
    "host_mem": "(node_memory_MemTotal_bytes - node_memory_MemAvailable_bytes) / 1048576",
    "vm_cpu": "sum by (domain) (rate(libvirt_domain_info_cpu_time_seconds_total[2m]))",
    "vm_mem": "sum by (domain) (libvirt_domain_info_memory_usage_bytes) / 1048576",
}


class ConfigError(InputError):
    """A service config that cannot be used; the message names the section and key."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_token: str | None = None  # BALANCER_API_TOKEN overrides; None: mutating calls refused
    read_auth: bool = False  # reads (/v1 GETs, /metrics) need the token too
    max_body_mb: float = 10.0  # request bodies above this get 413
    max_concurrent_solves: int = 2  # what-if, placement, cycle, maintenance; more get 429
    solve_wall_s: float = 60.0  # wall-clock cap of a solve requested over HTTP (then 503)
    tls_cert: str | None = None  # PEM certificate chain: serve HTTPS (with tls_key)
    tls_key: str | None = None  # PEM private key


@dataclass(frozen=True)
class LoopConfig:
    interval_s: float = 300.0
    imbalance_cycles: int = 3  # imbalance must persist this many cycles before balancing moves
    cooldown_s: float = 3600.0  # a VM moved (or dismissed) is not moved again for balance


@dataclass(frozen=True)
class ClusterConfig:
    name: str = "default"
    automation: str = "manual"
    vm_automation: dict[str, str] = field(default_factory=dict)
    threshold: int = 3
    max_migrations: int | None = None
    max_moved_mem_gb: float | None = None
    mem_overcommit: float = 1.0
    cpu_headroom: float = 0.1
    time_limit_s: float = 3.0
    seed: int = 0
    inventory: str | None = None  # snapshot v1 file: hosts, VMs, rules at start

    def vm_level(self, vm: str) -> str:
        return self.vm_automation.get(vm, self.automation)


@dataclass(frozen=True)
class IngestConfig:
    source: str = "push"
    window_s: float = 600.0
    estimator: str = "percentile"
    percentile: float = 95.0
    stale_after_s: float = 600.0
    retention_s: float = 3600.0
    simulated_period_s: float = 10.0  # simulated source: one sample per VM and host per period


@dataclass(frozen=True)
class PrometheusConfig:
    url: str = "http://127.0.0.1:9090"
    step_s: float = 30.0
    timeout_s: float = 10.0
    host_label: str = "instance"
    vm_label: str = "domain"
    queries: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_QUERIES))


@dataclass(frozen=True)
class ExecutorConfig:
    backend: str = "simulated"
    # The executor's own config (limits, timeouts, retries, journal, [backend.libvirt] hosts;
    # the format of `balancer execute --config`): a file, or inline as [executor.settings].
    # Neither: the executor's defaults, with its journal beside the store.
    config: str | None = None
    settings: dict[str, Any] | None = None


@dataclass(frozen=True)
class StoreConfig:
    path: str = "balancer.db"


@dataclass(frozen=True)
class ServiceConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    demo: bool = False
    source_path: str | None = None

    def token(self) -> str | None:
        env = os.environ.get("BALANCER_API_TOKEN")
        return env if env else self.server.api_token


class _Section:
    def __init__(self, where: str, name: str, raw: Any) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: [{name}] must be a table, got {type(raw).__name__}")
        self.where, self.name, self.raw, self.used = where, name, raw, set()

    def _err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.where}: [{self.name}] {key}: {msg}")

    def get(self, key: str) -> Any:
        self.used.add(key)
        return self.raw.get(key)

    def has(self, key: str) -> bool:
        return key in self.raw

    def number(self, key: str, default: float | None, *, minimum: float = 0.0,
               strict: bool = True, optional: bool = False) -> Any:
        self.used.add(key)
        if key not in self.raw:
            return default
        v = self.raw[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self._err(key, f"must be a number, got {v!r}")
        if v < minimum or (strict and v == minimum):
            raise self._err(key, f"must be a number {'>' if strict else '>='} {minimum:g}, "
                                 f"got {v!r}")
        return float(v)

    def integer(self, key: str, default: int | None, *, minimum: int = 0) -> Any:
        self.used.add(key)
        if key not in self.raw:
            return default
        v = self.raw[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._err(key, f"must be a whole number, got {v!r}")
        if v < minimum:
            raise self._err(key, f"must be >= {minimum}, got {v!r}")
        return v

    def boolean(self, key: str, default: bool) -> bool:
        self.used.add(key)
        if key not in self.raw:
            return default
        v = self.raw[key]
        if not isinstance(v, bool):
            raise self._err(key, f"must be true or false, got {v!r}")
        return v

    def string(self, key: str, default: str | None, *, choices: tuple[str, ...] = ()) -> Any:
        self.used.add(key)
        if key not in self.raw:
            return default
        v = self.raw[key]
        if not isinstance(v, str) or not v.strip():
            raise self._err(key, f"must be a non-empty string, got {v!r}")
        if choices and v not in choices:
            raise self._err(key, f"must be one of {', '.join(choices)}, got {v!r}")
        return v

    def table(self, key: str) -> dict[str, Any]:
        self.used.add(key)
        v = self.raw.get(key, {})
        if not isinstance(v, dict):
            raise self._err(key, f"must be a table, got {type(v).__name__}")
        return v

    def done(self) -> None:
        extra = sorted(set(self.raw) - self.used)
        if extra:
            raise self._err(extra[0], "unknown key")


def parse_config(data: dict[str, Any], *, where: str = "config") -> ServiceConfig:
    """Validate a decoded TOML document into a ``ServiceConfig``."""
    known = {"server", "loop", "cluster", "ingest", "prometheus", "executor", "store"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}: [{key}]: unknown section (known: "
                              f"{', '.join(sorted(known))})")

    s = _Section(where, "server", data.get("server", {}))
    port = s.integer("port", 8080, minimum=0)
    if port > 65535:
        raise ConfigError(f"{where}: [server] port: must be <= 65535, got {port}")
    tls: dict[str, str | None] = {}
    for key in ("tls_cert", "tls_key"):
        tls[key] = s.string(key, None)
        if tls[key] is not None and not Path(tls[key]).is_absolute() and where != "config":
            tls[key] = str(Path(where).parent / tls[key])  # type: ignore[arg-type]
        if tls[key] is not None and not Path(tls[key]).is_file():  # type: ignore[arg-type]
            raise ConfigError(f"{where}: [server] {key}: no such file {tls[key]!r}")
    if (tls["tls_cert"] is None) != (tls["tls_key"] is None):
        raise ConfigError(f"{where}: [server] tls_cert: give both tls_cert and tls_key "
                          "(or neither)")
    solves = s.integer("max_concurrent_solves", 2, minimum=1)
    if solves > 64:
        raise ConfigError(f"{where}: [server] max_concurrent_solves: must be 1..64, got {solves}")
    server = ServerConfig(host=s.string("host", "127.0.0.1"), port=port,
                          api_token=s.string("api_token", None),
                          read_auth=s.boolean("read_auth", False),
                          max_body_mb=s.number("max_body_mb", 10.0),
                          max_concurrent_solves=solves,
                          solve_wall_s=s.number("solve_wall_s", 60.0),
                          tls_cert=tls["tls_cert"], tls_key=tls["tls_key"])
    s.done()

    s = _Section(where, "loop", data.get("loop", {}))
    loop = LoopConfig(interval_s=s.number("interval_s", 300.0),
                      imbalance_cycles=s.integer("imbalance_cycles", 3, minimum=1),
                      cooldown_s=s.number("cooldown_s", 3600.0, strict=False))
    s.done()

    s = _Section(where, "cluster", data.get("cluster", {}))
    overrides = s.table("vm_automation")
    for vm, level in overrides.items():
        if level not in VM_LEVELS:
            raise ConfigError(f"{where}: [cluster.vm_automation] {vm}: must be one of "
                              f"{', '.join(VM_LEVELS)}, got {level!r}")
    threshold = s.integer("threshold", 3, minimum=1)
    if threshold > 5:
        raise ConfigError(f"{where}: [cluster] threshold: must be 1..5, got {threshold}")
    inventory = s.string("inventory", None)
    if inventory is not None and not Path(inventory).is_absolute() and where != "config":
        inventory = str(Path(where).parent / inventory)
    cluster = ClusterConfig(
        name=s.string("name", "default"),
        automation=s.string("automation", "manual", choices=LEVELS),
        vm_automation=dict(overrides),
        threshold=threshold,
        max_migrations=s.integer("max_migrations", None),
        max_moved_mem_gb=s.number("max_moved_mem_gb", None, strict=False),
        mem_overcommit=s.number("mem_overcommit", 1.0),
        cpu_headroom=s.number("cpu_headroom", 0.1, strict=False),
        time_limit_s=s.number("time_limit_s", 3.0),
        seed=s.integer("seed", 0),
        inventory=inventory,
    )
    s.done()
    if cluster.inventory is not None and not Path(cluster.inventory).is_file():
        raise ConfigError(f"{where}: [cluster] inventory: no such file {cluster.inventory!r}")

    s = _Section(where, "ingest", data.get("ingest", {}))
    ingest = IngestConfig(
        source=s.string("source", "push", choices=SOURCES),
        window_s=s.number("window_s", 600.0),
        estimator=s.string("estimator", "percentile", choices=ESTIMATORS),
        percentile=s.number("percentile", 95.0),
        stale_after_s=s.number("stale_after_s", 600.0),
        retention_s=s.number("retention_s", 3600.0),
        simulated_period_s=s.number("simulated_period_s", 10.0),
    )
    s.done()
    if ingest.percentile > 100:
        raise ConfigError(f"{where}: [ingest] percentile: must be in (0, 100], "
                          f"got {ingest.percentile:g}")
    if ingest.retention_s < ingest.window_s:
        raise ConfigError(f"{where}: [ingest] retention_s: must be >= window_s "
                          f"({ingest.window_s:g}), got {ingest.retention_s:g}")

    s = _Section(where, "prometheus", data.get("prometheus", {}))
    queries = dict(DEFAULT_QUERIES)
    for key, q in s.table("queries").items():
        if key not in QUERY_KEYS:
            raise ConfigError(f"{where}: [prometheus.queries] {key}: unknown query (known: "
                              f"{', '.join(QUERY_KEYS)})")
        if not isinstance(q, str) or not q.strip():
            raise ConfigError(f"{where}: [prometheus.queries] {key}: must be a PromQL string")
        queries[key] = q
    url = s.string("url", "http://127.0.0.1:9090")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: [prometheus] url: must start with http:// or https://, "
                          f"got {url!r}")
    prom = PrometheusConfig(url=url.rstrip("/"), step_s=s.number("step_s", 30.0),
                            timeout_s=s.number("timeout_s", 10.0),
                            host_label=s.string("host_label", "instance"),
                            vm_label=s.string("vm_label", "domain"), queries=queries)
    s.done()

    s = _Section(where, "executor", data.get("executor", {}))
    exec_file = s.string("config", None)
    if exec_file is not None and not Path(exec_file).is_absolute() and where != "config":
        exec_file = str(Path(where).parent / exec_file)
    settings = s.table("settings") if s.has("settings") else None
    executor = ExecutorConfig(
        backend=s.string("backend", "simulated", choices=BACKENDS),
        config=exec_file,
        settings=settings,
    )
    s.done()
    if exec_file is not None and settings is not None:
        raise ConfigError(f"{where}: [executor] config: give a file or [executor.settings], "
                          "not both")
    if exec_file is not None and not Path(exec_file).is_file():
        raise ConfigError(f"{where}: [executor] config: no such file {exec_file!r}")
    if settings is not None:
        from balancer.executor.config import parse_config as parse_exec

        try:
            parse_exec(settings, source=f"{where}: [executor.settings]")
        except InputError as exc:
            raise ConfigError(str(exc)) from None
    if executor.backend == "libvirt" and cluster.inventory is None:
        raise ConfigError(f"{where}: [cluster] inventory: the libvirt backend needs the hosts "
                          "and their capacities from an inventory file")

    s = _Section(where, "store", data.get("store", {}))
    path = s.string("path", "balancer.db")
    if path != ":memory:" and not Path(path).is_absolute() and where != "config":
        path = str(Path(where).parent / path)
    store = StoreConfig(path=path)
    s.done()

    if ingest.source == "libvirt" and executor.backend != "libvirt":
        raise ConfigError(f"{where}: [ingest] source: 'libvirt' needs [executor] backend = "
                          "'libvirt'")
    if ingest.source in ("push", "prometheus") and cluster.inventory is None:
        pass  # inventory may be pushed later through POST /v1/inventory
    return ServiceConfig(server=server, loop=loop, cluster=cluster, ingest=ingest,
                         prometheus=prom, executor=executor, store=store,
                         source_path=None if where == "config" else where)


def load_config(path: str | Path) -> ServiceConfig:
    p = Path(path)
    text = read_text(p, ConfigError)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse_config(data, where=str(p))


def demo_config(store_path: str, port: int = 8080, host: str = "127.0.0.1") -> ServiceConfig:
    """The out-of-the-box demo: bundled cluster, simulated metrics and backend."""
    return ServiceConfig(
        server=ServerConfig(host=host, port=port, api_token=None),
        loop=LoopConfig(interval_s=30.0, imbalance_cycles=1, cooldown_s=600.0),
        cluster=ClusterConfig(name="demo", automation="manual", time_limit_s=3.0),
        ingest=IngestConfig(source="simulated", window_s=300.0, estimator="percentile",
                            percentile=95.0, stale_after_s=120.0, retention_s=900.0,
                            simulated_period_s=10.0),
        executor=ExecutorConfig(backend="simulated"),
        store=StoreConfig(path=store_path),
        demo=True,
    )
