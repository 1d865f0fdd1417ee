"""Admission control for solves requested over HTTP: N slots and a wall-clock cap.

``await gate.run(fn, ...)`` runs ``fn`` (a what-if, a placement, a cycle, a maintenance plan)
on its own thread if one of the ``slots`` is free, else raises ``Busy`` at once (429 with
``Retry-After``). The caller waits at most ``wall_s``; past it, ``SolveTimeout`` (503). A solve
that ran past the cap keeps its slot until it really ends (the engine's own time limit stops
it), so timeouts can never pile up threads beyond ``slots``.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from balancer.api.errors import Busy, SolveTimeout

T = TypeVar("T")


class SolverGate:
    def __init__(self, slots: int, wall_s: float) -> None:
        if slots < 1 or not wall_s > 0:
            raise ValueError("SolverGate needs slots >= 1 and wall_s > 0")
        self.slots = slots
        self.wall_s = wall_s
        self._lock = threading.Lock()
        self._deadlines: dict[int, float] = {}
        self._next = 0
        self.admitted = 0
        self.refused = 0
        self.timed_out = 0

    @property
    def busy(self) -> int:
        with self._lock:
            return len(self._deadlines)

    def full(self) -> int | None:
        """Retry-After seconds if every slot is busy now, else None (a hint: ``run`` decides)."""
        with self._lock:
            if len(self._deadlines) < self.slots:
                return None
            self.refused += 1
            return self._retry_after()

    def _retry_after(self) -> int:
        now = time.monotonic()
        soonest = min(self._deadlines.values(), default=now + 1.0)
        return max(1, math.ceil(soonest - now))

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self._lock:
            if len(self._deadlines) >= self.slots:
                self.refused += 1
                raise Busy(f"all {self.slots} solver slots are busy; retry later",
                           self._retry_after())
            key = self._next
            self._next += 1
            self._deadlines[key] = time.monotonic() + self.wall_s
            self.admitted += 1
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())

        def work() -> None:
            ok, value = False, None
            try:
                value, ok = fn(*args, **kwargs), True
            except BaseException as exc:  # handed to the waiting request
                value = exc  # type: ignore[assignment]
            finally:
                with self._lock:
                    self._deadlines.pop(key, None)

            def deliver() -> None:
                if fut.done():
                    return
                if ok:
                    fut.set_result(value)  # type: ignore[arg-type]
                else:
                    fut.set_exception(value)  # type: ignore[arg-type]

            try:
                loop.call_soon_threadsafe(deliver)
            except RuntimeError:  # the loop is gone: nobody waits any more
                pass

        threading.Thread(target=work, name="api-solve", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.wall_s)
        except TimeoutError:
            self.timed_out += 1
            raise SolveTimeout(f"the solve did not finish within the wall-clock cap of "
                               f"{self.wall_s:g} s ([server] solve_wall_s)") from None
