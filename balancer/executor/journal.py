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
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from balancer.errors import InputError


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


_SCHEMA = """
CREATE TABLE IF NOT EXISTS plans (
    plan_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS migrations (
    plan_id TEXT NOT NULL REFERENCES plans(plan_id),
    id INTEGER NOT NULL,
    wave INTEGER NOT NULL,
    vm TEXT NOT NULL,
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    mem_mb INTEGER NOT NULL,
    est_seconds REAL NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    phase TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    token TEXT,
    started_at REAL,
    finished_at REAL,
    next_at REAL,
    reason TEXT NOT NULL DEFAULT '',
    clock REAL,  -- backend clock of the last change
    detail TEXT NOT NULL DEFAULT '',  -- what the last change was
    PRIMARY KEY (plan_id, id)
);
CREATE INDEX IF NOT EXISTS migrations_state ON migrations(state);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    plan_id TEXT NOT NULL,
    id INTEGER NOT NULL,
    wall REAL NOT NULL,
    clock REAL,
    state TEXT NOT NULL,
    phase TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
-- every change of an entry is logged in the same statement, hence the same transaction
CREATE TRIGGER IF NOT EXISTS migrations_log AFTER UPDATE ON migrations BEGIN
    INSERT INTO events (plan_id, id, wall, clock, state, phase, attempt, detail)
    VALUES (NEW.plan_id, NEW.id, (julianday('now') - 2440587.5) * 86400.0, NEW.clock,
            NEW.state, NEW.phase, NEW.attempts, NEW.detail);
END;
"""

_COLS = ("plan_id", "id", "wave", "vm", "source", "target", "mem_mb", "est_seconds", "kind",
         "state", "phase", "attempts", "token", "started_at", "finished_at", "next_at", "reason")


def _row(r: tuple) -> Entry:  # type: ignore[type-arg]
    d = dict(zip(_COLS, r, strict=True))
    d["state"] = State(d["state"])
    d["phase"] = Phase(d["phase"])
    return Entry(**d)


class Journal:
    """One SQLite file; ``:memory:`` for a dry run."""

    def __init__(self, path: str | Path, *, synchronous: str = "full") -> None:
        self.path = str(path)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        except sqlite3.Error as exc:
            raise InputError(f"journal: field 'path': cannot open {self.path}: {exc}") from None
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
            self.db.executescript(_SCHEMA)
            cols = {r[1] for r in self.db.execute("PRAGMA table_info(migrations)")}
            for col, decl in (("clock", "REAL"), ("detail", "TEXT NOT NULL DEFAULT ''")):
                if col not in cols:  # a journal written before these columns existed
                    self.db.execute(f"ALTER TABLE migrations ADD COLUMN {col} {decl}")
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise InputError(f"journal: field 'path': {self.path} is not a usable journal: "
                             f"{exc}") from None
        self.commits = 0

    def close(self) -> None:
        self.db.close()

    # -- plans ---------------------------------------------------------------------------
    def open_plan(self, plan_id: str, entries: list[Entry], doc: str) -> list[Entry]:
        """Record a plan's entries as ``planned`` unless the plan is already in the journal."""
        known = self.db.execute("SELECT 1 FROM plans WHERE plan_id=?", (plan_id,)).fetchone()
        if not known:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("INSERT INTO plans VALUES (?,?,?)", (plan_id, time.time(), doc))
                self.db.executemany(
                    f"INSERT INTO migrations ({','.join(_COLS)}) VALUES "
                    f"({','.join('?' * len(_COLS))})",
                    [self._values(e) for e in entries])
                self.db.executemany(
                    "INSERT INTO events (plan_id,id,wall,clock,state,phase,attempt,detail) "
                    "VALUES (?,?,?,?,?,?,?,?)",
                    [(plan_id, e.id, time.time(), None, e.state.value, "", 0, "planned")
                     for e in entries])
                self.db.execute("COMMIT")
                self.commits += 1
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return self.entries(plan_id)

    def entries(self, plan_id: str) -> list[Entry]:
        rows = self.db.execute(f"SELECT {','.join(_COLS)} FROM migrations WHERE plan_id=? "
                               "ORDER BY id", (plan_id,)).fetchall()
        return [_row(r) for r in rows]

    def unfinished(self) -> list[Entry]:
        rows = self.db.execute(f"SELECT {','.join(_COLS)} FROM migrations WHERE state IN "
                               "('planned','running') ORDER BY plan_id, id").fetchall()
        return [_row(r) for r in rows]

    def plan_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT plan_id FROM plans ORDER BY created")]

    def events(self, plan_id: str, mid: int | None = None) -> list[tuple]:  # type: ignore[type-arg]
        q = "SELECT id, clock, state, phase, attempt, detail FROM events WHERE plan_id=?"
        args: tuple = (plan_id,)  # type: ignore[type-arg]
        if mid is not None:
            q += " AND id=?"
            args += (mid,)
        return self.db.execute(q + " ORDER BY seq", args).fetchall()

    # -- transitions ---------------------------------------------------------------------
    @staticmethod
    def _values(e: Entry) -> tuple:  # type: ignore[type-arg]
        return tuple(e.state.value if c == "state" else e.phase.value if c == "phase"
                     else getattr(e, c) for c in _COLS)

    def record(self, e: Entry, *, clock: float | None, detail: str = "") -> None:
        """Commit the entry's current fields and an event row, in one transaction.

        One UPDATE statement in autocommit mode is its own transaction; the trigger
        ``migrations_log`` writes the event row inside it.
        """
        cur = self.db.execute(
            "UPDATE migrations SET state=?, phase=?, attempts=?, token=?, started_at=?, "
            "finished_at=?, next_at=?, reason=?, clock=?, detail=? WHERE plan_id=? AND id=?",
            (e.state.value, e.phase.value, e.attempts, e.token, e.started_at,
             e.finished_at, e.next_at, e.reason, clock, detail, e.plan_id, e.id))
        if cur.rowcount != 1:
            raise KeyError(f"journal has no migration {e.id} of plan {e.plan_id}")
        self.commits += 1
