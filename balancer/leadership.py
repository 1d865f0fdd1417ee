"""Leadership: exactly one daemon of those sharing a store leads; the others follow.

Description
    A lease row in the store (``Store.acquire_lease`` / ``renew_lease``) names the leader, its
    address and its term; the term rises at each change of leader. A heartbeat thread renews
    the lease every ``lease_s / 5``; a follower tries to take it on the same beat, and gets it
    once the leader's lease expired on the database's clock (a crashed leader is replaced
    after at most ``lease_s`` plus one beat) or was released by a clean stop.

    Self-fencing: the leader counts its lease from *before* each renewal, on its own monotonic
    clock, and ``gate()`` refuses to start a migration once ``lease_s * 3 / 4`` have passed
    since the last renewal that succeeded, i.e. before the lease could have expired anywhere
    (a quarter of the lease is left for clock-rate differences). A leader that cannot reach the
    store, or was frozen (GC, SIGSTOP, a lost network), therefore stops starting migrations on
    its own; and everything it still writes carries its term, which the store checks
    (``Store.check_fence``), so once another node leads nothing it writes lands.

    With SQLite (one daemon per state, the journal's lock held) the daemon takes the lease at
    once (``exclusive``): no other daemon can be running on that state.
Requirements
    A ``balancer.store.Store``.
Limitations
    The gate sits in the daemon, just before the backend is asked: a leader frozen in the few
    microseconds between its last check and the backend call would still reach a backend that
    does not check fencing tokens itself (the simulated backend does: ``fence_to``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from balancer.store import Fenced, Store

log = logging.getLogger("balancer.leadership")


def default_node() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Leadership:
    def __init__(self, store: Store, *, node: str | None = None, address: str = "",
                 lease_s: float = 10.0, exclusive: bool = False,
                 on_change: Callable[[bool, int | None], None] | None = None) -> None:
        self.store = store
        self.node = node or default_node()
        self.address = address
        self.lease_s = lease_s
        self.exclusive = exclusive
        self.on_change = on_change or (lambda leading, term: None)
        self.term: int | None = None
        self.since: float | None = None
        self._valid_until = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beat_s = max(0.2, lease_s / 5)

    # -- state -----------------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return self.term is not None and time.monotonic() < self._valid_until

    def gate(self) -> None:
        """Raise ``Fenced`` unless this node may start a migration now."""
        term = self.term
        if term is None:
            raise Fenced("not the leader: no migration may start here")
        if time.monotonic() >= self._valid_until:
            raise Fenced(f"the lease of term {term} was not renewed in time: no migration "
                         "may start until it is")

    def info(self) -> dict[str, Any]:
        """``GET /v1/leader``: this node's role and term, and who leads."""
        lease = None
        try:
            lease = self.store.lease()
        except Exception as exc:  # noqa: BLE001  # the store is down: say what we know
            log.warning("leader: cannot read the lease: %s", exc)
        leading = self.is_leader
        if lease is not None and lease.term > 0:
            leader: dict[str, Any] | None = {"id": lease.holder, "address": lease.address,
                                             "since": lease.since}
            term = lease.term
            if lease.expires <= time.time() and not leading:
                leader = None  # expired: nobody leads until someone takes it
        else:
            leader, term = None, 0
        if leading:
            leader = {"id": self.node, "address": self.address, "since": self.since}
            term = self.term  # type: ignore[assignment]
        return {"role": "leader" if leading else "follower", "term": term, "id": self.node,
                "leader": leader}

    def leader_hint(self) -> str:
        """Who to ask instead (for a 409 on a follower)."""
        info = self.info()
        ldr = info["leader"]
        if ldr is None:
            return "no leader at the moment (an election is under way); retry shortly"
        return f"the leader is {ldr['id']} at {ldr['address'] or 'an unknown address'}"

    # -- the heartbeat ------------------------------------------------------------------------
    def step(self) -> None:
        """One beat: renew (leader) or try to take the lease (follower)."""
        t0 = time.monotonic()
        try:
            if self.term is not None:
                if self.store.renew_lease(self.node, self.term, self.lease_s):
                    self._valid_until = t0 + self.lease_s * 0.75
                    return
                self._lose("the lease was lost (expired or taken)")
                return
            term = self.store.acquire_lease(self.node, self.address, self.lease_s,
                                            force=self.exclusive)
        except Exception as exc:  # noqa: BLE001  # store unreachable: we cannot renew
            if self.term is not None and time.monotonic() >= self._valid_until:
                self._lose(f"the store is unreachable: {exc}")
            else:
                log.warning("leadership: store error: %s", exc)
            return
        if term is not None:
            with self._lock:
                self.term = term
                self.since = time.time()
                self._valid_until = t0 + self.lease_s * 0.75
            log.info("leadership: %s leads, term %d", self.node, term)
            self.on_change(True, term)

    def _lose(self, why: str) -> None:
        with self._lock:
            term, self.term, self._valid_until = self.term, None, 0.0
        log.warning("leadership: %s steps down from term %s: %s", self.node, term, why)
        self.on_change(False, None)

    def start(self) -> None:
        self.step()
        self._thread = threading.Thread(target=self._run, name="balancer-leadership",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.beat_s):
            self.step()

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if release and self.term is not None:
            try:
                self.store.release_lease(self.node, self.term)
            except Exception as exc:  # noqa: BLE001
                log.warning("leadership: could not release the lease: %s", exc)
            self.term = None
