"""``balancer serve``: the control loop and the HTTP API in one process.

``balancer serve --config configs/<file>.toml`` or ``balancer serve --demo [--port N]`` (demo
cluster, simulated metrics and backend, SQLite in a temp dir). ``--port 0`` picks a free port.
The line ``balancer: listening on http://HOST:PORT`` on stderr tells where the API is.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import ipaddress
import logging
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from balancer.logs import FORMATS, LEVELS

log = logging.getLogger("balancer")

HELP = "run the balancer service: control loop + HTTP API (/v1, /metrics)"


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--port must be a whole number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"--port must be 0..65535, got {text!r}")
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(host: str, token: str | None, insecure: bool) -> None:
    """Refuse to listen beyond loopback without a token, unless told ``--insecure-no-auth``."""
    from balancer.errors import InputError

    if is_loopback(host) or token:
        return
    if not insecure:
        raise InputError(f"serve: refusing to listen on {host} without an API token: set "
                         "[server] api_token or BALANCER_API_TOKEN (or give "
                         "--insecure-no-auth to expose the reads anyway)")
    log.warning("listening on %s without an API token (--insecure-no-auth): reads are open "
                "to the network", host)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="service config (TOML), see configs/")
    parser.add_argument("--demo", action="store_true",
                        help="demo cluster, simulated metrics and backend, SQLite in a temp dir")
    parser.add_argument("--port", type=_port, help="listen port (overrides the config; 0: any)")
    parser.add_argument("--host", help="listen address (default 127.0.0.1); a non-loopback "
                                       "address needs an API token (or --insecure-no-auth)")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="allow a non-loopback --host without an API token (reads open to "
                             "the network; mutations and computations still refused)")
    parser.add_argument("--interval", type=float, metavar="S",
                        help="control loop interval, seconds (overrides the config)")
    parser.add_argument("--log-level", choices=LEVELS, default="info",
                        help="least severe log lines shown (default: info)")
    parser.add_argument("--log-format", choices=FORMATS, default="text",
                        help="log lines on stderr as text or JSON objects (default: text)")


def build(cfg: Any, *, registry: Any = None, solvers: Any = None) -> tuple[Any, Any, Any]:
    """Controller, app and telemetry for ``cfg`` (what ``serve`` runs; tests reuse it).

    ``solvers`` (a ``balancer.solving.SolverPool``) replaces in-process planning: every plan,
    and each cycle's estimate with its plan, then run in its worker processes."""
    from prometheus_client import CollectorRegistry

    from balancer import snapshot
    from balancer.api import create_app
    from balancer.daemon import Controller
    from balancer.errors import InputError
    from balancer.ingest.prometheus import PrometheusSource
    from balancer.ingest.simulated import SimulatedSource
    from balancer.store import Store
    from balancer.telemetry import Telemetry

    telemetry = Telemetry(registry or CollectorRegistry())
    inventory = None
    if cfg.demo:
        text = resources.files("balancer").joinpath("data/demo-cluster.json").read_text()
        inventory = snapshot.loads(text, source="demo-cluster.json")
    elif cfg.cluster.inventory:
        inventory = snapshot.load(cfg.cluster.inventory,
                                  mem_overcommit=cfg.cluster.mem_overcommit)
    store = Store(cfg.store.target)
    if store.kind == "postgres":
        # version checks on the API's event loop read a copy kept by a thread: a server that
        # stops answering no longer stalls every request (cached reads keep being served)
        store.watch_versions(0.1)
    backend = None
    if cfg.executor.backend == "libvirt":
        backend = _libvirt_backend(cfg, inventory)
    sources: list[Any] = []
    controller_box: list[Any] = []
    if cfg.ingest.source == "prometheus":
        def hosts() -> list[str]:
            inv = controller_box[0].inventory if controller_box else inventory
            return [h.name for h in inv.hosts] if inv is not None else []

        sources.append(PrometheusSource(cfg.prometheus, window_s=cfg.ingest.window_s,
                                        host_names=hosts))
    elif cfg.ingest.source == "simulated":
        sources.append(SimulatedSource(
            lambda: controller_box[0].inventory if controller_box else None,
            period_s=cfg.ingest.simulated_period_s, window_s=cfg.ingest.window_s,
            retention_s=cfg.ingest.retention_s, seed=cfg.cluster.seed))
    try:
        extra = {} if solvers is None else {"plan_fn": solvers.plan, "run_fn": solvers.call}
        controller = Controller(cfg, store, telemetry, sources=sources, backend=backend,
                                inventory=inventory, **extra)
    except InputError:
        store.close()
        raise
    controller_box.append(controller)
    app = create_app(controller, telemetry)
    return controller, app, telemetry


def _libvirt_backend(cfg: Any, inventory: Any) -> Any:
    """The executor's libvirt backend, from ``[backend.libvirt]`` of the executor config."""
    from balancer.config import ConfigError
    from balancer.daemon import executor_config

    try:
        from balancer.executor.libvirt_backend import create_backend
    except ImportError as exc:
        raise ConfigError(f"{cfg.source_path or 'config'}: [executor] backend: the libvirt "
                          f"backend cannot load ({exc}); install libvirt-python") from None
    return create_backend(executor_config(cfg, cfg.store.target), inventory)


def run(args: argparse.Namespace) -> int:
    from balancer.config import demo_config, load_config
    from balancer.daemon import Daemon
    from balancer.errors import InputError
    from balancer.logs import setup as setup_logging
    from balancer.solving import SolverPool

    if args.demo == bool(args.config):
        raise InputError("serve: give --config FILE or --demo (one of them)")
    tmp = None
    if args.demo:
        tmp = tempfile.TemporaryDirectory(prefix="balancer-demo-")
        cfg = demo_config(str(Path(tmp.name) / "balancer.db"))
    else:
        cfg = load_config(args.config)
    server = cfg.server
    if args.port is not None:
        server = dataclasses.replace(server, port=args.port)
    if args.host:
        server = dataclasses.replace(server, host=args.host)
    cfg = dataclasses.replace(cfg, server=server)
    check_exposure(cfg.server.host, cfg.token(), getattr(args, "insecure_no_auth", False))
    if args.interval is not None:
        if not args.interval > 0:
            raise InputError(f"serve: --interval must be > 0, got {args.interval:g}")
        cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop,
                                                                interval_s=args.interval))
    setup_logging(args.log_level, args.log_format)
    # One daemon per journal: a second one on the same state is refused (one line, exit 2)
    # before any solver worker exists or anything is written; held until this one exits.
    from balancer.execution import JOURNAL_IN_STORE, executor_config
    from balancer.executor.journal import JournalLock

    journal = executor_config(cfg, cfg.store.target).journal.path
    held = None if journal in (":memory:", JOURNAL_IN_STORE) else \
        JournalLock(journal, owner="balancer serve")
    # Every solve runs in a worker process (balancer.solving): Ctrl-C and SIGTERM stop it at
    # any moment, and API reads never wait on the solver.
    # One worker per HTTP solve slot ([server] max_concurrent_solves) and one for the loop's
    # own cycles. Every solve is asked to stop at 90 % of [server] solve_wall_s, so that its
    # best plan still arrives within the cap the API enforces.
    # They run at [server] solver_nice, below the server, so reads stay fast while they work.
    solvers = SolverPool(cfg.server.max_concurrent_solves + 1, start=True,
                         wall_limit=0.9 * cfg.server.solve_wall_s,
                         nice=cfg.server.solver_nice)
    try:
        controller, app, _ = build(cfg, solvers=solvers)
    except BaseException:
        solvers.close()
        if held is not None:
            held.release()
        if tmp is not None:
            tmp.cleanup()
        raise

    tls = cfg.server.tls_cert is not None

    def listening(host: str, port: int) -> None:
        # Everything loaded at start-up (modules, the engine, the app) lives as long as the
        # process: keep it out of the garbage collector's full passes. Each full pass otherwise
        # walks those ~10^6 objects, holding the GIL for ~0.1 s, a stall every API request
        # waiting at that moment would pay (bench/service.py, reads during cycles).
        gc.collect()
        gc.freeze()
        # The event loop asks for the GIL back after 1 ms (not 5) while a cycle or a request
        # handler computes in another thread: a read waits at most that long per hand-over.
        sys.setswitchinterval(0.001)
        log.info("listening on %s://%s:%d", "https" if tls else "http", host, port)
        from balancer import sdnotify

        scheme = "https" if tls else "http"
        sdnotify.notify("READY=1", f"STATUS=serving on {scheme}://{host}:{port}")  # Type=notify
        if not cfg.token():
            log.warning("no API token configured: mutating endpoints are refused")
        if cfg.power.automation != "off":
            log.info("power management %s: %s", cfg.power.automation,
                     f"command {cfg.power.command!r}" if cfg.power.command else
                     "no [power] command, so standby and wake only change the host's state "
                     "(the operator switches the hosts)")

    from balancer.leadership import Leadership
    from balancer.store import is_url

    # Daemons sharing a PostgreSQL store elect one leader; on SQLite this one leads at once
    # (its journal lock already keeps any other daemon off the state).
    controller.leadership = Leadership(
        controller.store, node=cfg.store.node, address=cfg.store.advertise or "",
        lease_s=cfg.store.lease_s, exclusive=not is_url(cfg.store.target))
    try:
        daemon = Daemon(controller, app, host=cfg.server.host, port=cfg.server.port,
                        on_listening=listening, stop_solves=solvers.stop_all)
        if tls:  # uvicorn's own TLS ([server] tls_cert / tls_key)
            daemon.config.ssl_certfile = cfg.server.tls_cert
            daemon.config.ssl_keyfile = cfg.server.tls_key
        return daemon.run()
    finally:
        solvers.close()
        controller.close()
        if held is not None:
            held.release()
        if tmp is not None:
            tmp.cleanup()
        log.info("stopped")
