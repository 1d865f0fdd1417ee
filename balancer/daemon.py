"""The balancer service process: the control loop on a thread and the HTTP API (uvicorn) on
the main thread, with leadership and signals. It only wires, loops and handles signals; the
work is ``balancer.controller.Controller``'s (a facade over inventory, cycle, recommendations,
execution and leadership, each in its own module).

The loop: a leader runs ``Controller.run_cycle`` every interval (after ``take_over`` when it
was just elected: recovery of what the last leader left); a follower reloads what the leader
stored. SIGTERM/SIGINT stop both cleanly: no new migration starts, the one in flight is
followed to its end and journalled, the lease is released (a follower takes over at its next
beat), then the process exits.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from balancer import sdnotify
from balancer.controller import Controller
from balancer.cycle import ClusterView, CycleReport
from balancer.execution import PlanExecutor, executor_config, simulated_backend
from balancer.service_errors import Conflict, NotFound, NotLeader, Unavailable
from balancer.store import Fenced

log = logging.getLogger("balancer.daemon")

__all__ = ["ClusterView", "Conflict", "Controller", "CycleReport", "Daemon", "NotFound",
           "NotLeader", "PlanExecutor", "Unavailable", "executor_config", "simulated_backend"]


# -- the process: loop thread + uvicorn ----------------------------------------------------------
class Daemon:
    """Control loop on a thread, the API on uvicorn; stops cleanly on SIGTERM/SIGINT."""

    def __init__(self, controller: Controller, app: Any, *, host: str, port: int,
                 on_listening: Callable[[str, int], None] | None = None,
                 stop_solves: Callable[[], None] | None = None) -> None:
        import uvicorn

        self.controller = controller
        self.stop_solves = stop_solves  # asks solves in progress to return now
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                     access_log=False, lifespan="on")
        self.server = _Server(self.config, self)
        self.on_listening = on_listening
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="balancer-loop", daemon=True)

    def _loop(self) -> None:
        c = self.controller
        while not c.stopping.is_set():
            lead = c.leadership
            wait = c.cfg.loop.interval_s
            try:
                if lead is not None and not lead.is_leader:
                    if c.term is not None:
                        c.step_down()
                    c.reload_inventory()  # follow: serve what the leader stored
                    wait = min(wait, lead.beat_s)
                else:
                    if lead is not None and c.term != lead.term:
                        c.take_over(lead.term)  # type: ignore[arg-type]
                    c.run_cycle()
            except (Fenced, NotLeader) as exc:
                log.warning("no longer leading: %s", exc)
            except Exception:  # the loop must survive a bug in one cycle
                log.exception("control cycle crashed")
            self._wake.wait(wait)
            self._wake.clear()

    def request_stop(self) -> None:
        if not self.controller.stopping.is_set():
            sdnotify.notify("STOPPING=1", "STATUS=stopping")  # systemd: shutting down
        self.controller.stopping.set()
        if self.stop_solves is not None:
            self.stop_solves()
        if self.controller.executor is not None:
            self.controller.executor.cancel()
        self._wake.set()
        self.server.should_exit = True

    def run(self) -> int:
        lead = self.controller.leadership
        if lead is None:
            recovered = self.controller.recover()
            for row in recovered:
                log.warning("journal: migration %s of %s resolved as %s", row["id"], row["vm"],
                            row["state"])
        else:  # elected or not, the loop takes over (recovery included) when this node leads
            self.controller.telemetry.leader.set(0)
            lead.on_change = lambda leading, term: self._wake.set()
        self._thread.start()
        watchdog = sdnotify.Watchdog(alive=self._thread.is_alive)  # WATCHDOG=1 if WatchdogSec
        old = {s: signal.signal(s, lambda *_: self.request_stop())
               for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.server.run()
        finally:
            self.request_stop()
            watchdog.stop()
            # Let the cycle in progress finish its in-flight migration and journal it.
            self._thread.join(timeout=600.0)
            if lead is not None:  # hand over at once rather than at lease expiry
                lead.stop(release=True)
            for s, h in old.items():
                signal.signal(s, h)
        return 0 if not self._thread.is_alive() else 1


def _make_server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, config: Any, daemon: Daemon) -> None:
            super().__init__(config)
            self._daemon = daemon

        def install_signal_handlers(self) -> None:  # the Daemon owns the signals
            return

        def capture_signals(self):  # type: ignore[no-untyped-def]  # noqa: ANN201
            import contextlib
            return contextlib.nullcontext()

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if not self.started:
                return
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    lead = self._daemon.controller.leadership
                    if lead is not None:  # candidates once reachable, with their address
                        if not lead.address:
                            lead.address = f"http://{host}:{port}"
                        lead.start()
                    if self._daemon.on_listening is not None:
                        self._daemon.on_listening(host, port)
                    return

    return Server


class _Server:
    def __new__(cls, config: Any, daemon: Daemon) -> Any:  # noqa: D102
        return _make_server_class()(config, daemon)
