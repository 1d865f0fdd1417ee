"""Carrying out the service's moves: the executor's config, the simulated backend, and
``PlanExecutor`` (planner waves + the executor's runner, the service's migration history).

In a PostgreSQL store the executor's journal is the store's ``exec_*`` tables (fenced by the
leader's term); otherwise a SQLite file beside the store, held with ``JournalLock``.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from balancer.config import ServiceConfig
from balancer.events import migration_event
from balancer.executor.base import Backend, BackendError
from balancer.executor.config import ExecutorConfig as ExecConfig
from balancer.executor.config import JournalConfig, LimitsConfig
from balancer.executor.config import load_config as load_exec_config
from balancer.executor.config import parse_config as parse_exec_config
from balancer.executor.journal import Entry, Journal, State
from balancer.executor.runner import Runner
from balancer.executor.simulated import SimulatedBackend
from balancer.model import ClusterSnapshot, Move
from balancer.planner import PlannerLimits, Waves, make_waves, plan_fingerprint
from balancer.service_errors import Unavailable
from balancer.store import Database, Store, is_url
from balancer.telemetry import Telemetry

log = logging.getLogger("balancer.daemon")

def executor_config(cfg: ServiceConfig, store_path: str) -> ExecConfig:
    """The executor's config: from ``[executor] config`` or ``[executor.settings]``.

    Unless it names a journal, the journal lives beside the store (``<store>.journal``); unless
    it sets limits, the executor's memory overcommit follows ``[cluster] mem_overcommit``.
    """
    if cfg.executor.settings is not None:
        out = parse_exec_config(cfg.executor.settings,
                                source=f"{cfg.source_path or 'config'}: [executor.settings]")
    else:
        out = load_exec_config(cfg.executor.config)
    update: dict[str, Any] = {}
    if out.journal == JournalConfig():
        # In a PostgreSQL store the journal is the store's exec_* tables (JOURNAL_IN_STORE).
        jp = ":memory:" if store_path == ":memory:" else JOURNAL_IN_STORE if is_url(
            store_path) else store_path + ".journal"
        update["journal"] = JournalConfig(path=jp, synchronous="normal")
    if out.limits == LimitsConfig():
        update["limits"] = LimitsConfig(mem_overcommit=cfg.cluster.mem_overcommit)
    return out.model_copy(update=update) if update else out


JOURNAL_IN_STORE = "store"


def simulated_backend(snapshot: ClusterSnapshot, exec_cfg: ExecConfig) -> Backend:
    """The executor's simulated backend holding ``snapshot``'s VMs: in memory, or in the file
    ``[simulated] state_path`` shared by the daemons of one store (each call re-reads it)."""
    if exec_cfg.simulated.state_path:
        return SimulatedBackend.from_snapshot(snapshot, exec_cfg, persist=True, shared=True)
    return SimulatedBackend.from_snapshot(snapshot, exec_cfg, persist=False)


_OUTCOME = {State.SUCCEEDED: "completed", State.FAILED: "failed",
            State.CANCELLED: "cancelled", State.SKIPPED: "skipped"}


class PlanExecutor:
    """Hands moves to the executor (planner waves + runner) and keeps the service's history.

    Description
        ``execute`` orders the moves into waves with ``balancer.planner.make_waves`` (every
        intermediate state fits; concurrency limits respected) and runs them with the
        executor's ``Runner``, the single chokepoint for limits, timeouts, retries and its
        SQLite journal. The service's own history rows (``Store.migrations``) are written
        ``started`` before the run and given the runner's outcome after it, so the API's
        history never loses a migration. ``recover`` lets the runner reconcile its journal after
        a crash, then resolves the service rows still ``started`` by where the VM runs.
        ``cancel`` (SIGTERM) asks the runner to cancel the run: in-flight migrations are
        cancelled and journalled, the rest marked cancelled.
    Requirements
        A backend on the ``balancer.executor.base.Backend`` protocol; host memory capacities.
    Limitations
        One run at a time (runs are serialised by a lock).
    """

    def __init__(self, backend: Backend, store: Store, telemetry: Telemetry,
                 exec_cfg: ExecConfig, journal_path: str,
                 gate: Callable[[], None] | None = None) -> None:
        self.backend = backend
        self.gate = gate
        self.store = store
        self.telemetry = telemetry
        self.exec_cfg = exec_cfg
        # The journal's SQLite connection belongs to the thread that opened it, so one worker
        # thread owns it and runs every executor call; callers wait for their result.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="executor")
        try:
            if journal_path == JOURNAL_IN_STORE:  # fenced by the leader's term
                self.journal: Journal = self._worker.submit(
                    lambda: Journal(db=Database(store.path), fence=store.check_fence)).result()
            else:  # the controller holds the journal's lock for its lifetime (JournalLock)
                self.journal = self._worker.submit(
                    Journal, journal_path, synchronous=exec_cfg.journal.synchronous,
                    lock=False).result()
        except BaseException:
            self._worker.shutdown(wait=True)
            raise
        self._lock = threading.Lock()
        self._runner: Runner | None = None
        self._cancelled = False

    def close(self) -> None:
        def shut() -> None:
            self.journal.close()
            if self.journal.p:  # the journal's own connection to the shared store
                self.journal.db.close()

        self._worker.submit(shut).result()
        self._worker.shutdown(wait=True)

    def lead(self, term: int) -> None:
        """Write under ``term`` from now on; a fencing-aware backend refuses older terms."""
        self.journal.term = term
        fence = getattr(self.backend, "fence_to", None)
        if fence is not None:
            self._worker.submit(fence, term).result()

    def set_backend(self, backend: Backend) -> None:
        """Use ``backend`` from the next run on (the journal, and its lock, stay)."""
        with self._lock:
            self.backend = backend

    def _limits(self) -> PlannerLimits:
        c = self.exec_cfg
        return PlannerLimits(max_incoming_per_host=c.limits.max_incoming_per_host,
                             max_outgoing_per_host=c.limits.max_outgoing_per_host,
                             max_concurrent=c.limits.max_concurrent,
                             mem_overcommit=c.limits.mem_overcommit,
                             bandwidth_mbps=c.migration.bandwidth_mbps,
                             dirty_rate_mbps=c.migration.dirty_rate_mbps,
                             downtime_ms=c.migration.downtime_ms)

    def execute(self, snapshot: ClusterSnapshot, moves: list[Move], *, trigger: str,
                rec_ids: dict[str, int]) -> list[dict[str, Any]]:
        """Run ``moves`` (from ``snapshot``'s placement); one history row per migration leg."""
        return self._worker.submit(self._execute, snapshot, moves, trigger, rec_ids).result()

    def _execute(self, snapshot: ClusterSnapshot, moves: list[Move], trigger: str,
                 rec_ids: dict[str, int]) -> list[dict[str, Any]]:
        with self._lock:
            if self._cancelled:
                raise Unavailable("shutting down: no new migrations")
            waves = make_waves(snapshot, moves, self._limits())
            rows = {}
            for m in waves.migrations:
                rows[m.id] = self.store.migration_started(
                    vm=m.vm, source=m.source, target=m.target, mem_mb=m.mem_mb,
                    trigger=trigger, rec_id=rec_ids.get(m.vm))
            caps = {h.name: float(h.mem_capacity) for h in snapshot.hosts}
            # Each execution is a run of its own. The fingerprint alone would make the same
            # moves, proposed again after an earlier run of them ended (cancelled by a
            # shutdown, or failed over from a killed leader), resolve to that finished run and
            # do nothing, cycle after cycle. What an interrupted run left in flight is settled
            # by recovery (and by the runner's start-up), not by re-using its id.
            plan_id = f"{plan_fingerprint(waves)}-{uuid.uuid4().hex[:12]}"
            done: set[int] = set()

            def on_event(kind: str, e: Entry, progress: Any) -> None:
                self.telemetry.events.publish(migration_event(kind, e, progress))  # console
                if kind in ("start", "resume"):
                    log.info("migration %s: %s %s -> %s %s (attempt %d, %s MiB)",
                             rows.get(e.id, "?") if e.plan_id == plan_id else "?", e.vm,
                             e.source, e.target, "started" if kind == "start" else "resumed",
                             e.attempts, e.mem_mb)
                elif kind in ("end", "skip"):
                    log.info("migration %s: %s %s -> %s %s%s",
                             rows.get(e.id, "?") if e.plan_id == plan_id else "?", e.vm,
                             e.source, e.target, e.state.value,
                             f": {e.reason}" if e.reason else "")
                elif kind == "retry":
                    log.warning("migration %s: %s attempt %d failed, retrying: %s",
                                rows.get(e.id, "?"), e.vm, e.attempts, e.reason)
                # History follows the run live: each leg's row ends when the runner ends it.
                if kind in ("end", "skip") and e.plan_id == plan_id and e.id in rows \
                        and e.id not in done and e.state in _OUTCOME:
                    outcome = _OUTCOME[e.state]
                    self.store.migration_finished(rows[e.id], outcome, e.reason or None)
                    self.telemetry.migrations.labels(outcome=outcome).inc()
                    done.add(e.id)

            self._runner = Runner(self.backend, self.journal, self.exec_cfg, caps,
                                  on_event=on_event, gate=self.gate)
            try:
                summary = self._runner.run(waves, json.dumps(waves.to_dict()), plan_id=plan_id)
            except BackendError as exc:
                for mid, row in rows.items():
                    m = waves.migrations[mid] if mid < len(waves.migrations) else None
                    self._settle_row(row, m.vm if m else "", m.target if m else "", str(exc))
                raise Unavailable(f"executor stopped: {exc}") from None
            finally:
                self._runner = None
            out = []
            for e in summary.entries:
                outcome = _OUTCOME.get(e.state)
                if e.id in done:
                    pass
                elif outcome is None:  # cannot happen after run(); keep the row honest anyway
                    self._settle_row(rows[e.id], e.vm, e.target, f"left {e.state.value}")
                else:
                    self.store.migration_finished(rows[e.id], outcome, e.reason or None)
                    self.telemetry.migrations.labels(outcome=outcome).inc()
                row = self.store.migration(rows[e.id])
                if row is not None:
                    out.append(row)
            return out

    def _settle_row(self, row_id: int, vm: str, target: str, error: str) -> None:
        try:
            where = self.backend.locate(vm) if vm else None
        except BackendError as exc:
            self.store.migration_finished(row_id, "failed", f"{error}; location unknown: {exc}")
            return
        if where == target:
            self.store.migration_finished(row_id, "completed", None)
        else:
            self.store.migration_finished(row_id, "failed", f"{error}; VM on {where}")

    def cancel_run(self) -> None:
        """Lost the lead: stop the run in progress (its next write would be fenced anyway)."""
        runner = self._runner
        if runner is not None:
            runner.cancel()

    def cancel(self) -> None:
        """Stop: cancel the run in progress (safe from a signal handler) and refuse new ones."""
        self._cancelled = True
        runner = self._runner
        if runner is not None:
            runner.cancel()

    def recover(self) -> list[dict[str, Any]]:
        """After a crash: the runner reconciles its journal, then our rows are resolved."""
        return self._worker.submit(self._recover).result()

    def _recover(self) -> list[dict[str, Any]]:
        with self._lock:
            if self.journal.unfinished():
                Runner(self.backend, self.journal, self.exec_cfg, {}, gate=self.gate).run(
                    Waves(migrations=[], makespan_s=0.0))
            out = []
            for row in self.store.unfinished_migrations():
                self._settle_row(row["id"], row["vm"], row["target"], "interrupted by a restart")
                out.append(self.store.migration(row["id"]))
            return out
