"""The executor's durable journal (SQLite in WAL mode).

Every migration of a plan has one entry; its state moves along

::

    planned ──► running ──► succeeded
       │          │  ▲ ──► failed
       │          │  │ ──► cancelled
       │          ▼  │
       │        (backoff: running, waiting to retry)
       └──────► skipped / cancelled

and, inside ``running``, a phase: ``starting`` (committed *before* the backend is asked to start;
no handle yet), ``migrating`` (committed right after the backend returned a handle, with its
token and start time) and ``backoff`` (the last attempt failed; the next one is due at
``next_at``). Each change is one transaction (the entry row and a row in ``events``), committed
before the runner takes the next action, so after a crash at any point the journal says what
was asked of the backend, at worst without the handle of a migration that had just started;
recovery (``balancer.executor.runner``) resolves that case from where the backend says the VM is.

One writer at a time: a journal file is held with an OS lock (``JournalLock``) for as long as it
is open; a second executor or daemon is refused with the holder's name (or waits). In the
service's PostgreSQL store, the journal's tables carry the leader's term in every row and event,
and every write first checks that term is current (``fence``).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from balancer.errors import InputError
from balancer.store.sql import Database, migrate


class State(StrEnum):
    PLANNED = "planned"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    @property
    def terminal(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED, State.SKIPPED})


class Phase(StrEnum):
    NONE = ""
    STARTING = "starting"
    MIGRATING = "migrating"
    BACKOFF = "backoff"


@dataclass
class Entry:
    plan_id: str
    id: int
    wave: int
    vm: str
    source: str
    target: str
    mem_mb: int
    est_seconds: float
    kind: str
    state: State = State.PLANNED
    phase: Phase = Phase.NONE
    attempts: int = 0
    token: str | None = None
    started_at: float | None = None  # backend clock, current attempt
    finished_at: float | None = None
    next_at: float | None = None  # backend clock, next attempt (backoff)
    reason: str = ""


def _steps(p: str) -> list[tuple[int, list[str]]]:
    """The journal's schema, versioned; ``p`` prefixes the table names (``exec_`` when the
    journal lives in the service's shared PostgreSQL store)."""
    return [
        (1, [
            f"""CREATE TABLE IF NOT EXISTS {p}plans (
                plan_id TEXT PRIMARY KEY, created {{real}} NOT NULL, doc TEXT NOT NULL)""",
            f"""CREATE TABLE IF NOT EXISTS {p}migrations (
                plan_id TEXT NOT NULL REFERENCES {p}plans(plan_id), id INTEGER NOT NULL,
                wave INTEGER NOT NULL, vm TEXT NOT NULL, source TEXT NOT NULL,
                target TEXT NOT NULL, mem_mb INTEGER NOT NULL, est_seconds {{real}} NOT NULL,
                kind TEXT NOT NULL, state TEXT NOT NULL, phase TEXT NOT NULL DEFAULT '',
                attempts INTEGER NOT NULL DEFAULT 0, token TEXT, started_at {{real}},
                finished_at {{real}}, next_at {{real}}, reason TEXT NOT NULL DEFAULT '',
                clock {{real}}, detail TEXT NOT NULL DEFAULT '', PRIMARY KEY (plan_id, id))""",
            f"CREATE INDEX IF NOT EXISTS {p}migrations_state ON {p}migrations(state)",
            f"""CREATE TABLE IF NOT EXISTS {p}events (
                seq {{serial}}, plan_id TEXT NOT NULL, id INTEGER NOT NULL,
                wall {{real}} NOT NULL, clock {{real}}, state TEXT NOT NULL,
                phase TEXT NOT NULL, attempt INTEGER NOT NULL, detail TEXT NOT NULL DEFAULT '')""",
        ]),
        # events are written by record() itself now (the SQLite trigger of old journals goes)
        (2, ["DROP TRIGGER IF EXISTS migrations_log"] if not p else []),
        # the leader's term of each change (NULL for balancer execute's own journal)
        (3, [f"ALTER TABLE {p}migrations ADD COLUMN term {{bigint}}",
             f"ALTER TABLE {p}events ADD COLUMN term {{bigint}}"]),
    ]


_COLS = ("plan_id", "id", "wave", "vm", "source", "target", "mem_mb", "est_seconds", "kind",
         "state", "phase", "attempts", "token", "started_at", "finished_at", "next_at", "reason")


def _row(r: tuple) -> Entry:  # type: ignore[type-arg]
    d = dict(zip(_COLS, r, strict=True))
    d["state"] = State(d["state"])
    d["phase"] = Phase(d["phase"])
    return Entry(**d)


class JournalBusy(InputError):
    """Another process holds the journal."""


FenceFn = Callable[[Database], None]


class JournalLock:
    """An exclusive OS lock (``flock``) on ``<journal>.lock``, naming its holder.

    The kernel releases it when the holder exits, however it exits (kill -9 included), so a
    crashed executor never blocks the next one.
    """

    def __init__(self, journal: str, *, owner: str, wait: bool = False,
                 on_wait: Callable[[str], None] | None = None) -> None:
        self.path = journal + ".lock"
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"journal: field 'path': cannot open {self.path}: "
                             f"{exc.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = self.holder()
            if not wait:
                os.close(self.fd)
                raise JournalBusy(f"journal {journal} is in use by {held}; wait for it with "
                                  "--wait, or give another --journal") from None
            if on_wait is not None:
                on_wait(f"journal {journal} is in use by {held}; waiting for it")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        info = {"owner": owner, "pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(info).encode(), 0)

    def holder(self) -> str:
        try:
            info = json.loads(os.pread(self.fd, 4096, 0) or b"{}")
            return (f"{info.get('owner', 'another process')} (pid {info.get('pid', '?')} on "
                    f"{info.get('host', '?')}, since {info.get('since', '?')})")
        except (OSError, ValueError):
            return "another process"

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = -1


class Journal:
    """The executor's journal: a SQLite file (``:memory:`` for a dry run), held exclusively
    through ``JournalLock``; or tables ``exec_*`` in the service's PostgreSQL store (``db``),
    where leadership is the lock and ``fence`` checks the writer's term in every write."""

    def __init__(self, path: str | Path = ":memory:", *, synchronous: str = "full",
                 db: Database | None = None, fence: FenceFn | None = None,
                 owner: str = "balancer execute", wait: bool = False,
                 on_wait: Callable[[str], None] | None = None, lock: bool = True) -> None:
        self.fence = fence
        self.term: int | None = None
        self.lock: JournalLock | None = None
        if db is not None:
            self.path = db.target
            self.db = db
            self.p = "exec_"
        else:
            self.path = str(path)
            self.p = ""
            if self.path != ":memory:" and lock:  # lock=False: the caller holds it
                self.lock = JournalLock(self.path, owner=owner, wait=wait, on_wait=on_wait)
            try:
                self.db = Database(self.path, synchronous=synchronous)
                self._upgrade_sqlite()
                migrate(self.db, _steps(""), table="journal_schema")
            except (sqlite3.DatabaseError, InputError) as exc:
                self.close()
                msg = str(exc).split(": ", 2)[-1] if isinstance(exc, InputError) else str(exc)
                raise InputError(f"journal: field 'path': {self.path} is not a usable journal: "
                                 f"{msg}") from None
        if db is not None:
            migrate(self.db, _steps(self.p), table="exec_journal_schema")  # caller closes db
        self.commits = 0

    def _upgrade_sqlite(self) -> None:
        """Journals written before the versioned schema: add the columns they lack."""
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(migrations)")}
        if cols and not self.db.one("SELECT name FROM sqlite_master WHERE "
                                    "name = 'journal_schema'"):
            for col, decl in (("clock", "REAL"), ("detail", "TEXT NOT NULL DEFAULT ''")):
                if col not in cols:
                    self.db.execute(f"ALTER TABLE migrations ADD COLUMN {col} {decl}")

    def close(self) -> None:
        if getattr(self, "db", None) is not None and self.p == "":
            self.db.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @contextmanager
    def _write(self) -> Iterator[Database]:
        with self.db.tx() as db:
            if self.fence is not None:
                self.fence(db)
            yield db

    # -- plans ---------------------------------------------------------------------------
    def open_plan(self, plan_id: str, entries: list[Entry], doc: str) -> list[Entry]:
        """Record a plan's entries as ``planned`` unless the plan is already in the journal."""
        p = self.p
        known = self.db.one(f"SELECT 1 FROM {p}plans WHERE plan_id = ?", (plan_id,))
        if not known:
            with self._write() as db:
                now = time.time()
                db.execute(f"INSERT INTO {p}plans (plan_id, created, doc) VALUES (?,?,?)",
                           (plan_id, now, doc))
                if entries:
                    db.executemany(
                        f"INSERT INTO {p}migrations ({','.join(_COLS)}, term) VALUES "
                        f"({','.join('?' * len(_COLS))}, ?)",
                        [(*self._values(e), self.term) for e in entries])
                    db.executemany(
                        f"INSERT INTO {p}events (plan_id, id, wall, clock, state, phase, "
                        "attempt, detail, term) VALUES (?,?,?,?,?,?,?,?,?)",
                        [(plan_id, e.id, now, None, e.state.value, "", 0, "planned", self.term)
                         for e in entries])
            self.commits += 1
        return self.entries(plan_id)

    def entries(self, plan_id: str) -> list[Entry]:
        rows = self.db.execute(f"SELECT {','.join(_COLS)} FROM {self.p}migrations WHERE "
                               "plan_id = ? ORDER BY id", (plan_id,)).fetchall()
        return [_row(r) for r in rows]

    def unfinished(self) -> list[Entry]:
        rows = self.db.execute(f"SELECT {','.join(_COLS)} FROM {self.p}migrations WHERE state "
                               "IN ('planned','running') ORDER BY plan_id, id").fetchall()
        return [_row(r) for r in rows]

    def plan_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute(f"SELECT plan_id FROM {self.p}plans "
                                              "ORDER BY created").fetchall()]

    def events(self, plan_id: str, mid: int | None = None) -> list[tuple]:  # type: ignore[type-arg]
        q = (f"SELECT id, clock, state, phase, attempt, detail FROM {self.p}events "
             "WHERE plan_id = ?")
        args: tuple = (plan_id,)  # type: ignore[type-arg]
        if mid is not None:
            q += " AND id = ?"
            args += (mid,)
        return [tuple(r) for r in self.db.execute(q + " ORDER BY seq", args).fetchall()]

    # -- transitions ---------------------------------------------------------------------
    @staticmethod
    def _values(e: Entry) -> tuple:  # type: ignore[type-arg]
        return tuple(e.state.value if c == "state" else e.phase.value if c == "phase"
                     else getattr(e, c) for c in _COLS)

    def record(self, e: Entry, *, clock: float | None, detail: str = "") -> None:
        """Commit the entry's current fields and an event row, in one transaction (which
        first checks the writer's term when the journal is fenced)."""
        p = self.p
        with self._write() as db:
            cur = db.execute(
                f"UPDATE {p}migrations SET state = ?, phase = ?, attempts = ?, token = ?, "
                "started_at = ?, finished_at = ?, next_at = ?, reason = ?, clock = ?, "
                "detail = ?, term = ? WHERE plan_id = ? AND id = ?",
                (e.state.value, e.phase.value, e.attempts, e.token, e.started_at,
                 e.finished_at, e.next_at, e.reason, clock, detail, self.term, e.plan_id, e.id))
            if cur.rowcount != 1:
                raise KeyError(f"journal has no migration {e.id} of plan {e.plan_id}")
            db.execute(f"INSERT INTO {p}events (plan_id, id, wall, clock, state, phase, "
                       "attempt, detail, term) VALUES (?,?,?,?,?,?,?,?,?)",
                       (e.plan_id, e.id, time.time(), clock, e.state.value, e.phase.value,
                        e.attempts, detail, self.term))
        self.commits += 1
