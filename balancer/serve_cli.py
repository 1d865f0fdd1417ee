"""``balancer serve``: the control loop and the HTTP API in one process.

``balancer serve --config configs/<file>.toml`` or ``balancer serve --demo [--port N]`` (demo
cluster, simulated metrics and backend, SQLite in a temp dir). ``--port 0`` picks a free port.
The line ``balancer: listening on http://HOST:PORT`` on stderr tells where the API is.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

HELP = "run the balancer service: control loop + HTTP API (/v1, /metrics)"


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--port must be a whole number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"--port must be 0..65535, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="service config (TOML), see configs/")
    parser.add_argument("--demo", action="store_true",
                        help="demo cluster, simulated metrics and backend, SQLite in a temp dir")
    parser.add_argument("--port", type=_port, help="listen port (overrides the config; 0: any)")
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument("--interval", type=float, metavar="S",
                        help="control loop interval, seconds (overrides the config)")


def build(cfg: Any, *, registry: Any = None) -> tuple[Any, Any, Any]:
    """Controller, app and telemetry for ``cfg`` (what ``serve`` runs; tests reuse it)."""
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
    store = Store(cfg.store.path)
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
        controller = Controller(cfg, store, telemetry, sources=sources, backend=backend,
                                inventory=inventory)
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
    return create_backend(executor_config(cfg, cfg.store.path), inventory)


def run(args: argparse.Namespace) -> int:
    from balancer.config import demo_config, load_config
    from balancer.daemon import Daemon
    from balancer.errors import InputError

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
    if args.interval is not None:
        if not args.interval > 0:
            raise InputError(f"serve: --interval must be > 0, got {args.interval:g}")
        cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop,
                                                                interval_s=args.interval))
    logging.basicConfig(level=logging.INFO, format="balancer: %(message)s", stream=sys.stderr)
    controller, app, _ = build(cfg)

    def listening(host: str, port: int) -> None:
        print(f"balancer: listening on http://{host}:{port}", file=sys.stderr, flush=True)
        from balancer import sdnotify

        sdnotify.notify("READY=1", f"STATUS=serving on http://{host}:{port}")  # Type=notify
        if not cfg.token():
            print("balancer: no API token configured: mutating endpoints are refused",
                  file=sys.stderr, flush=True)

    try:
        return Daemon(controller, app, host=cfg.server.host, port=cfg.server.port,
                      on_listening=listening).run()
    finally:
        controller.close()
        if tmp is not None:
            tmp.cleanup()
        print("balancer: stopped", file=sys.stderr, flush=True)
