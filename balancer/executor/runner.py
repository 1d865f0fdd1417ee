"""The runner: the single chokepoint that carries out a plan through a backend.

Description
    Runs the planner's waves in order through any ``Backend``. A migration of wave ``w`` may
    start once no migration of an earlier wave is still waiting to start, and once every
    earlier migration of the same VM (a parking leg) has ended. Right before it starts, the
    runner enforces the limits (``HostIncomingLimit``, ``HostOutgoingLimit``, ``ClusterLimit``:
    concurrent migrations into a host, out of a host, in the whole cluster) and re-checks the
    move against the backend: the VM must still run on its source (``locate``), the
    destination must have room for the VM's configured memory counting the VMs migrating to it
    (host capacity from the snapshot, usage from the backend's ``inventory`` refreshed at every
    wave), and the backend's own ``check`` must pass. A stale move is skipped with the reason.
    A move the backend finds incompatible (``IncompatibleHost`` from ``check``: the real
    destination lacks the VM's CPU, machine type, network or storage, see
    ``balancer.executor.compat``) is never started: it is skipped with ``incompatible: <the
    backend's reason>`` and the plan goes on; so is one whose ``start`` raises
    ``IncompatibleHost`` (refused before anything moved, so retrying cannot help).
    When nothing runs and the next moves still lack room (a move they relied on failed), they
    are skipped with the reason rather than waited on forever.

    Each migration has a timeout (``max(timeout_min_s, timeout_factor x estimate)``); on expiry
    it is cancelled and counts as a failed attempt. Failed attempts are retried with
    exponential backoff when ``retry.attempts`` > 1 (off by default). ``cancel()`` stops the
    run: migrations in flight are cancelled, the rest are marked cancelled.

    Every state change is committed to the journal before the next action: ``running/starting``
    before ``Backend.start``, ``running/migrating`` with the handle's token right after it, the
    final state right after the backend reports it. A restarted runner first reconciles each
    unfinished entry with the backend: with a token it polls the migration again; without one
    (killed between start and the commit of its token) it asks the backend for the VM's
    migration in flight (optional ``find_migration(vm)``), else where the VM is: on the target
    means succeeded; on the source with nothing in flight means the attempt ended or never
    began, which counts as a failed attempt (never blindly started again, which could run it
    twice); while it cannot tell (a backend without ``find_migration``), it watches ``locate``
    until the migration's timeout. Unfinished entries of an older plan are resolved the same
    way, and its entries not yet started are cancelled as superseded.
Requirements
    A backend implementing ``balancer.executor.base.Backend``; the hosts' memory capacities.
    A start that never reached the backend (journalled ``starting``, no migration in flight, the
    VM on its source, with a backend that has ``find_migration``) is not counted as an attempt:
    the entry is planned again (or cancelled when its plan was superseded).

    ``gate`` (the service's leadership) is asked before every start, before and after the
    ``starting`` commit; it raises to stop the run at once, leaving migrations in flight to
    the next leader's recovery.
Limitations
    One runner per journal: the journal's lock (``JournalLock``) or, in the shared store, the
    leader's term makes sure of it. Memory is the only resource re-checked.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from balancer.errors import BalancerError
from balancer.executor.base import (
    Backend,
    BackendError,
    Handle,
    IncompatibleHost,
    MigrationRequest,
    MigrationStatus,
    Progress,
)
from balancer.executor.config import ExecutorConfig
from balancer.executor.journal import Entry, Journal, Phase, State
from balancer.planner import Waves, plan_fingerprint


class LimitExceeded(BalancerError):
    """A limit keeps a migration from starting now; ``limit`` names it."""

    limit = "limit"

    def __init__(self, message: str, *, host: str | None = None) -> None:
        super().__init__(message)
        self.host = host


class HostIncomingLimit(LimitExceeded):
    limit = "max_incoming_per_host"


class HostOutgoingLimit(LimitExceeded):
    limit = "max_outgoing_per_host"


class ClusterLimit(LimitExceeded):
    limit = "max_concurrent"


class NoRoom(LimitExceeded):
    limit = "memory"


@dataclass
class _Flight:
    entry: Entry
    handle: Handle | None  # None: started by a previous run whose handle was never recorded
    deadline: float
    cancel: str = ""  # why we cancelled it: "" | "timeout" | "user"
    last: Progress | None = None


@dataclass
class RunSummary:
    plan_id: str
    entries: list[Entry]
    clock_s: float  # backend-clock time the run took (simulated seconds for the simulator)
    wall_s: float
    journal_commits: int
    dry_run: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    journal_path: str = ""

    def __post_init__(self) -> None:
        self.counts = {s.value: 0 for s in State}
        for e in self.entries:
            self.counts[e.state.value] += 1

    @property
    def ok(self) -> bool:
        return self.counts["failed"] == 0 and self.counts["cancelled"] == 0 \
            and self.counts["planned"] == 0 and self.counts["running"] == 0

    @property
    def moved_mb(self) -> int:
        return sum(e.mem_mb for e in self.entries if e.state is State.SUCCEEDED)

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan_id": self.plan_id,
            "dry_run": self.dry_run,
            "counts": self.counts,
            "moved_mem_mb": self.moved_mb,
            "clock_s": round(self.clock_s, 3),
            "wall_s": round(self.wall_s, 3),
            "journal_commits": self.journal_commits,
            "migrations": [
                {"id": e.id, "wave": e.wave, "vm": e.vm, "from": e.source, "to": e.target,
                 "kind": e.kind, "state": e.state.value, "attempts": e.attempts,
                 "reason": e.reason}
                for e in self.entries
            ],
        }


EventFn = Callable[[str, Entry, Progress | None], None]


def entries_for(waves: Waves, plan_id: str) -> list[Entry]:
    return [Entry(plan_id=plan_id, id=m.id, wave=m.wave, vm=m.vm, source=m.source,
                  target=m.target, mem_mb=m.mem_mb, est_seconds=m.est_seconds, kind=m.kind)
            for m in waves.migrations]


class Runner:
    def __init__(self, backend: Backend, journal: Journal, config: ExecutorConfig,
                 capacities: dict[str, float], *, on_event: EventFn | None = None,
                 gate: Callable[[], None] | None = None) -> None:
        self.backend = backend
        # Raises when this process may no longer start migrations (a leader whose lease may
        # have run out); checked before the start is journalled and again right before it.
        self.gate = gate or (lambda: None)
        self.journal = journal
        self.config = config
        self.capacities = {h: c * config.limits.mem_overcommit for h, c in capacities.items()}
        self.on_event = on_event or (lambda kind, entry, progress: None)
        self._cancel_all = False
        self._cancel_ids: set[tuple[str, int]] = set()
        self.flights: list[_Flight] = []
        self.used: dict[str, float] = {}
        self.n_in: dict[str, int] = {}
        self.n_out: dict[str, int] = {}
        self.blocked: dict[tuple[str, int], str] = {}
        self._dirty = False  # an entry reached a final state since the last look
        self._multi_leg: set[str] = set()  # VMs with more than one entry (parking legs)
        self._plan_id = ""

    # -- control -------------------------------------------------------------------------
    def cancel(self, plan_id: str | None = None, ids: list[int] | None = None) -> None:
        """Cancel the run (no arguments) or only the given migrations. Safe from a signal."""
        if ids is None:
            self._cancel_all = True
        else:
            self._cancel_ids.update((plan_id or "", i) for i in ids)

    # -- helpers ---------------------------------------------------------------------------
    def _record(self, e: Entry, detail: str = "") -> None:
        self.journal.record(e, clock=self.backend.now(), detail=detail)

    def _request(self, e: Entry) -> MigrationRequest:
        m = self.config.migration
        return MigrationRequest(vm=e.vm, source=e.source, target=e.target, mem_mb=e.mem_mb,
                                bandwidth_mbps=m.bandwidth_mbps, downtime_ms=m.downtime_ms)

    def _refresh_usage(self) -> None:
        used: dict[str, float] = dict.fromkeys(self.capacities, 0.0)
        for vm in self.backend.inventory():
            used[vm.host] = used.get(vm.host, 0.0) + vm.mem_mb
        for f in self.flights:
            used[f.entry.target] = used.get(f.entry.target, 0.0) + f.entry.mem_mb
        self.used = used

    def _fly(self, e: Entry, handle: Handle | None) -> None:
        started = e.started_at if e.started_at is not None else self.backend.now()
        self.flights.append(_Flight(e, handle, started + self.config.timeout_for(e.est_seconds)))
        self.used[e.target] = self.used.get(e.target, 0.0) + e.mem_mb
        self.n_in[e.target] = self.n_in.get(e.target, 0) + 1
        self.n_out[e.source] = self.n_out.get(e.source, 0) + 1

    def _land(self, f: _Flight, moved: bool) -> None:
        e = f.entry
        self.flights.remove(f)
        self.n_in[e.target] -= 1
        self.n_out[e.source] -= 1
        if moved:
            self.used[e.source] = self.used.get(e.source, 0.0) - e.mem_mb
        else:
            self.used[e.target] = self.used.get(e.target, 0.0) - e.mem_mb

    def _terminal(self, e: Entry, state: State, reason: str = "") -> None:
        self._dirty = True
        e.state, e.phase, e.reason = state, Phase.NONE, reason
        e.finished_at = self.backend.now()
        e.next_at = None
        self._record(e, reason)
        self.on_event("end" if state is not State.SKIPPED else "skip", e, None)

    def _attempt_failed(self, e: Entry, reason: str) -> None:
        retry = self.config.retry
        if e.attempts < retry.attempts and not self._cancel_all:
            e.phase = Phase.BACKOFF
            e.token = None
            e.next_at = self.backend.now() + retry.delay(e.attempts)
            e.reason = reason
            self._record(e, f"attempt {e.attempts} failed: {reason}")
            self.on_event("retry", e, None)
        else:
            self._terminal(e, State.FAILED, reason)

    def _admit(self, e: Entry) -> None:
        """Raise the ``LimitExceeded`` that keeps ``e`` from starting now, if any."""
        lim = self.config.limits
        if len(self.flights) >= lim.max_concurrent:
            raise ClusterLimit(f"{lim.max_concurrent} migrations already in flight")
        if self.n_out.get(e.source, 0) >= lim.max_outgoing_per_host:
            raise HostOutgoingLimit(f"{e.source} already sends {lim.max_outgoing_per_host}",
                                    host=e.source)
        if self.n_in.get(e.target, 0) >= lim.max_incoming_per_host:
            raise HostIncomingLimit(f"{e.target} already receives {lim.max_incoming_per_host}",
                                    host=e.target)
        cap = self.capacities.get(e.target)
        if cap is None:
            raise NoRoom(f"no capacity known for host {e.target}", host=e.target)
        free = cap - self.used.get(e.target, 0.0)
        if e.mem_mb > free:
            raise NoRoom(f"no room on {e.target}: {max(free, 0):.0f} MiB free, {e.mem_mb} MiB "
                         "needed", host=e.target)

    # -- recovery --------------------------------------------------------------------------
    def _recover(self, e: Entry) -> None:
        """Reconcile one ``running`` entry left by a previous run with the backend."""
        if e.phase is Phase.BACKOFF:
            return
        if e.phase is Phase.MIGRATING and e.token:
            handle = Handle(self._request(e), e.token)
            try:
                self.backend.poll(handle)
            except BackendError:
                handle = None  # type: ignore[assignment]
            if handle is not None:
                self._fly(e, handle)
                self.on_event("resume", e, None)
                return
        finder = getattr(self.backend, "find_migration", None)
        if finder is not None:
            found = finder(e.vm)
            if found is not None and found.request.target == e.target:
                e.phase, e.token = Phase.MIGRATING, found.token
                if e.started_at is None:
                    e.started_at = self.backend.now()
                self._record(e, "recovered: migration found in flight")
                self._fly(e, found)
                self.on_event("resume", e, None)
                return
        loc = self.backend.locate(e.vm)
        if loc == e.target:
            self._terminal(e, State.SUCCEEDED, "recovered: the VM reached its target while the "
                                               "executor was down")
        elif loc == e.source and finder is None:
            self._fly(e, None)  # cannot tell whether it runs: watch where the VM is
            self.on_event("resume", e, None)
        elif loc == e.source and e.phase is Phase.STARTING:
            # The backend has no migration of the VM and the VM never left: the start never
            # reached the backend, so it is not an attempt. Never blindly repeated either: the
            # loop re-checks it like any planned move.
            e.attempts = max(0, e.attempts - 1)
            e.phase, e.token, e.started_at = Phase.NONE, None, None
            if e.plan_id == self._plan_id:
                e.state = State.PLANNED
                self._record(e, "recovered: the start never reached the backend (not counted "
                                "as an attempt); planned again")
            else:
                self._terminal(e, State.CANCELLED, f"superseded by plan {self._plan_id}; its "
                                                   "start never reached the backend")
        elif loc == e.source:
            self._attempt_failed(e, "interrupted: the executor stopped around the start; no "
                                    "migration is in flight and the VM is on its source")
        else:
            self._terminal(e, State.FAILED, f"recovered: VM {e.vm} is on "
                                            f"{loc or 'no host'}, neither source nor target")

    # -- the run ---------------------------------------------------------------------------
    def run(self, waves: Waves, plan_doc: str = "", *, dry_run: bool = False,
            plan_id: str | None = None) -> RunSummary:
        """Run ``waves`` under ``plan_id`` (default: the plan's fingerprint, so running the
        same plan again resumes it, and what it already did is not done twice)."""
        t_wall = time.monotonic()
        plan_id = plan_fingerprint(waves) if plan_id is None else plan_id
        self._plan_id = plan_id
        entries = self.journal.open_plan(plan_id, entries_for(waves, plan_id), plan_doc)
        t_clock = self.backend.now()
        self._cancel_all = False
        self._cancel_ids = set()
        self.flights = []
        self.n_in, self.n_out = {}, {}
        self._refresh_usage()
        mine = {e.id: e for e in entries}
        for e in self.journal.unfinished():
            if e.plan_id != plan_id and e.state is State.PLANNED:
                self._terminal(e, State.CANCELLED, f"superseded by plan {plan_id}")
        for other in self.journal.unfinished():
            if other.state is not State.RUNNING:
                continue
            e = mine[other.id] if other.plan_id == plan_id else other
            if other.plan_id != plan_id:
                entries.insert(0, e)  # first: the loop walks entries in order
            self._recover(e)
        self._refresh_usage()
        legs = Counter(e.vm for e in entries)
        self._multi_leg = {vm for vm, n in legs.items() if n > 1}
        self._loop([e for e in entries if not e.state.terminal])
        final = self.journal.entries(plan_id)
        return RunSummary(plan_id, final, self.backend.now() - t_clock,
                          time.monotonic() - t_wall, self.journal.commits, dry_run)

    def _loop(self, pending: list[Entry]) -> None:
        """``pending``: every entry not yet in a final state (including those in flight)."""
        poll = self.config.migration.poll_interval_s
        refresh = self.config.migration.inventory_refresh_s
        gate = -1
        last_refresh = self.backend.now()
        while True:
            if self._cancel_all or self._cancel_ids:
                self._apply_cancels(pending)
            if self._dirty:
                pending = [e for e in pending if not e.state.terminal]
                self._dirty = False
            planned = next((e for e in pending if e.state is State.PLANNED), None)
            if planned is not None and planned.wave != gate:
                gate = planned.wave
                if self.backend.now() - last_refresh >= refresh:
                    self._refresh_usage()
                    last_refresh = self.backend.now()
            started = self._start_ready(pending, gate)
            if self._dirty:
                pending = [e for e in pending if not e.state.terminal]
                self._dirty = False
            if not pending and not self.flights:
                return
            if not self.flights:
                backoff = [e.next_at for e in pending if e.phase is Phase.BACKOFF
                           and e.next_at is not None]
                if not started and not backoff:
                    # re-read the backend before giving up on a move for lack of room
                    self._refresh_usage()
                    last_refresh = self.backend.now()
                    if not self._start_ready(pending, gate):
                        self._skip_blocked(pending, gate)
                    continue
                if backoff and not started:
                    self.backend.wait(max(0.0, min(backoff) - self.backend.now()))
                    continue
            self.backend.wait(poll)
            self._poll_all()

    def _apply_cancels(self, pending: list[Entry]) -> None:
        flying = {id(f.entry) for f in self.flights}
        for f in self.flights:
            if not f.cancel and ((f.entry.plan_id, f.entry.id) in self._cancel_ids
                                 or self._cancel_all):
                self._send_cancel(f, "user")
        for e in pending:
            if id(e) in flying or e.state.terminal:
                continue
            if self._cancel_all:
                self._terminal(e, State.CANCELLED, "run cancelled")
            elif (e.plan_id, e.id) in self._cancel_ids:
                self._terminal(e, State.CANCELLED, "cancelled")

    def _skip_blocked(self, pending: list[Entry], gate: int) -> None:
        """Nothing runs and nothing can start: the gate's moves wait for room that never comes."""
        for e in pending:
            if e.state is State.PLANNED and e.wave == gate:
                why = self.blocked.get((e.plan_id, e.id), "blocked")
                self._terminal(e, State.SKIPPED, f"{why}, and no migration in flight frees any")

    def _start_ready(self, pending: list[Entry], gate: int) -> bool:
        started = False
        now = self.backend.now()
        first_open: dict[str, tuple[str, int]] = {}
        if self._multi_leg:
            for o in pending:
                if o.vm in self._multi_leg:
                    first_open.setdefault(o.vm, (o.plan_id, o.id))
        flying = {f.entry.vm for f in self.flights}
        in_flight = {id(f.entry) for f in self.flights}
        for e in pending:
            if id(e) in in_flight:
                continue
            if e.state is State.PLANNED and e.wave != gate:
                if e.wave > gate:
                    break
                continue
            if e.phase is Phase.BACKOFF and (e.next_at or 0.0) > now:
                continue
            if e.vm in flying or first_open.get(e.vm, (e.plan_id, e.id)) != (e.plan_id, e.id):
                continue  # an earlier leg of this VM has not ended
            try:
                self._admit(e)
            except ClusterLimit:
                break
            except NoRoom as exc:
                self.blocked[(e.plan_id, e.id)] = str(exc)
                continue
            except LimitExceeded:
                continue
            if self._start(e):
                started = True
                flying.add(e.vm)
        return started

    def _start(self, e: Entry) -> bool:
        """Re-check and start one migration; False if it was skipped or failed to start."""
        req = self._request(e)
        try:
            loc = self.backend.locate(e.vm)
        except BackendError as exc:
            self._terminal(e, State.SKIPPED, f"stale: cannot locate VM {e.vm}: {exc}")
            return False
        if loc != e.source:
            if loc == e.target and e.attempts:
                self._terminal(e, State.SUCCEEDED, "the VM reached its target")
            elif loc == e.target:
                self._terminal(e, State.SKIPPED, f"stale: VM {e.vm} is already on {e.target}")
            else:
                self._terminal(e, State.SKIPPED, f"stale: VM {e.vm} is on {loc or 'no host'}, "
                                                 f"not on its source {e.source}")
            return False
        try:
            self.backend.check(req)
        except IncompatibleHost as exc:  # the destination cannot run it: never start it
            self._terminal(e, State.SKIPPED, f"incompatible: {exc}")
            return False
        except BackendError as exc:
            if e.attempts:
                self._attempt_failed(e, f"{type(exc).__name__}: {exc}")
            else:
                self._terminal(e, State.SKIPPED, f"stale: {type(exc).__name__}: {exc}")
            return False
        self.gate()
        e.state, e.phase = State.RUNNING, Phase.STARTING
        e.attempts += 1
        e.token, e.next_at, e.started_at = None, None, self.backend.now()
        self._record(e, f"starting attempt {e.attempts}")
        self.gate()
        try:
            handle = self.backend.start(req)
        except IncompatibleHost as exc:  # refused before anything moved: retrying cannot help
            self._terminal(e, State.SKIPPED, f"incompatible (at start): {exc}")
            return False
        except BackendError as exc:
            self._attempt_failed(e, f"{type(exc).__name__}: {exc}")
            return False
        e.phase, e.token = Phase.MIGRATING, handle.token
        self._record(e, "started")
        self._fly(e, handle)
        self.on_event("start", e, None)
        return True

    def _send_cancel(self, f: _Flight, why: str) -> None:
        f.cancel = why
        if f.handle is not None:
            try:
                self.backend.cancel(f.handle)
            except BackendError as exc:
                f.entry.reason = f"cancel failed: {exc}"

    def _poll_all(self) -> None:
        now = self.backend.now()
        for f in list(self.flights):
            e = f.entry
            if f.handle is None:  # a recovered migration we cannot poll: watch the VM
                loc = self.backend.locate(e.vm)
                if loc == e.target:
                    self._land(f, True)
                    self._terminal(e, State.SUCCEEDED, "recovered: the VM reached its target")
                elif now >= f.deadline:
                    self._land(f, False)
                    self._attempt_failed(e, f"outcome unknown: the VM stayed on {loc} until the "
                                            "timeout after the executor restarted")
                continue
            try:
                p = self.backend.poll(f.handle)
            except BackendError as exc:
                if now >= f.deadline:
                    loc = self.backend.locate(e.vm)
                    self._land(f, loc == e.target)
                    if loc == e.target:
                        self._terminal(e, State.SUCCEEDED, "")
                    else:
                        self._attempt_failed(e, f"lost track of the migration: {exc}")
                continue
            f.last = p
            if p.status is MigrationStatus.ACTIVE:
                self.on_event("progress", e, p)
                if now >= f.deadline and not f.cancel:
                    self._send_cancel(f, "timeout")
                continue
            if p.status is MigrationStatus.COMPLETED:
                self._land(f, True)
                self._terminal(e, State.SUCCEEDED, "")
                continue
            self._land(f, False)
            if f.cancel == "user":
                self._terminal(e, State.CANCELLED, "cancelled")
            elif f.cancel == "timeout":
                self._attempt_failed(e, f"MigrationTimeout: no completion within "
                                        f"{self.config.timeout_for(e.est_seconds):g} s")
            else:
                self._attempt_failed(e, f"MigrationFailed: {p.error or p.status.value}")
