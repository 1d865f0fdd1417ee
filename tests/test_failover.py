"""Several real daemons on one real PostgreSQL store: exactly one leads; followers serve reads
and answer mutations with 409 naming the leader; kill -9 of the leader mid-wave hands over
within 15 s with nothing lost, started twice or stuck; a leader frozen past its lease starts
nothing once resumed. The full 20-kill run is ``bench/failover.py``."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.failover_harness import AUTH, Cluster, kill_run
from tests.pgutil import pg_url  # noqa: F401

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str):  # noqa: F811
    c = Cluster(tmp_path, pg_url)
    try:
        yield c
    finally:
        c.stop_all()


def test_three_daemons_one_leader_followers_read_and_refuse_writes(cluster: Cluster) -> None:
    for _ in range(3):
        cluster.start()
    leader, _ = cluster.leader()
    time.sleep(3)  # a few beats: still exactly one, and everybody agrees on who
    roles = cluster.roles()
    assert [n for n, r in roles.items() if r["role"] == "leader"] == [leader]
    term = roles[leader]["term"]
    assert all(r["term"] == term and r["leader"]["id"] == roles[leader]["id"]
               for r in roles.values())
    assert roles[leader]["leader"]["address"] == cluster.addr[leader]
    followers = [n for n in roles if n != leader]
    metrics = httpx.get(f"{cluster.addr[leader]}/metrics").text
    assert "balancer_leader 1.0" in metrics
    assert "balancer_leader 0.0" in httpx.get(f"{cluster.addr[followers[0]]}/metrics").text
    # the leader evacuates a host (fully automated: inside the request)
    r = httpx.post(f"{cluster.addr[leader]}/v1/hosts/h1/maintenance/enter", headers=AUTH,
                   timeout=300)
    assert r.status_code == 200 and r.json()["executed"], r.text
    # reads on a follower: what the leader stored
    f = cluster.addr[followers[0]]
    assert httpx.get(f"{f}/v1/history").json() == \
        httpx.get(f"{cluster.addr[leader]}/v1/history").json()
    assert httpx.get(f"{f}/v1/history").status_code == 200
    assert httpx.get(f"{f}/v1/cluster").status_code == 200
    assert httpx.get(f"{f}/v1/recommendations?state=all").json() == \
        httpx.get(f"{cluster.addr[leader]}/v1/recommendations?state=all").json()
    # mutations on a follower: 409 naming the leader
    r = httpx.post(f"{f}/v1/hosts/h1/maintenance/exit", headers=AUTH)
    assert r.status_code == 409
    msg = r.json()["detail"][0]["msg"]
    assert roles[leader]["id"] in msg and cluster.addr[leader] in msg


def test_kill_9_of_the_leader_mid_wave_fails_over(cluster: Cluster) -> None:
    """Four kill points (0.5 to 3 s into an evacuation wave); bench/failover.py runs 20."""
    seen = []
    failovers = kill_run(cluster, [0.5, 1.2, 2.0, 3.0], daemons=2,
                         report=lambda k, d, took, inv: seen.append(inv))
    assert len(seen) == 4 and max(failovers) <= 15.0, failovers
    assert seen[-1]["starts"] > 0


def test_a_leader_frozen_past_its_lease_starts_nothing_after_resuming(
        cluster: Cluster) -> None:
    a = cluster.start()
    leader, _ = cluster.leader()
    assert leader == a
    b = cluster.start()
    from tests.failover_harness import evacuate

    evacuate(cluster, leader, "h0")
    time.sleep(1.0)  # mid-wave
    cluster.kill(leader, signal.SIGSTOP)
    t_stop = time.time()
    new, _ = cluster.leader(timeout=60)
    assert new == b
    new_term = cluster.roles()[b]["term"]
    time.sleep(1.0)
    t_cont = time.time()
    cluster.kill(leader, signal.SIGCONT)
    time.sleep(cluster.lease_s * 2)  # the old leader runs again for a while
    roles = cluster.roles()
    assert roles[leader]["role"] == "follower" and roles[b]["role"] == "leader"
    cluster.settled()
    starts = cluster.backend()["starts"]
    late = [s for s in starts if s[4] >= t_cont and (s[5] or 0) < new_term]
    assert late == [], f"the resumed old leader started {late}"
    assert all((s[5] or 0) >= new_term for s in starts if s[4] > t_stop + 0.5)
    cluster.check_invariants()
