"""Carrying out the power recommendations of the daemon (``[power]``): standby and wake.

Description
    A power recommendation is a host action (``MoveKind.STANDBY`` or ``MoveKind.WAKE``; its
    ``vm`` is empty and ``source`` = ``target`` = the host). ``PowerActions.apply`` carries
    one out:

    * **standby**: refused (``Conflict``, nothing changed) unless the host is active and runs
      no VM: the moves that empty it (kind ``power``) come first. The host is then marked
      ``standby`` in the inventory *before* the command runs, so no plan or placement can
      choose it meanwhile; if the command fails the host is active again.
    * **wake**: refused unless the host is in standby. The command runs first; the host is
      marked ``active`` only once it succeeded. The command should return when the host is
      ready to receive VMs (for example, wait for libvirtd after the wake-on-LAN packet).

    The command is ``[power] command`` with ``{action}`` and ``{host}`` filled in, run without
    a shell, with ``[power] command_timeout_s``. Without a command the state change is recorded
    and the operator switches the host. The outcome (exit code and the end of the output) is
    the recommendation's ``detail``.
Requirements
    The inventory, the recommendations, the telemetry.
Limitations
    A crash while a standby command runs leaves the host in standby and the recommendation
    failed (``settle``): whether the host is powered is unknown, and standby is the safe side
    (no VM is sent to it); the next power plan wakes it when its capacity is needed.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import threading
from collections.abc import Callable
from typing import Any

from balancer.config import PowerConfig
from balancer.inventory import Inventory
from balancer.model import HostState, MoveKind
from balancer.recommendations import Recommendation, Recommendations, RecState
from balancer.service_errors import Conflict
from balancer.telemetry import Telemetry

log = logging.getLogger("balancer.power")


def render(template: str, action: str, host: str) -> list[str]:
    """The command's argv for ``action`` on ``host`` (the template is checked by the config)."""
    return [part.format(action=action, host=host) for part in shlex.split(template)]


class PowerActions:
    def __init__(self, inv: Inventory, recs: Recommendations, telemetry: Telemetry,
                 config: Callable[[], PowerConfig]) -> None:
        self.inv = inv
        self.recs = recs
        self.telemetry = telemetry
        self.config = config
        self._lock = threading.Lock()  # one host action at a time

    def check(self, rec: Recommendation) -> None:
        """Refuse (``Conflict``) an action whose host is not in the state it needs."""
        snap = self.inv.snapshot
        host = rec.source
        if snap is None or host not in snap.host_index:
            self._supersede(rec, f"host {host} is no longer in the inventory")
        state = snap.hosts[snap.host_index[host]].state  # type: ignore[union-attr]
        if rec.kind is MoveKind.STANDBY:
            if state is not HostState.ACTIVE:
                self._supersede(rec, f"host {host} is {state.value}, not active")
            vms = [v.name for v in snap.vms if v.host == host]  # type: ignore[union-attr]
            if vms:
                raise Conflict(f"recommendation {rec.id}: host {host} still runs {len(vms)} "
                               f"VM(s) ({', '.join(sorted(vms)[:5])}"
                               f"{', ...' if len(vms) > 5 else ''}): apply the moves that "
                               "empty it first")
        elif state is not HostState.STANDBY:
            self._supersede(rec, f"host {host} is {state.value}, not in standby")

    def _supersede(self, rec: Recommendation, why: str) -> None:
        self.recs.move(rec.id, RecState.SUPERSEDED, expect=RecState.PENDING, detail=why)
        raise Conflict(f"recommendation {rec.id}: {why}")

    def apply(self, rec: Recommendation, trigger: str) -> dict[str, Any]:
        """Carry out one pending host action; returns what happened (``state`` completed or
        failed, the command's exit code and output)."""
        with self._lock:
            self.check(rec)
            if not self.recs.move(rec.id, RecState.APPLYING, expect=RecState.PENDING):
                raise Conflict(f"recommendation {rec.id} is no longer pending")
            cfg = self.config()
            host, action = rec.source, rec.kind.value
            if rec.kind is MoveKind.STANDBY:
                self.inv.set_host_state(host, HostState.STANDBY)
            out: dict[str, Any] = {"rec_id": rec.id, "host": host, "action": action,
                                   "trigger": trigger, "command": None, "exit": None,
                                   "output": ""}
            ok = True
            if cfg.command:
                argv = render(cfg.command, action, host)
                out["command"] = argv
                try:
                    p = subprocess.run(argv, capture_output=True, text=True,
                                       timeout=cfg.command_timeout_s, check=False)
                    out["exit"] = p.returncode
                    out["output"] = (p.stdout + p.stderr).strip()[-500:]
                    ok = p.returncode == 0
                except subprocess.TimeoutExpired:
                    ok = False
                    out["output"] = f"timed out after {cfg.command_timeout_s:g} s"
                except OSError as exc:
                    ok = False
                    out["output"] = f"cannot run {argv[0]!r}: {exc.strerror or exc}"
            if ok:
                if rec.kind is MoveKind.WAKE:
                    self.inv.set_host_state(host, HostState.ACTIVE)
                detail = (f"{action} of {host} done: command exited 0" if cfg.command else
                          f"{action} of {host} recorded: no [power] command is configured, "
                          "so the host itself was not switched")
                if out["output"]:
                    detail += f": {out['output'][-200:]}"
                self.recs.move(rec.id, RecState.APPLIED, detail=detail)
            else:
                if rec.kind is MoveKind.STANDBY:
                    self.inv.set_host_state(host, HostState.ACTIVE)
                code = "" if out["exit"] is None else f" exited {out['exit']}"
                detail = f"{action} of {host} failed: command{code}: {out['output'][-300:]}"
                self.recs.move(rec.id, RecState.FAILED, detail=detail)
            out["state"] = "completed" if ok else "failed"
            out["detail"] = detail
            self.telemetry.power_actions.labels(action=action, result=out["state"]).inc()
            (log.info if ok else log.warning)("recommendation %d (%s by %s): %s", rec.id,
                                              action, trigger, detail)
            return out

    def settle(self, rec: Recommendation) -> None:
        """A host action left ``applying`` by a crash: applied if the inventory shows its
        outcome (a wake is recorded only after its command succeeded), else failed, the host
        left in standby (see Limitations)."""
        snap = self.inv.snapshot
        state = (snap.hosts[snap.host_index[rec.source]].state
                 if snap is not None and rec.source in snap.host_index else None)
        if rec.kind is MoveKind.WAKE and state is HostState.ACTIVE:
            self.recs.move(rec.id, RecState.APPLIED, expect=RecState.APPLYING)
            return
        self.recs.move(rec.id, RecState.FAILED, expect=RecState.APPLYING,
                       detail=f"interrupted by a crash while its command ran; {rec.source} is "
                              f"{state.value if state else 'unknown'}: check its power")
        log.warning("recommendation %d (%s %s) was left applying: now failed", rec.id,
                    rec.kind.value, rec.source)
