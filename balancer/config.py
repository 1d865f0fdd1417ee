"""Service configuration (``balancer serve --config FILE``): TOML, validated at start.

Every section and key is documented in docs/service.md and in the example files under
``configs/``. Validation names the file, the section and the key at fault in one line, e.g.
``configs/x.toml: [loop] interval_s: must be a number > 0, got -5``; unknown sections and keys
are errors too (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import math
import os
import shlex
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
    solver_nice: int = 10  # niceness of the solver worker processes (0: the server's)
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


POWER_LEVELS = ("off", "manual", "automated")


@dataclass(frozen=True)
class PowerConfig:
    """``[power]``: the daemon's power management (standby and wake), see docs/service.md."""

    automation: str = "off"  # off | manual (recommend) | automated (carry out)
    target_util: float = 0.8  # CPU demand the hosts left on should carry, share of capacity
    max_switch: int = 1  # hosts put in standby or woken per cycle
    standby_cycles: int = 3  # cycles in a row the plan must want a standby before it is shown
    migration_w: float = 30.0  # watts a migration must save to be worth it
    forecast: bool = False  # plan on each VM's forecast peak (balancer.forecast), not the estimate
    idle_w: float = 180.0  # hosts without power.* labels: idle and peak watts
    peak_w: float = 450.0
    command: str | None = None  # template with {action} (standby|wake) and {host}
    command_timeout_s: float = 120.0


@dataclass(frozen=True)
class StoreConfig:
    path: str = "balancer.db"
    # PostgreSQL shared by several daemons (one leads): postgresql://user@host:port/db
    url: str | None = None
    lease_s: float = 10.0  # leader lease; a follower takes over this long after a crash
    node: str | None = None  # this daemon's name in /v1/leader (default host:pid)
    advertise: str | None = None  # the address other nodes name for this one

    @property
    def target(self) -> str:
        """What ``balancer.store.Store`` opens: the URL if any, else the SQLite path."""
        return self.url or self.path


@dataclass(frozen=True)
class ServiceConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    power: PowerConfig = field(default_factory=PowerConfig)
    demo: bool = False
    source_path: str | None = None

    def token(self) -> str | None:
        """The API token: ``BALANCER_API_TOKEN``, else the systemd credential
        ``$CREDENTIALS_DIRECTORY/api_token`` (``LoadCredential=api_token:FILE``), else
        ``[server] api_token``. Read at each call, so a rotated credential takes effect."""
        env = os.environ.get("BALANCER_API_TOKEN")
        if env:
            return env
        cred = credential_token()
        return cred if cred else self.server.api_token


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
    known = {"server", "loop", "cluster", "ingest", "prometheus", "executor", "store", "power"}
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
    nice = s.integer("solver_nice", 10, minimum=0)
    if nice > 19:
        raise ConfigError(f"{where}: [server] solver_nice: must be 0..19, got {nice}")
    server = ServerConfig(host=s.string("host", "127.0.0.1"), port=port,
                          api_token=s.string("api_token", None),
                          read_auth=s.boolean("read_auth", False),
                          max_body_mb=s.number("max_body_mb", 10.0),
                          max_concurrent_solves=solves,
                          solve_wall_s=s.number("solve_wall_s", 60.0),
                          solver_nice=nice,
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
    url = s.string("url", None)
    if url is not None and not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{where}: [store] url: must be a postgresql:// URL, got {url!r}")
    if url is not None and s.has("path"):
        raise ConfigError(f"{where}: [store] url: give path (SQLite) or url (PostgreSQL), "
                          "not both")
    lease_s = s.number("lease_s", 10.0, minimum=1.0, strict=False)
    store = StoreConfig(path=path, url=url, lease_s=lease_s, node=s.string("node", None),
                        advertise=s.string("advertise", None))
    s.done()

    power = parse_power(_Section(where, "power", data.get("power", {})))

    if ingest.source == "libvirt" and executor.backend != "libvirt":
        raise ConfigError(f"{where}: [ingest] source: 'libvirt' needs [executor] backend = "
                          "'libvirt'")
    if ingest.source in ("push", "prometheus") and cluster.inventory is None:
        pass  # inventory may be pushed later through POST /v1/inventory
    return ServiceConfig(server=server, loop=loop, cluster=cluster, ingest=ingest,
                         prometheus=prom, executor=executor, store=store, power=power,
                         source_path=None if where == "config" else where)


def parse_power(s: _Section) -> PowerConfig:
    """``[power]``, validated; a bad command template is refused here, not at 3 a.m."""
    target = s.number("target_util", 0.8)
    if target > 1:
        raise s._err("target_util", f"must be in (0, 1], got {target:g}")
    idle_w, peak_w = s.number("idle_w", 180.0, strict=False), s.number("peak_w", 450.0)
    if peak_w < idle_w:
        raise s._err("peak_w", f"must be >= idle_w ({idle_w:g}), got {peak_w:g}")
    command = s.string("command", None)
    if command is not None:
        try:
            parts = [p.format(action="standby", host="h") for p in shlex.split(command)]
        except (KeyError, IndexError, ValueError) as exc:
            raise s._err("command", f"bad template {command!r} ({exc}); use {{action}} and "
                                    "{host}") from None
        if not parts:
            raise s._err("command", "must name a program")
    power = PowerConfig(
        automation=s.string("automation", "off", choices=POWER_LEVELS),
        target_util=target,
        max_switch=s.integer("max_switch", 1, minimum=1),
        standby_cycles=s.integer("standby_cycles", 3, minimum=1),
        migration_w=s.number("migration_w", 30.0, strict=False),
        forecast=s.boolean("forecast", False),
        idle_w=idle_w, peak_w=peak_w, command=command,
        command_timeout_s=s.number("command_timeout_s", 120.0),
    )
    s.done()
    return power


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


# -- systemd credentials -------------------------------------------------------------------------
TOKEN_CREDENTIAL = "api_token"


def credential_token() -> str | None:
    """The API token from systemd's credential folder, if the unit passes one.

    ``LoadCredential=api_token:/etc/balancer/api_token`` makes systemd copy that file (readable
    by root only) to ``$CREDENTIALS_DIRECTORY/api_token``, readable by the service's user only
    and never in the unit's text or environment. Surrounding whitespace is dropped; a missing
    or empty file means no credential.
    """
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if not folder:
        return None
    path = Path(folder) / TOKEN_CREDENTIAL
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"credential {path}: cannot read: {exc.strerror}") from None
    return text or None


# -- the documented full config (``balancer config example``) -------------------------------------
# One line per key of the dataclasses above. ``example_config`` walks the dataclasses, so a key
# added there appears in the example with its default; tests/test_packaging_config.py checks
# that every key has a line here and that the example parses back to the defaults.
SECTION_DOCS: dict[str, str] = {
    "server": "The HTTP API (/v1, /metrics, /healthz).",
    "loop": "The control loop: one cycle = ingest, estimate, solve, store, execute by level.",
    "cluster": "The cluster and how the engine may change it.",
    "ingest": "Where utilisation comes from and how demand is estimated from it.",
    "prometheus": "The Prometheus server read when [ingest] source = \"prometheus\".",
    "executor": "How migrations are carried out (automation level partially/fully, or apply).",
    "store": "The service's state: recommendations, history, cycles, inventory (SQLite).",
    "power": "Power management: hosts put in standby when the others can carry the demand, "
             "woken when they cannot (docs/service.md, \"Power management\").",
}
KEY_DOCS: dict[str, str] = {
    "server.host": "listen address",
    "server.port": "listen port (0: any free port)",
    "server.api_token": "bearer token for mutating endpoints; BALANCER_API_TOKEN and the "
                        "systemd credential $CREDENTIALS_DIRECTORY/api_token win over it. "
                        "None: mutating endpoints are refused. Prefer the credential.",
    "server.read_auth": "reads (/v1 GETs, /metrics) need the token too (Prometheus then "
                        "scrapes with the bearer token)",
    "server.max_body_mb": "request bodies above this many MB get 413",
    "server.max_concurrent_solves": "solves requested over HTTP at once (what-if, placement, "
                                    "cycle, maintenance); more get 429",
    "server.solve_wall_s": "wall-clock cap of a solve requested over HTTP, seconds (then 503)",
    "server.solver_nice": "niceness (0..19) of the solver worker processes, so that API reads "
                          "and the control loop get the CPU first while solves run; 0: the "
                          "server's own priority",
    "server.tls_cert": "PEM certificate chain: serve HTTPS (with tls_key)",
    "server.tls_key": "PEM private key for tls_cert",
    "loop.interval_s": "seconds between control cycles",
    "loop.imbalance_cycles": "cycles an imbalance must persist before balancing moves",
    "loop.cooldown_s": "seconds a moved or dismissed VM is held for balance",
    "cluster.name": "cluster name shown by the API",
    "cluster.automation": "manual (recommend), partially (also place new VMs), fully (execute)",
    "cluster.vm_automation": "per-VM override of the automation level: disabled, manual, "
                             "partially, fully",
    "cluster.threshold": "migration threshold 1 (mandatory moves only) .. 5 (most aggressive)",
    "cluster.max_migrations": "at most this many migrations per cycle (unset: no budget)",
    "cluster.max_moved_mem_gb": "at most this much memory moved per cycle, GB (unset: no budget)",
    "cluster.mem_overcommit": "host memory capacity x this = what VMs may be given",
    "cluster.cpu_headroom": "share of host CPU kept free (0.1: plan to 90 %)",
    "cluster.time_limit_s": "solver wall time per cycle, seconds",
    "cluster.seed": "solver seed (same input and seed: same plan)",
    "cluster.inventory": "snapshot v1 file (hosts, VMs, rules) loaded at start; unset: POST "
                         "/v1/inventory. Relative to this file.",
    "ingest.source": "push (POST /v1/metrics), prometheus, simulated or libvirt",
    "ingest.window_s": "estimation window, seconds",
    "ingest.estimator": "mean, percentile or max of the samples in the window",
    "ingest.percentile": "the percentile, when estimator = percentile (0, 100]",
    "ingest.stale_after_s": "a host or VM whose newest sample is older is stale (not moved)",
    "ingest.retention_s": "pushed samples kept this long, seconds (>= window_s)",
    "ingest.simulated_period_s": "simulated source: one sample per VM and host per period",
    "prometheus.url": "Prometheus server (http:// or https://)",
    "prometheus.step_s": "query_range step, seconds",
    "prometheus.timeout_s": "HTTP timeout per query, seconds",
    "prometheus.host_label": "label naming the host in host series (node1:9100 matches node1)",
    "prometheus.vm_label": "label naming the VM in VM series",
    "prometheus.queries": "PromQL per quantity, one series per host/VM; CPU in cores used, "
                          "memory in MiB used",
    "executor.backend": "simulated or libvirt",
    "executor.config": "the executor's own config file (limits, timeouts, retries, journal, "
                       "[backend.libvirt] hosts; the format of `balancer execute --config`). "
                       "Relative to this file.",
    "executor.settings": "the same executor config, inline as [executor.settings] (not with "
                         "config). Neither: the executor's defaults, journal at <store>.journal",
    "store.path": "SQLite file (recommendations, history, cycles, inventory); relative to this "
                  "file. Its folder must be writable (journal, WAL files beside it).",
    "store.url": "PostgreSQL shared by several daemons for high availability "
                 "(postgresql://user@host:port/db; then one daemon leads); unset: SQLite at path",
    "store.lease_s": "leader lease, seconds: a follower takes over this long after the "
                     "leader stops renewing it",
    "store.node": "this daemon's name in /v1/leader (default: host:pid)",
    "store.advertise": "the address other daemons and clients are told to use for this one",
    "power.automation": "off, manual (standby and wake are recommended) or automated (carried "
                        "out: the moves that empty a host, then its command)",
    "power.target_util": "CPU demand the hosts left on may carry, share of their capacity "
                         "(0, 1]; above it a host in standby is woken",
    "power.max_switch": "hosts put in standby or woken per cycle",
    "power.standby_cycles": "cycles in a row the plan must want a host in standby before it "
                            "is recommended (waking is never delayed)",
    "power.migration_w": "watts a migration must save to be worth it",
    "power.forecast": "plan on each VM's forecast CPU peak for the next cycle (exponentially "
                      "weighted mean + 1.5 std of its samples, at least the last one) instead "
                      "of the [ingest] estimate; the forecast's error (WAPE) is reported",
    "power.idle_w": "idle watts of hosts without power.idle_w / power.table_w labels",
    "power.peak_w": "full-load watts of hosts without power.peak_w / power.table_w labels",
    "power.command": "run to power a host down or up: a template with {action} (standby or "
                     "wake) and {host}, e.g. \"/usr/local/bin/host-power {action} {host}\" "
                     "(IPMI, wake-on-LAN); unset: the host's state changes and the operator "
                     "switches it",
    "power.command_timeout_s": "seconds the command may run before it counts as failed",
}
# Shown (commented out) for keys whose default is unset.
KEY_EXAMPLES: dict[str, str] = {
    "server.api_token": '"change-me"',
    "server.tls_cert": '"/etc/balancer/tls/cert.pem"',
    "server.tls_key": '"/etc/balancer/tls/key.pem"',
    "cluster.max_migrations": "10",
    "cluster.max_moved_mem_gb": "256.0",
    "cluster.inventory": '"/etc/balancer/inventory.json"',
    "executor.config": '"/etc/balancer/executor.toml"',
    "power.command": '"/usr/local/bin/host-power {action} {host}"',
}
_NOT_TOML = ("demo", "source_path")  # ServiceConfig fields that are not config keys


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    raise TypeError(f"no TOML literal for {value!r}")


def _comment(text: str, indent: str = "") -> list[str]:
    import textwrap

    return [f"{indent}# {line}" for line in textwrap.wrap(text, 96 - len(indent))]


def config_sections() -> list[tuple[str, Any]]:
    """(section name, dataclass type) for every TOML section of ``ServiceConfig``."""
    import dataclasses

    defaults = ServiceConfig()
    return [(f.name, type(getattr(defaults, f.name))) for f in dataclasses.fields(ServiceConfig)
            if f.name not in _NOT_TOML]


def example_config() -> str:
    """The documented full config: every section and key with its default and a comment.

    Generated from the dataclasses the daemon parses into, so it cannot fall behind them; keys
    whose default is unset are shown commented out with an example value. The text parses
    (``parse_config``) back to the defaults.
    """
    import dataclasses

    out = ["# balancer service config (balancer serve --config FILE). Every key with its default;",
           "# `balancer config check FILE` validates a file with the daemon's own code.",
           "# Unknown sections and keys are errors. Generated by `balancer config example`."]
    for section, cls in config_sections():
        out += ["", *_comment(SECTION_DOCS.get(section, "")), f"[{section}]"]
        tables: list[tuple[str, Any]] = []
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            default = getattr(cls(), f.name)
            if isinstance(default, dict) or (default is None and key == "executor.settings"):
                tables.append((f.name, default))
                continue
            out += _comment(KEY_DOCS.get(key, "(undocumented)"))
            if default is None:
                out.append(f"# {f.name} = {KEY_EXAMPLES.get(key, '...')}")
            else:
                out.append(f"{f.name} = {_toml_value(default)}")
        for name, default in tables:
            key = f"{section}.{name}"
            out += ["", *_comment(KEY_DOCS.get(key, "(undocumented)"))]
            if default is None:
                out += [f"# [{key}]", "# limits = { max_concurrent = 2 }"]
                continue
            out.append(f"[{key}]")
            if not default:
                out.append('# vm-042 = "disabled"')
            for k, v in default.items():
                out.append(f"{k} = {_toml_value(v)}")
    return "\n".join(out) + "\n"
