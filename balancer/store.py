"""Durable service state in SQLite: recommendations, the migration journal/history, cycles.

One connection guarded by a lock (the API threads and the control loop share it); WAL mode so
readers do not block the writer. A migration row is written as ``started`` *before* the backend
is asked to move the VM and updated when it ends, so a crash leaves a trace that
``Service.recover()`` resolves against the backend on the next start: nothing is forgotten.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS recommendations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    cycle INTEGER,
    kind TEXT NOT NULL,
    vm TEXT NOT NULL,
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    reason TEXT NOT NULL,
    mem_mb INTEGER NOT NULL,
    gain REAL NOT NULL,
    state TEXT NOT NULL,
    updated REAL NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS rec_state ON recommendations(state);
CREATE TABLE IF NOT EXISTS migrations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rec_id INTEGER,
    vm TEXT NOT NULL,
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    mem_mb INTEGER NOT NULL,
    trigger TEXT NOT NULL,
    state TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS mig_vm ON migrations(vm);
CREATE TABLE IF NOT EXISTS cycles (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    duration_s REAL NOT NULL,
    solve_s REAL,
    imbalance_before REAL,
    imbalance_after REAL,
    recommendations INTEGER NOT NULL,
    executed INTEGER NOT NULL,
    note TEXT
);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

REC_FIELDS = ("id", "created", "cycle", "kind", "vm", "source", "target", "reason", "mem_mb",
              "gain", "state", "updated", "detail")
MIG_FIELDS = ("id", "rec_id", "vm", "source", "target", "mem_mb", "trigger", "state",
              "started", "finished", "error")
FINAL_MIGRATION_STATES = ("completed", "failed", "cancelled", "skipped")


@dataclass(frozen=True)
class NewRecommendation:
    kind: str  # balance | mandatory | evacuation
    vm: str
    source: str
    target: str
    reason: str
    mem_mb: int
    gain: float


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        self._pending_cache: list[dict[str, Any]] | None = None
        self._pending_json: bytes | None = None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- key/value -----------------------------------------------------------------------
    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO kv(key, value) VALUES (?, ?)",
                             (key, json.dumps(value)))

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row["value"])

    # -- recommendations -------------------------------------------------------------------
    def replace_pending(self, recs: list[NewRecommendation], *, cycle: int | None,
                        kinds: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """Supersede the pending recommendations (of ``kinds``) and store the new ones."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if kinds is None:
                    self._db.execute("UPDATE recommendations SET state='superseded', updated=? "
                                     "WHERE state='pending'", (now,))
                else:
                    marks = ",".join("?" * len(kinds))
                    self._db.execute(
                        f"UPDATE recommendations SET state='superseded', updated=? "
                        f"WHERE state='pending' AND kind IN ({marks})", (now, *kinds))
                ids = []
                for r in recs:
                    cur = self._db.execute(
                        "INSERT INTO recommendations(created, cycle, kind, vm, source, target, "
                        "reason, mem_mb, gain, state, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (now, cycle, r.kind, r.vm, r.source, r.target, r.reason, r.mem_mb,
                         r.gain, "pending", now))
                    ids.append(cur.lastrowid)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._pending_cache = None
            self._pending_json = None
            return [self.recommendation(i) for i in ids]  # type: ignore[misc]

    def pending_json(self) -> bytes:
        """The pending recommendations as a JSON array, cached until they change."""
        with self._lock:
            if self._pending_json is None:
                self._pending_json = json.dumps(self.recommendations("pending"),
                                                separators=(",", ":")).encode()
            return self._pending_json

    def recommendation(self, rec_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM recommendations WHERE id = ?",
                                   (rec_id,)).fetchone()
        return None if row is None else dict(row)

    def recommendations(self, state: str | None = "pending", limit: int = 1000
                        ) -> list[dict[str, Any]]:
        if state == "pending":
            with self._lock:
                if self._pending_cache is None:
                    rows = self._db.execute(
                        "SELECT * FROM recommendations WHERE state='pending' ORDER BY id"
                    ).fetchall()
                    self._pending_cache = [dict(r) for r in rows]
                return self._pending_cache[:limit]
        with self._lock:
            if state is None:
                rows = self._db.execute("SELECT * FROM recommendations ORDER BY id DESC LIMIT ?",
                                        (limit,)).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM recommendations WHERE state = ? "
                                        "ORDER BY id DESC LIMIT ?", (state, limit)).fetchall()
        return [dict(r) for r in rows]

    def set_recommendation_state(self, rec_id: int, state: str, *, expect: str | None = None,
                                 detail: str | None = None) -> bool:
        """Move a recommendation to ``state``; with ``expect`` only from that state."""
        with self._lock:
            if expect is None:
                cur = self._db.execute(
                    "UPDATE recommendations SET state=?, updated=?, detail=COALESCE(?, detail) "
                    "WHERE id=?", (state, time.time(), detail, rec_id))
            else:
                cur = self._db.execute(
                    "UPDATE recommendations SET state=?, updated=?, detail=COALESCE(?, detail) "
                    "WHERE id=? AND state=?", (state, time.time(), detail, rec_id, expect))
            self._pending_cache = None
            self._pending_json = None
            return cur.rowcount == 1

    def dismissed_since(self, since: float) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT vm FROM recommendations WHERE "
                                    "state='dismissed' AND updated >= ?", (since,)).fetchall()
        return {r["vm"] for r in rows}

    # -- migration journal -------------------------------------------------------------------
    def migration_started(self, *, vm: str, source: str, target: str, mem_mb: int,
                          trigger: str, rec_id: int | None) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO migrations(rec_id, vm, source, target, mem_mb, trigger, state, "
                "started) VALUES (?,?,?,?,?,?,?,?)",
                (rec_id, vm, source, target, mem_mb, trigger, "started", time.time()))
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def migration_finished(self, mig_id: int, state: str, error: str | None = None) -> None:
        if state not in FINAL_MIGRATION_STATES:
            raise ValueError(f"not a final migration state: {state}")
        with self._lock:
            self._db.execute("UPDATE migrations SET state=?, finished=?, error=? WHERE id=?",
                             (state, time.time(), error, mig_id))

    def migration(self, mig_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM migrations WHERE id=?", (mig_id,)).fetchone()
        return None if row is None else dict(row)

    def unfinished_migrations(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM migrations WHERE state='started' "
                                    "ORDER BY id").fetchall()
        return [dict(r) for r in rows]

    def migrations(self, limit: int = 100, vm: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            if vm is None:
                rows = self._db.execute("SELECT * FROM migrations ORDER BY id DESC LIMIT ?",
                                        (limit,)).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM migrations WHERE vm=? ORDER BY id DESC "
                                        "LIMIT ?", (vm, limit)).fetchall()
        return [dict(r) for r in rows]

    def moved_since(self, since: float) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT vm FROM migrations WHERE "
                                    "state='completed' AND finished >= ?", (since,)).fetchall()
        return {r["vm"] for r in rows}

    # -- cycles ------------------------------------------------------------------------------
    def record_cycle(self, *, duration_s: float, solve_s: float | None,
                     imbalance_before: float | None, imbalance_after: float | None,
                     recommendations: int, executed: int, note: str | None) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO cycles(ts, duration_s, solve_s, imbalance_before, imbalance_after, "
                "recommendations, executed, note) VALUES (?,?,?,?,?,?,?,?)",
                (time.time(), duration_s, solve_s, imbalance_before, imbalance_after,
                 recommendations, executed, note))
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def cycles(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM cycles ORDER BY id DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [dict(r) for r in rows]
