"""The store interface, run unchanged on SQLite and on a real PostgreSQL server: schema
versions, key/values, stable recommendations, migration history, leases and fencing."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancer.store import MIGRATIONS, Fenced, NewRecommendation, Store, StoreError
from tests.pgutil import pg_url  # noqa: F401


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "state.db")
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture
def store(target: str) -> Iterator[Store]:
    s = Store(target)
    yield s
    s.close()


def rec(vm: str, target: str, kind: str = "balance", gain: float = 0.1) -> NewRecommendation:
    return NewRecommendation(kind=kind, vm=vm, source="h1", target=target,
                             reason=f"balance: {vm} to {target}", mem_mb=4096, gain=gain)


def test_schema_is_versioned_and_reopening_keeps_state(target: str) -> None:
    s = Store(target)
    assert s.schema_version == max(v for v, _ in MIGRATIONS)
    s.put("inventory", {"hosts": [1, 2]})
    s.close()
    s = Store(target)  # migrations are not applied twice
    assert s.get("inventory") == {"hosts": [1, 2]} and s.get("missing", 7) == 7
    assert s.version("inventory") == 1
    s.db.execute("INSERT INTO schema_version (version, applied) VALUES (999, 0)")
    s.close()
    with pytest.raises(StoreError, match="schema version 999, newer than this balancer"):
        Store(target)


def test_recommendations_are_stable_and_superseded_with_a_reason(store: Store) -> None:
    first = store.replace_pending([rec("a", "h2"), rec("b", "h3"), rec("c", "h4")], cycle=1)
    assert [r["state"] for r in first] == ["pending"] * 3
    time.sleep(0.01)
    second = store.replace_pending([rec("a", "h2", gain=0.3), rec("b", "h4")], cycle=2)
    a1, a2 = first[0], second[0]
    assert (a2["id"], a2["created"], a2["state"]) == (a1["id"], a1["created"], "pending")
    assert a2["gain"] == 0.3 and a2["cycle"] == 2 and a2["updated"] > a1["updated"]
    assert second[1]["id"] not in {r["id"] for r in first}
    b_old = store.recommendation(first[1]["id"])
    c_old = store.recommendation(first[2]["id"])
    assert b_old["state"] == "superseded"
    assert b_old["detail"] == "superseded: the plan now moves b to h4"
    assert c_old["state"] == "superseded"
    assert c_old["detail"] == "superseded: no longer in the plan of cycle 2"
    assert [r["id"] for r in store.recommendations("pending")] == [a1["id"], second[1]["id"]]
    # only the given kinds are replaced
    store.replace_pending([rec("e", "h1", kind="evacuation")], cycle=None,
                          kinds=("evacuation", "mandatory"))
    assert len(store.recommendations("pending")) == 3
    assert store.set_recommendation_state(a1["id"], "dismissed", expect="pending")
    assert not store.set_recommendation_state(a1["id"], "applying", expect="pending")
    assert store.dismissed_since(time.time() - 60) == {"a"}
    assert b'"vm":"a"' not in store.pending_json()


def test_pending_cache_follows_changes_made_by_another_process(target: str) -> None:
    one, two = Store(target), Store(target)
    try:
        one.replace_pending([rec("a", "h2")], cycle=1)
        assert [r["vm"] for r in two.recommendations("pending")] == ["a"]
        assert b'"vm":"a"' in two.pending_json()
        one.replace_pending([rec("b", "h2")], cycle=2)
        assert [r["vm"] for r in two.recommendations("pending")] == ["b"]
        assert b'"vm":"a"' not in two.pending_json()
    finally:
        one.close()
        two.close()


def test_migration_history(store: Store) -> None:
    m1 = store.migration_started(vm="a", source="h1", target="h2", mem_mb=1024,
                                 trigger="auto", rec_id=None)
    m2 = store.migration_started(vm="b", source="h1", target="h3", mem_mb=2048,
                                 trigger="api", rec_id=5)
    assert [m["id"] for m in store.unfinished_migrations()] == [m1, m2]
    store.migration_finished(m1, "completed")
    store.migration_finished(m2, "failed", "boom")
    assert store.unfinished_migrations() == []
    assert store.migration(m2)["error"] == "boom" and store.migration(m2)["rec_id"] == 5
    assert [m["id"] for m in store.migrations(vm="a")] == [m1]
    assert store.moved_since(time.time() - 60) == {"a"}
    with pytest.raises(ValueError):
        store.migration_finished(m1, "started")
    cid = store.record_cycle(duration_s=1.0, solve_s=0.5, imbalance_before=0.3,
                             imbalance_after=0.1, recommendations=2, executed=1, note=None)
    assert store.cycles()[0]["id"] == cid


def test_one_leader_per_term_and_fencing(target: str) -> None:
    a, b = Store(target), Store(target)
    try:
        assert a.lease().term == 0
        t1 = a.acquire_lease("a", "http://a", 0.5)
        assert t1 == 1
        assert b.acquire_lease("b", "http://b", 0.5) is None  # a holds it
        assert a.acquire_lease("a", "http://a", 0.5) == 1  # renewal keeps the term
        assert a.renew_lease("a", 1, 0.5)
        a.fence = ("a", 1)
        a.put("k", 1)  # the leader writes
        time.sleep(0.7)  # a's lease runs out
        with pytest.raises(Fenced, match="expired"):
            a.put("k", 2)
        assert not a.renew_lease("a", 1, 0.5)  # an expired lease is not renewed
        t2 = b.acquire_lease("b", "http://b", 5.0)
        assert t2 == 2  # the term rises with the change of leader
        lease = b.lease()
        assert (lease.holder, lease.address, lease.term) == ("b", "http://b", 2)
        with pytest.raises(Fenced, match="term 1 is no longer current"):
            a.migration_started(vm="x", source="h1", target="h2", mem_mb=1, trigger="auto",
                                rec_id=None)
        assert a.get("k") == 1 and a.unfinished_migrations() == []
        b.fence = ("b", 2)
        b.put("k", 3)
        b.release_lease("b", 2)  # a clean stop: the next one need not wait
        assert a.acquire_lease("a", "http://a", 5.0) == 3
    finally:
        a.close()
        b.close()


def test_exactly_one_of_many_contenders_wins(target: str) -> None:
    stores = [Store(target) for _ in range(4)]
    wins: list[tuple[str, int | None]] = []
    barrier = threading.Barrier(len(stores))

    def contend(i: int) -> None:
        barrier.wait()
        wins.append((f"n{i}", stores[i].acquire_lease(f"n{i}", "", 30.0)))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    winners = [n for n, term in wins if term is not None]
    assert len(winners) == 1 and dict(wins)[winners[0]] == 1


def test_a_bad_url_is_one_line_naming_the_field() -> None:
    with pytest.raises(StoreError, match=r"store: field 'url': cannot connect to "
                                         r"postgresql://nobody:\*\*\*@127.0.0.1:1/x"):
        Store("postgresql://nobody:secret@127.0.0.1:1/x")


def test_reads_do_not_wait_for_a_writers_transaction(store: Store) -> None:
    """A cycle's write transaction must not stall the API's reads: while one thread holds a
    write transaction open (uncommitted changes in it), another thread reads the last
    committed state at once, and sees the new state after the commit."""
    store.replace_pending([rec("a", "h2")], cycle=1)
    in_tx, release = threading.Event(), threading.Event()

    def writer() -> None:
        with store.db.tx() as db:
            store.check_fence(db)
            db.execute("UPDATE recommendations SET reason = 'uncommitted' WHERE vm = 'a'")
            store._bump(db, "recs")
            in_tx.set()
            release.wait(30)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert in_tx.wait(10)
        seen: list[list[str]] = []
        reader = threading.Thread(target=lambda: seen.append(
            [r["reason"] for r in store.recommendations("pending")]
            + [str(store.get("nothing", "none")), str(len(store.migrations()))]))
        t0 = time.monotonic()
        reader.start()
        reader.join(5)
        assert not reader.is_alive(), "a read waited for the writer's transaction"
        assert time.monotonic() - t0 < 2
        assert seen == [["balance: a to h2", "none", "0"]]  # the committed state
    finally:
        release.set()
        t.join(10)
    assert [r["reason"] for r in store.recommendations("pending")] == ["uncommitted"]


def test_cached_history_follows_writes_of_another_process(target: str) -> None:
    """``/v1/history``'s cached page is refreshed when any store on the same database (a
    leader, while this one follows) starts or finishes a migration."""
    import json as _json
    follower, leader = Store(target), Store(target)
    try:
        assert _json.loads(follower.history_json()) == []
        mid = leader.migration_started(vm="a", source="h1", target="h2", mem_mb=1024,
                                       trigger="auto", rec_id=None)
        page = _json.loads(follower.history_json())
        assert [(m["vm"], m["state"]) for m in page] == [("a", "started")]
        leader.migration_finished(mid, "completed")
        assert _json.loads(follower.history_json())[0]["state"] == "completed"
        assert follower.history_json() is follower.history_json()  # cached while unchanged
        for i in range(Store.HISTORY_PAGE + 5):
            leader.migration_started(vm=f"v{i}", source="h1", target="h2", mem_mb=1,
                                     trigger="auto", rec_id=None)
        page = _json.loads(follower.history_json())
        assert len(page) == Store.HISTORY_PAGE and page[0]["vm"] == f"v{Store.HISTORY_PAGE + 4}"
    finally:
        follower.close()
        leader.close()


def test_watched_versions_keep_reads_answering_while_the_database_hangs(
        pg_url: str) -> None:  # noqa: F811
    """``watch_versions``: this process's writes are read back at once, another process's
    within the interval, and while a session holds the versions table locked (a database that
    stopped answering, as the API's event loop sees it) cached reads still answer at once,
    where an unwatched store waits for the lock."""
    import psycopg

    watched, other, plain = Store(pg_url), Store(pg_url), Store(pg_url)
    try:
        watched.watch_versions(0.05)
        watched.replace_pending([rec("v1", "h2")], cycle=1)
        assert [r["vm"] for r in json.loads(watched.pending_json())] == ["v1"]  # own write
        other.replace_pending([rec("v2", "h3")], cycle=2)
        deadline = time.monotonic() + 5
        while [r["vm"] for r in json.loads(watched.pending_json())] != ["v2"]:
            assert time.monotonic() < deadline, "another store's write never showed"
            time.sleep(0.02)
        assert [r["vm"] for r in json.loads(plain.pending_json())] == ["v2"]

        with psycopg.connect(pg_url, autocommit=False) as lock:
            lock.execute("LOCK TABLE versions IN ACCESS EXCLUSIVE MODE")
            got: list[list[str]] = []

            def reads() -> None:
                for _ in range(20):
                    got.append([r["vm"] for r in json.loads(watched.pending_json())])

            fast = threading.Thread(target=reads, daemon=True)
            fast.start()
            fast.join(timeout=1.0)
            done = threading.Event()
            slow = threading.Thread(target=lambda: (plain.pending_json(), done.set()),
                                    daemon=True)
            slow.start()
            blocked = not done.wait(1.0)  # the unwatched store waits on the lock
            lock.rollback()
        assert not fast.is_alive() and got == [["v2"]] * 20
        assert blocked and done.wait(10)
    finally:
        for s in (watched, other, plain):
            s.close()
