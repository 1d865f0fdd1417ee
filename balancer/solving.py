"""Solving in worker processes: every plan the CLI, the daemon and the API ask for runs here.

Description
    ``SolverProcess`` owns one child process that runs ``balancer.service.plan`` (``plan``), or
    any module-level function that takes ``stop=`` (``call``: the control cycle runs its demand
    estimate and its plan there, so that their CPU stays out of the API's process). The child is
    forked from a *fork server* that has already imported the engine (``forkserver`` start
    method with ``balancer.service`` preloaded), so a new worker costs a fork, not an
    interpreter start, and no thread of the caller (uvicorn, the control loop) is copied into
    it. Moving the solver out of the service process gives three things:

    * Ctrl-C and SIGTERM can arrive at any moment: the child ignores SIGINT (the caller
      decides), the caller asks the child to stop (it then returns its best verified plan
      within about half a second) and, if it must, kills it. CP-SAT's threads never meet
      interpreter shutdown, which is what used to abort the process
      (``terminate called ... std::bad_function_call``).
    * API reads never wait for the solver's share of the GIL.
    * A solve that overruns its wall-clock cap is stopped, then killed, and the worker is
      replaced; the caller gets a ``SolverError`` naming the cap.

    ``SolverPool`` is a fixed set of such workers; ``plan()`` takes an idle one (waiting up to
    ``wait`` seconds; ``Busy`` when none frees up in time).
Requirements
    Snapshot, options and result are picklable (plain dataclasses and numpy arrays).
Limitations
    One solve at a time per worker. A worker killed mid-solve is restarted on the next call.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from balancer.errors import BalancerError, SolverError

log = logging.getLogger("balancer.solving")

# What the fork server imports once, so that each worker starts with the engine loaded.
PRELOAD = ["balancer.service", "balancer.cycle"]
# After a stop request the engine answers within about 0.5 s; past this the worker is killed.
STOP_GRACE_S = 3.0


class Busy(BalancerError):
    """Every solver worker is busy (the API answers 429)."""


class Stopped(BalancerError):
    """The solve was stopped before the engine had any plan (Ctrl-C, shutdown, wall cap)."""


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread while a child is started: a process started now inherits
    the mask, so a Ctrl-C during its start-up (imports) cannot raise in it."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_ctx_lock = threading.Lock()


def _context(method: str) -> Any:
    """``forkserver`` (preloading the engine) for long-running, threaded callers; ``fork`` for
    a single-threaded command that has already loaded what the worker needs."""
    ctx = mp.get_context(method)
    if method == "forkserver":
        with _ctx_lock:
            ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _watch(stop: Any, parent: Any, local: threading.Event, done: threading.Event) -> None:
    """Hand a stop request (or the parent's death) to the engine, until the job is done."""
    while not done.is_set():
        if stop.wait(0.05) or (parent is not None and not parent.is_alive()):
            local.set()
            return


def _child(conn: Any, stop: Any, nice: int = 0) -> None:
    """The worker: receive (function, args), answer ("ok", function(*args, stop=event)) or
    ("err", exception)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C means
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if nice > 0:
        # below the server: API reads and the loop get the CPU first; the plan is the same
        # (the search is bounded by deterministic effort, not by wall time)
        os.nice(nice)
    parent = mp.parent_process()
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        fn, args = job
        local = threading.Event()
        done = threading.Event()
        watcher = threading.Thread(target=_watch, args=(stop, parent, local, done),
                                   name="stop-watcher", daemon=True)
        watcher.start()
        try:
            result = fn(*args, stop=local)
            answer: tuple[str, Any] = ("ok", result)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            answer = ("err", exc)
        finally:
            done.set()
            watcher.join()
        try:
            conn.send(answer)
        except OSError:  # the parent is gone
            return
        except Exception as exc:  # an answer that does not pickle: send its text
            text = (f"{type(answer[1]).__name__}: {answer[1]}" if answer[0] == "err"
                    else f"cannot send the plan: {exc}")
            try:
                conn.send(("err", SolverError(text)))
            except OSError:
                return


class SolverProcess:
    """One worker process running ``balancer.service.plan`` (see the module docstring)."""

    def __init__(self, name: str = "solver", method: str = "forkserver", *,
                 nice: int = 0) -> None:
        if method not in ("forkserver", "fork"):
            raise ValueError(f"start method must be forkserver or fork, got {method!r}")
        if not 0 <= nice <= 19:
            raise ValueError(f"nice must be 0..19, got {nice}")
        self.name = name
        self.method = method
        self.nice = nice
        self._lock = threading.Lock()  # one job at a time
        self._proc: Any = None
        self._conn: Any = None
        self._stop: Any = None
        self._closed = False

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker now (otherwise the first ``plan`` does)."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> None:
        if self._closed:
            raise Stopped("solver worker is shut down")
        if self._proc is not None and self._proc.is_alive():
            return
        self._reap()
        ctx = _context(self.method)
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        stop = ctx.Event()
        proc = ctx.Process(target=_child, args=(child_conn, stop, self.nice), name=self.name,
                           daemon=True)
        with _sigint_blocked():
            proc.start()
        child_conn.close()
        self._proc, self._conn, self._stop = proc, parent_conn, stop

    def _reap(self, kill: bool = False) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = self._stop = None
        if conn is not None:
            if not kill:
                with contextlib.suppress(OSError):
                    conn.send(None)
            conn.close()
        if proc is not None:
            if kill and proc.is_alive():
                proc.kill()
            proc.join(timeout=STOP_GRACE_S)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=STOP_GRACE_S)
            proc.close()

    def stop(self) -> None:
        """Ask the solve in progress to return its best plan now (safe from a signal handler)."""
        ev = self._stop
        if ev is not None:
            ev.set()

    def kill(self) -> None:
        """Kill the worker at once (the solve in progress is lost; a later call restarts it)."""
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()

    def close(self) -> None:
        """Stop the solve in progress and end the worker."""
        self._closed = True
        self.stop()
        got = self._lock.acquire(timeout=STOP_GRACE_S + 1)
        try:
            if not got:
                self.kill()
            self._reap(kill=not got)
        finally:
            if got:
                self._lock.release()

    # -- solving ---------------------------------------------------------------------------
    def plan(self, snapshot: Any, options: Any = None, *, wall_limit: float | None = None,
             cancelled: Callable[[], bool] | None = None) -> Any:
        """``balancer.service.plan(snapshot, options)`` in the worker.

        ``wall_limit``: seconds after which the solve is asked to stop (and killed
        ``STOP_GRACE_S`` later); ``cancelled()``: polled; when true the solve is asked to stop.
        A stopped solve returns the engine's best verified plan; with none, ``Stopped``.
        """
        from balancer.service import plan

        return self.call(plan, snapshot, options, wall_limit=wall_limit, cancelled=cancelled)

    def call(self, fn: Callable[..., Any], *args: Any, wall_limit: float | None = None,
             cancelled: Callable[[], bool] | None = None) -> Any:
        """``fn(*args, stop=event)`` in the worker (``fn`` module-level: it is sent by name);
        ``wall_limit`` and ``cancelled`` as for ``plan``, whose solve ``fn`` runs."""
        with self._lock:
            self._ensure()
            self._stop.clear()
            conn, proc = self._conn, self._proc
            try:
                conn.send((fn, args))
            except (BrokenPipeError, OSError) as exc:
                self._reap(kill=True)
                raise SolverError(f"solver worker unavailable: {exc}") from None
            t0 = time.monotonic()
            asked_stop: float | None = None
            why = ""
            while True:
                if conn.poll(0.05):
                    try:
                        kind, value = conn.recv()
                    except (EOFError, OSError):
                        break
                    if kind == "ok":
                        return value
                    raise value
                if not proc.is_alive():
                    break
                now = time.monotonic()
                if asked_stop is None:
                    if wall_limit is not None and now - t0 > wall_limit:
                        why = f"wall-clock cap of {wall_limit:g} s"
                    elif (cancelled is not None and cancelled()) or self._stop.is_set():
                        why = "stop requested"
                    if why:
                        self._stop.set()
                        asked_stop = now
                elif now - asked_stop > STOP_GRACE_S:
                    log.warning("solver worker did not stop within %.0f s (%s); killing it",
                                STOP_GRACE_S, why)
                    break
            code = proc.exitcode
            self._reap(kill=True)
            if self._closed or why:
                raise Stopped(f"solve stopped ({why or 'shutting down'}) before a plan was "
                              "ready")
            raise SolverError(f"solver worker died (exit code {code})")


class SolverPool:
    """A fixed set of solver workers; ``plan()`` uses an idle one."""

    def __init__(self, size: int = 2, *, start: bool = False,
                 wall_limit: float | None = None, nice: int = 0) -> None:
        if size < 1:
            raise ValueError("a solver pool needs at least one worker")
        self.size = size
        self.wall_limit = wall_limit  # default cap of every solve, seconds (None: none)
        self._workers = [SolverProcess(f"solver-{i}", nice=nice) for i in range(size)]
        self._idle: queue.SimpleQueue[SolverProcess] = queue.SimpleQueue()
        for w in self._workers:
            self._idle.put(w)
        if start:
            threading.Thread(target=self._warm, name="solver-warm-up", daemon=True).start()

    def _warm(self) -> None:
        for w in self._workers:
            with contextlib.suppress(BalancerError, OSError):
                w.start()

    def plan(self, snapshot: Any, options: Any = None, *, wall_limit: float | None = None,
             wait: float | None = None, cancelled: Callable[[], bool] | None = None) -> Any:
        from balancer.service import plan

        return self.call(plan, snapshot, options, wall_limit=wall_limit, wait=wait,
                         cancelled=cancelled)

    def call(self, fn: Callable[..., Any], *args: Any, wall_limit: float | None = None,
             wait: float | None = None, cancelled: Callable[[], bool] | None = None) -> Any:
        """``SolverProcess.call`` on an idle worker (``Busy`` if none is idle within ``wait``
        seconds)."""
        try:
            worker = self._idle.get(timeout=wait) if wait is not None else self._idle.get()
        except queue.Empty:
            raise Busy(f"all {self.size} solver workers are busy") from None
        try:
            return worker.call(fn, *args, cancelled=cancelled,
                               wall_limit=self.wall_limit if wall_limit is None else wall_limit)
        finally:
            self._idle.put(worker)

    def stop_all(self) -> None:
        """Ask every solve in progress to return now (safe from a signal handler)."""
        for w in self._workers:
            w.stop()

    def close(self) -> None:
        for w in self._workers:
            w.close()


def plan_interruptible(snapshot: Any, options: Any = None, *, worker: SolverProcess | None = None
                       ) -> Any:
    """``balancer plan``'s solve: in a worker; the first Ctrl-C returns the best verified plan
    found so far, a second one gives up (``KeyboardInterrupt``: the CLI exits 130).

    ``worker``: a worker to use (and close) instead of a forked one."""
    import sys

    # The command is single-threaded and has the engine loaded: a fork is instant.
    worker = worker or SolverProcess("plan", method="fork")
    presses = 0

    def on_sigint(_signum: int, _frame: Any) -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            sys.stderr.write("balancer: stopping: the best plan found so far follows "
                             "(Ctrl-C again to give up)\n")
            worker.stop()
        else:
            worker.kill()

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        try:
            return worker.plan(snapshot, options)
        except (Stopped, SolverError):
            if presses:
                raise KeyboardInterrupt from None
            raise
    finally:
        signal.signal(signal.SIGINT, old)
        worker.close()
