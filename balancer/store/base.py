"""Durable service state: recommendations, migration history, cycles, key/values, the leader.

One ``Store`` interface over two databases (``balancer.store.sql``): SQLite, the embedded
default (``[store] path``), and PostgreSQL for several daemons sharing one state (``[store]
url``). The SQL is the same for both; the schema is versioned (``MIGRATIONS``).

A migration row is written ``started`` *before* the backend is asked to move the VM and
updated when it ends, so a crash leaves a trace that recovery resolves against the backend:
nothing is forgotten.

Leadership (``acquire_lease`` / ``renew_lease``): one row holds the leader's id, address, term
and lease expiry, on the database's clock. The term rises at each change of leader. With
``fence`` set to the leader's ``(node, term)``, every write runs in a transaction that first
checks (holding the row lock) that this node still holds an unexpired lease of that term, and
raises ``Fenced`` otherwise: a leader that was paused past its lease writes nothing.

Recommendations are stable: ``replace_pending`` keeps a pending recommendation whose move (VM,
destination) is proposed again (same id, creation time and state; its reason and gain are
refreshed) and supersedes only those whose move changed or left the plan, saying why.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from balancer.errors import BalancerError
from balancer.store.sql import Database, migrate, redact

log = logging.getLogger("balancer.store")

MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE IF NOT EXISTS recommendations (
            id {serial}, created {real} NOT NULL, cycle INTEGER, kind TEXT NOT NULL,
            vm TEXT NOT NULL, source TEXT NOT NULL, target TEXT NOT NULL, reason TEXT NOT NULL,
            mem_mb INTEGER NOT NULL, gain {real} NOT NULL, state TEXT NOT NULL,
            updated {real} NOT NULL, detail TEXT)""",
        "CREATE INDEX IF NOT EXISTS rec_state ON recommendations(state)",
        """CREATE TABLE IF NOT EXISTS migrations (
            id {serial}, rec_id INTEGER, vm TEXT NOT NULL, source TEXT NOT NULL,
            target TEXT NOT NULL, mem_mb INTEGER NOT NULL, trigger TEXT NOT NULL,
            state TEXT NOT NULL, started {real} NOT NULL, finished {real}, error TEXT)""",
        "CREATE INDEX IF NOT EXISTS mig_vm ON migrations(vm)",
        """CREATE TABLE IF NOT EXISTS cycles (
            id {serial}, ts {real} NOT NULL, duration_s {real} NOT NULL, solve_s {real},
            imbalance_before {real}, imbalance_after {real}, recommendations INTEGER NOT NULL,
            executed INTEGER NOT NULL, note TEXT)""",
        "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ]),
    (2, [
        # versions of what followers cache (recommendations, inventory)
        "CREATE TABLE IF NOT EXISTS versions (key TEXT PRIMARY KEY, n {bigint} NOT NULL)",
        """CREATE TABLE IF NOT EXISTS leader (
            id INTEGER PRIMARY KEY, term {bigint} NOT NULL, holder TEXT NOT NULL,
            address TEXT NOT NULL, since {real} NOT NULL, expires {real} NOT NULL)""",
        "INSERT INTO leader (id, term, holder, address, since, expires) "
        "VALUES (1, 0, '', '', 0, 0)",
        "ALTER TABLE migrations ADD COLUMN term {bigint}",
    ]),
]

REC_FIELDS = ("id", "created", "cycle", "kind", "vm", "source", "target", "reason", "mem_mb",
              "gain", "state", "updated", "detail")
MIG_FIELDS = ("id", "rec_id", "vm", "source", "target", "mem_mb", "trigger", "state",
              "started", "finished", "error")
FINAL_MIGRATION_STATES = ("completed", "failed", "cancelled", "skipped")
_REC_COLS = ",".join(REC_FIELDS)
_MIG_COLS = ",".join(MIG_FIELDS)


class Fenced(BalancerError):
    """This process no longer holds the leadership it writes under."""


@dataclass(frozen=True)
class NewRecommendation:
    kind: str  # balance | mandatory | evacuation
    vm: str
    source: str
    target: str
    reason: str
    mem_mb: int
    gain: float


@dataclass(frozen=True)
class Lease:
    term: int
    holder: str
    address: str
    since: float
    expires: float


class Store:
    """The service's state in SQLite (a path, or ``:memory:``) or PostgreSQL (a URL)."""

    def __init__(self, target: str | Path) -> None:
        self.path = str(target)
        self.db = Database(self.path)
        self.kind = self.db.dialect.name
        try:
            self.schema_version = migrate(self.db, MIGRATIONS)
        except BaseException:
            self.db.close()
            raise
        self.fence: tuple[str, int] | None = None
        self._pending: tuple[int, list[dict[str, Any]], bytes] | None = None
        self._history: tuple[int, bytes] | None = None
        # watch_versions(): the versions as last read by a background thread, so that the
        # API's version checks never wait on the database
        self._watched: dict[str, int] | None = None
        self._bumped: dict[str, int] = {}
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def describe(self) -> str:
        return f"{self.kind} {redact(self.path)}"

    def close(self) -> None:
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self.db.close()

    def watch_versions(self, interval_s: float = 0.1) -> None:
        """Read every version in a background thread each ``interval_s``; ``version()`` then
        answers from that copy (this process's own writes at once, other processes' within
        ``interval_s``) and never waits on the database. For PostgreSQL, where a version check
        on the API's event loop could otherwise wait up to the connect timeout for a server
        that stopped answering; cached reads then keep being served."""
        if self._watcher is not None:
            return
        self._watched = self._read_versions()

        def run() -> None:
            while not self._watch_stop.wait(interval_s):
                try:
                    self._watched = self._read_versions()
                except Exception as exc:  # the database is away: keep the last copy
                    log.debug("version watch: %s", exc)

        self._watcher = threading.Thread(target=run, name="store-versions", daemon=True)
        self._watcher.start()

    def _read_versions(self) -> dict[str, int]:
        return {str(k): int(n) for k, n in self.db.rows("SELECT key, n FROM versions")}

    # -- transactions and fencing ---------------------------------------------------------
    def check_fence(self, db: Database) -> None:
        """Inside ``db``'s transaction: raise ``Fenced`` unless ``self.fence`` leads now."""
        if self.fence is None:
            return
        node, term = self.fence
        d = db.dialect
        row = db.one(f"SELECT term, holder, {d.now} < expires FROM leader WHERE id = 1"
                     f"{' FOR SHARE' if db.postgres else ''}")
        if row is None or int(row[0]) != term or row[1] != node or not row[2]:
            now_term = None if row is None else int(row[0])
            raise Fenced(f"term {term} is no longer current (the store says term {now_term}, "
                         f"held by {None if row is None else row[1]}, "
                         f"{'expired' if row is not None and not row[2] else 'live'})")

    @contextmanager
    def _write(self) -> Iterator[Database]:
        with self.db.lock:  # one writer in this process: the bumps below are this one's
            outer = not self.db.in_transaction
            with self.db.tx() as db:
                self.check_fence(db)
                if outer:
                    self._bumped = {}
                yield db
            if outer and self._bumped and self._watched is not None:
                # committed: this process reads its own writes at once
                self._watched = {**self._watched, **self._bumped}
                self._drop_caches(self._bumped)

    def _bump(self, db: Database, key: str) -> None:
        row = db.one("INSERT INTO versions (key, n) VALUES (?, 1) ON CONFLICT (key) DO UPDATE "
                     "SET n = versions.n + 1 RETURNING n", (key,))
        self._bumped[key] = int(row[0])  # type: ignore[index]
        self._drop_caches((key,))

    def _drop_caches(self, keys: Iterable[str]) -> None:
        for key in keys:
            if key == "recs":
                self._pending = None
            elif key == "migs":
                self._history = None

    def version(self, key: str) -> int:
        watched = self._watched
        if watched is not None:
            return watched.get(key, 0)
        row = self.db.one("SELECT n FROM versions WHERE key = ?", (key,))
        return 0 if row is None else int(row[0])

    # -- key/value -------------------------------------------------------------------------
    def put(self, key: str, value: Any) -> None:
        with self._write() as db:
            db.execute("INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                       "SET value = excluded.value", (key, json.dumps(value)))
            self._bump(db, key)

    def get(self, key: str, default: Any = None) -> Any:
        row = self.db.one("SELECT value FROM kv WHERE key = ?", (key,))
        return default if row is None else json.loads(row[0])

    # -- leadership ------------------------------------------------------------------------
    def lease(self) -> Lease | None:
        row = self.db.one("SELECT term, holder, address, since, expires FROM leader "
                          "WHERE id = 1")
        return None if row is None else Lease(int(row[0]), row[1], row[2], float(row[3]),
                                              float(row[4]))

    def db_now(self) -> float:
        return float(self.db.one(f"SELECT {self.db.dialect.now}")[0])  # type: ignore[index]

    def acquire_lease(self, node: str, address: str, lease_s: float, *,
                      force: bool = False) -> int | None:
        """Take the lead if nobody holds an unexpired lease (or ``force``): the new term.

        A node that already holds the lease renews it and keeps its term. None: another node
        leads.
        """
        d = self.db.dialect
        with self.db.tx() as db:
            row = db.one(f"SELECT term, holder, {d.now} >= expires, {d.now} FROM leader "
                         f"WHERE id = 1{d.lock_row}")
            assert row is not None  # created by the schema migration
            term, holder, expired, now = int(row[0]), row[1], bool(row[2]), float(row[3])
            if holder == node and not expired:
                db.execute("UPDATE leader SET expires = ? WHERE id = 1", (now + lease_s,))
                return term
            if not expired and not force:
                return None
            db.execute("UPDATE leader SET term = ?, holder = ?, address = ?, since = ?, "
                       "expires = ? WHERE id = 1", (term + 1, node, address, now, now + lease_s))
            return term + 1

    def renew_lease(self, node: str, term: int, lease_s: float) -> bool:
        """Extend our unexpired lease of ``term``; False if it expired or someone else leads."""
        d = self.db.dialect
        with self.db.tx() as db:
            cur = db.execute(f"UPDATE leader SET expires = {d.now} + ? WHERE id = 1 AND "
                             f"term = ? AND holder = ? AND expires > {d.now}",
                             (lease_s, term, node))
            return bool(cur.rowcount == 1)

    def release_lease(self, node: str, term: int) -> None:
        """Give the lead up at once (clean shutdown): a follower need not wait for expiry."""
        with self.db.tx() as db:
            db.execute("UPDATE leader SET expires = 0 WHERE id = 1 AND term = ? AND holder = ?",
                       (term, node))

    # -- recommendations -------------------------------------------------------------------
    def replace_pending(self, recs: list[NewRecommendation], *, cycle: int | None,
                        kinds: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """Make ``recs`` the pending recommendations (of ``kinds``), keeping stable ones.

        A pending recommendation whose move (VM, destination) is in ``recs`` keeps its id,
        creation time and state (reason, gain, source and cycle are refreshed); the others
        are superseded with the reason in ``detail``; moves not pending yet are added.
        """
        with self._write() as db:
            now = float(time.time())
            old = db.dicts(f"SELECT {_REC_COLS} FROM recommendations WHERE state = 'pending' "
                           "ORDER BY id")
            if kinds is not None:
                old = [r for r in old if r["kind"] in kinds]
            # a move is known by (VM, destination); a host power action (no VM) by its kind
            # and host, so that a standby never turns into a wake under the same id
            by_move = {(r["vm"] or r["kind"], r["target"]): r for r in old}
            new_target = {r.vm: r.target for r in recs if r.vm}
            ids: list[int] = []
            kept: set[int] = set()
            for r in recs:
                prev = by_move.get((r.vm or r.kind, r.target))
                if prev is not None and prev["id"] not in kept:
                    db.execute("UPDATE recommendations SET cycle = ?, kind = ?, source = ?, "
                               "reason = ?, mem_mb = ?, gain = ?, updated = ? WHERE id = ?",
                               (cycle, r.kind, r.source, r.reason, r.mem_mb, r.gain, now,
                                prev["id"]))
                    kept.add(prev["id"])
                    ids.append(prev["id"])
                    continue
                row = db.one("INSERT INTO recommendations (created, cycle, kind, vm, source, "
                             "target, reason, mem_mb, gain, state, updated) VALUES "
                             "(?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
                             (now, cycle, r.kind, r.vm, r.source, r.target, r.reason, r.mem_mb,
                              r.gain, "pending", now))
                ids.append(int(row[0]))  # type: ignore[index]
            for r in old:
                if r["id"] in kept:
                    continue
                if r["vm"] in new_target:
                    why = f"superseded: the plan now moves {r['vm']} to {new_target[r['vm']]}"
                else:
                    why = ("superseded: no longer in the plan" +
                           (f" of cycle {cycle}" if cycle is not None else ""))
                db.execute("UPDATE recommendations SET state = 'superseded', updated = ?, "
                           "detail = ? WHERE id = ? AND state = 'pending'", (now, why, r["id"]))
            self._bump(db, "recs")
        return [self.recommendation(i) for i in ids]  # type: ignore[misc]

    def _pending_cached(self) -> tuple[list[dict[str, Any]], bytes]:
        v = self.version("recs")
        cached = self._pending
        if cached is None or cached[0] != v:
            rows = self.db.dicts(f"SELECT {_REC_COLS} FROM recommendations WHERE "
                                 "state = 'pending' ORDER BY id")
            cached = (v, rows, json.dumps(rows, separators=(",", ":")).encode())
            self._pending = cached
        return cached[1], cached[2]

    def pending_json(self) -> bytes:
        """The pending recommendations as a JSON array, cached until they change (in any
        process sharing the store)."""
        return self._pending_cached()[1]

    def pending_page(self, limit: int) -> bytes | None:
        """``pending_json()`` if there are at most ``limit`` pending recommendations, else
        None (one version check either way)."""
        rows, body = self._pending_cached()
        return body if len(rows) <= limit else None

    def recommendation(self, rec_id: int) -> dict[str, Any] | None:
        rows = self.db.dicts(f"SELECT {_REC_COLS} FROM recommendations WHERE id = ?", (rec_id,))
        return rows[0] if rows else None

    def recommendations(self, state: str | None = "pending", limit: int = 1000
                        ) -> list[dict[str, Any]]:
        if state == "pending":
            return list(self._pending_cached()[0][:limit])
        if state is None:
            return self.db.dicts(f"SELECT {_REC_COLS} FROM recommendations ORDER BY id DESC "
                                 "LIMIT ?", (limit,))
        return self.db.dicts(f"SELECT {_REC_COLS} FROM recommendations WHERE state = ? "
                             "ORDER BY id DESC LIMIT ?", (state, limit))

    def set_recommendation_state(self, rec_id: int, state: str, *, expect: str | None = None,
                                 detail: str | None = None) -> bool:
        """Move a recommendation to ``state``; with ``expect`` only from that state."""
        with self._write() as db:
            sql = ("UPDATE recommendations SET state = ?, updated = ?, "
                   "detail = COALESCE(?, detail) WHERE id = ?")
            args: tuple[Any, ...] = (state, time.time(), detail, rec_id)
            if expect is not None:
                sql += " AND state = ?"
                args += (expect,)
            cur = db.execute(sql, args)
            self._bump(db, "recs")
            return bool(cur.rowcount == 1)

    def dismissed_since(self, since: float) -> set[str]:
        rows = self.db.rows("SELECT DISTINCT vm FROM recommendations WHERE "
                            "state = 'dismissed' AND updated >= ? AND vm <> ''", (since,))
        return {r[0] for r in rows}

    def dismissed_hosts_since(self, since: float) -> set[str]:
        """Hosts whose power action (standby, wake) was dismissed since ``since``."""
        rows = self.db.rows("SELECT DISTINCT source FROM recommendations WHERE state = "
                            "'dismissed' AND kind IN ('standby', 'wake') AND updated >= ?",
                            (since,))
        return {r[0] for r in rows}

    # -- migration history -----------------------------------------------------------------
    def migration_started(self, *, vm: str, source: str, target: str, mem_mb: int,
                          trigger: str, rec_id: int | None) -> int:
        term = self.fence[1] if self.fence else None
        with self._write() as db:
            row = db.one("INSERT INTO migrations (rec_id, vm, source, target, mem_mb, trigger, "
                         "state, started, term) VALUES (?,?,?,?,?,?,?,?,?) RETURNING id",
                         (rec_id, vm, source, target, mem_mb, trigger, "started", time.time(),
                          term))
            self._bump(db, "migs")
            return int(row[0])  # type: ignore[index]

    def migration_finished(self, mig_id: int, state: str, error: str | None = None) -> None:
        if state not in FINAL_MIGRATION_STATES:
            raise ValueError(f"not a final migration state: {state}")
        with self._write() as db:
            db.execute("UPDATE migrations SET state = ?, finished = ?, error = ? WHERE id = ?",
                       (state, time.time(), error, mig_id))
            self._bump(db, "migs")

    def migration(self, mig_id: int) -> dict[str, Any] | None:
        rows = self.db.dicts(f"SELECT {_MIG_COLS} FROM migrations WHERE id = ?", (mig_id,))
        return rows[0] if rows else None

    def unfinished_migrations(self) -> list[dict[str, Any]]:
        return self.db.dicts(f"SELECT {_MIG_COLS} FROM migrations WHERE state = 'started' "
                             "ORDER BY id")

    def migrations(self, limit: int = 100, vm: str | None = None) -> list[dict[str, Any]]:
        if vm is None:
            return self.db.dicts(f"SELECT {_MIG_COLS} FROM migrations ORDER BY id DESC "
                                 "LIMIT ?", (limit,))
        return self.db.dicts(f"SELECT {_MIG_COLS} FROM migrations WHERE vm = ? ORDER BY id "
                             "DESC LIMIT ?", (vm, limit))

    HISTORY_PAGE = 100

    def history_json(self) -> bytes:
        """The newest ``HISTORY_PAGE`` migrations as a JSON array (``/v1/history``'s default
        page), cached until a migration starts or ends (in any process sharing the store)."""
        v = self.version("migs")
        cached = self._history
        if cached is None or cached[0] != v:
            rows = self.migrations(limit=self.HISTORY_PAGE)
            cached = (v, json.dumps(rows, separators=(",", ":")).encode())
            self._history = cached
        return cached[1]

    def moved_since(self, since: float) -> set[str]:
        rows = self.db.rows("SELECT DISTINCT vm FROM migrations WHERE "
                            "state = 'completed' AND finished >= ?", (since,))
        return {r[0] for r in rows}

    # -- cycles ----------------------------------------------------------------------------
    def record_cycle(self, *, duration_s: float, solve_s: float | None,
                     imbalance_before: float | None, imbalance_after: float | None,
                     recommendations: int, executed: int, note: str | None) -> int:
        with self._write() as db:
            row = db.one("INSERT INTO cycles (ts, duration_s, solve_s, imbalance_before, "
                         "imbalance_after, recommendations, executed, note) VALUES "
                         "(?,?,?,?,?,?,?,?) RETURNING id",
                         (time.time(), duration_s, solve_s, imbalance_before, imbalance_after,
                          recommendations, executed, note))
            return int(row[0])  # type: ignore[index]

    def cycles(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.db.dicts("SELECT * FROM cycles ORDER BY id DESC LIMIT ?", (limit,))
