"""A small thread-safe publish/subscribe bus for the executor's migration events.

The daemon's ``PlanExecutor`` publishes one event per runner callback (``start``, ``progress``,
``retry``, ``resume``, ``end``, ``skip``); the console streams them to browsers as server-sent
events. Publishing never blocks and never fails the run: each subscriber has a bounded queue,
and when a slow subscriber's queue is full its oldest event is dropped (and counted in
``dropped``) so the executor thread is never held up by a browser.

The bus also keeps the latest event of every migration still in flight (``in_flight``), so a
page opened in the middle of a run shows what is moving right now.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TERMINAL = ("end", "skip")


@dataclass
class Subscription:
    """One subscriber's bounded queue; ``get`` waits up to ``timeout`` seconds."""

    maxlen: int
    _bus: EventBus
    _items: deque[dict[str, Any]] = field(default_factory=deque)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    dropped: int = 0
    closed: bool = False

    def _put(self, event: dict[str, Any]) -> None:
        with self._cond:
            if len(self._items) >= self.maxlen:
                self._items.popleft()
                self.dropped += 1
            self._items.append(event)
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, or None when none came within ``timeout`` or the bus closed."""
        with self._cond:
            if not self._items and not self.closed:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def drain(self) -> list[dict[str, Any]]:
        with self._cond:
            out = list(self._items)
            self._items.clear()
            return out

    def close(self) -> None:
        self._bus.unsubscribe(self)
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


class EventBus:
    """Fan-out of events to subscribers, each with a bounded queue (oldest dropped when full)."""

    def __init__(self, maxlen: int = 256, clock: Callable[[], float] = time.time) -> None:
        self.maxlen = maxlen
        self.clock = clock
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []
        self._seq = itertools.count(1)
        self._flight: dict[str, dict[str, Any]] = {}

    def subscribe(self, maxlen: int | None = None) -> Subscription:
        sub = Subscription(maxlen=maxlen or self.maxlen, _bus=self)
        with self._lock:
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    def publish(self, event: dict[str, Any]) -> dict[str, Any]:
        """Stamp ``event`` with ``seq`` and ``ts`` and hand it to every subscriber."""
        with self._lock:
            ev = dict(event, seq=next(self._seq), ts=self.clock())
            key = ev.get("key")
            if key is not None:
                if ev.get("kind") in TERMINAL:
                    self._flight.pop(key, None)
                else:
                    self._flight[key] = ev
            subs = list(self._subs)
        for sub in subs:
            sub._put(ev)
        return ev

    def in_flight(self) -> list[dict[str, Any]]:
        """The latest event of each migration not yet ended, oldest first."""
        with self._lock:
            return sorted(self._flight.values(), key=lambda e: e["seq"])

    def close(self) -> None:
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            sub.close()


def migration_event(kind: str, entry: Any, progress: Any) -> dict[str, Any]:
    """The event for a runner callback (``balancer.executor.runner.Runner.on_event``)."""
    ev: dict[str, Any] = {
        "kind": kind, "key": f"{entry.plan_id}:{entry.id}", "plan_id": entry.plan_id,
        "id": entry.id, "vm": entry.vm, "source": entry.source, "target": entry.target,
        "mem_mb": entry.mem_mb, "est_seconds": entry.est_seconds, "attempt": entry.attempts,
        "state": getattr(entry.state, "value", str(entry.state)),
        "reason": entry.reason or None,
    }
    if progress is not None:
        total = float(progress.total_mb or 0.0)
        sent = float(progress.transferred_mb or 0.0)
        ev.update({
            "transferred_mb": round(sent, 1), "total_mb": round(total, 1),
            "percent": round(100.0 * sent / total, 1) if total else None,
            "rate_mbps": round(float(progress.rate_mbps or 0.0), 1),
            "downtime_ms": _num(getattr(progress, "downtime_ms", None)),
            # not every backend reports it (QEMU's ram.dirty-pages-rate does; see the backend)
            "dirty_rate_mbps": _num(getattr(progress, "dirty_rate_mbps", None)),
        })
    return ev


def _num(x: Any) -> float | None:
    return None if x is None else round(float(x), 1)
