"""Real ``balancer serve`` daemons on one PostgreSQL store and one shared simulated backend
(a SQLite state file every daemon reads and writes in turn), fully automated: what the
failover tests and ``bench/failover.py`` run."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "failover-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def cluster_doc(n_hosts: int = 5, per_host: int = 4) -> dict[str, Any]:
    hosts = [{"name": f"h{i}", "cpu_capacity": 16, "mem_capacity_mb": 65536, "state": "active"}
             for i in range(n_hosts)]
    vms = []
    for i in range(n_hosts):
        for j in range(per_host):
            vms.append({"name": f"vm-{i}-{j}", "host": f"h{i}", "vcpus": 4,
                        "mem_mb": 4096 + 1024 * (j % 3), "cpu_demand": 1.0 + 0.5 * (j % 2),
                        "mem_demand_mb": 2048})
    return {"version": 1, "hosts": hosts, "vms": vms, "rules": []}


@dataclass
class Cluster:
    tmp: Path
    url: str
    lease_s: float = 3.0
    time_scale: float = 0.05
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    addr: dict[str, str] = field(default_factory=dict)
    n: int = 0

    def __post_init__(self) -> None:
        self.inventory = self.tmp / "inventory.json"
        self.inventory.write_text(json.dumps(cluster_doc()))
        self.state = self.tmp / "cluster.sqlite"
        self.config = self.tmp / "svc.toml"
        self.config.write_text(f"""
[server]
api_token = "{TOKEN}"
port = 0
[loop]
interval_s = 1.0
imbalance_cycles = 1
cooldown_s = 3600
[cluster]
automation = "fully"
inventory = "{self.inventory}"
time_limit_s = 1.0
seed = 1
[ingest]
source = "simulated"
simulated_period_s = 5.0
[store]
url = "{self.url}"
lease_s = {self.lease_s}
[executor.settings.limits]
max_outgoing_per_host = 2
[executor.settings.migration]
bandwidth_mbps = 1000.0
timeout_min_s = 600
[executor.settings.simulated]
time_scale = {self.time_scale}
state_path = "{self.state}"
""")

    def start(self) -> str:
        name = f"d{self.n}"
        self.n += 1
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "balancer.cli", "serve", "--config", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT, env=env)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = re.search(r"listening on (http://\S+)", self.log(name))
            if m:
                self.addr[name] = m.group(1)
                return name
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited: {self.log(name)[-2000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{name} did not start")

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def alive(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def roles(self) -> dict[str, dict[str, Any]]:
        out = {}
        for n in self.alive():
            try:
                out[n] = httpx.get(f"{self.addr[n]}/v1/leader", timeout=5).json()
            except httpx.HTTPError:
                pass
        return out

    def leader(self, timeout: float = 30.0) -> tuple[str, float]:
        """The one node that says it leads (and how long it took to find it)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            leaders = [n for n, r in self.roles().items() if r["role"] == "leader"]
            assert len(leaders) <= 1, f"two leaders at once: {leaders}"
            if leaders:
                return leaders[0], time.monotonic() - t0
            time.sleep(0.1)
        raise AssertionError("no leader elected")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.procs[name].send_signal(sig)
        if sig == signal.SIGKILL:
            self.procs[name].wait(timeout=30)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # -- what the shared backend and the store say ----------------------------------------
    def backend(self) -> dict[str, Any]:
        db = sqlite3.connect(self.state, timeout=30)
        try:
            return {
                "vms": dict(db.execute("SELECT name, host FROM vms")),
                "hosts": {h for (h,) in db.execute("SELECT name FROM hosts")},
                "active": db.execute("SELECT count(*) FROM migrations WHERE status='active'"
                                     ).fetchone()[0],
                "starts": db.execute("SELECT token, vm, source, target, wall, fence FROM starts "
                                     "ORDER BY seq").fetchall(),
            }
        finally:
            db.close()

    def store(self, sql: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(sql).fetchall()

    def settled(self, timeout: float = 120.0) -> None:
        """Nothing in flight, nothing unfinished in the journal, nothing stuck applying."""
        t0 = time.monotonic()
        last: Any = None
        while time.monotonic() - t0 < timeout:
            b = self.backend()
            j = self.store("SELECT count(*) FROM exec_migrations WHERE state IN "
                           "('planned','running')")[0][0]
            a = self.store("SELECT count(*) FROM recommendations WHERE state='applying'")[0][0]
            s = self.store("SELECT count(*) FROM migrations WHERE state='started'")[0][0]
            last = (b["active"], j, a, s)
            if last == (0, 0, 0, 0):
                return
            time.sleep(0.3)
        raise AssertionError(f"not settled (active, journal open, applying, started): {last}")

    def check_invariants(self) -> dict[str, int]:
        """0 lost, 0 started twice, every VM on exactly one host, journal = backend.

        The leader keeps cycling (fully automated), so a check can land while a new migration
        is being started: it is taken again on a settled cluster; a real violation (a second
        start, a lost VM, a stuck recommendation) persists and fails all 20 tries.
        """
        last: AssertionError | None = None
        for _ in range(20):
            self.settled()
            try:
                return self._check()
            except AssertionError as exc:
                last = exc
                time.sleep(1.0)
        assert last is not None
        raise last

    def _check(self) -> dict[str, int]:
        b = self.backend()
        doc = json.loads(self.inventory.read_text())
        assert sorted(b["vms"]) == sorted(v["name"] for v in doc["vms"])  # none lost
        assert set(b["vms"].values()) <= b["hosts"]  # each on one known host (a PK per VM)
        assert b["active"] == 0
        rows = self.store("SELECT plan_id, id, vm, source, target, state, attempts FROM "
                          "exec_migrations")
        assert all(r[5] in ("succeeded", "failed", "skipped", "cancelled") for r in rows), rows
        attempts = sum(r[6] for r in rows)
        assert max((r[6] for r in rows), default=0) <= 1, "a migration was started twice"
        assert len(b["starts"]) == attempts, (len(b["starts"]), attempts)
        per_move = Counter((vm, s, t) for _, vm, s, t, _, _ in b["starts"])
        done = Counter((r[2], r[3], r[4]) for r in rows if r[6] >= 1)
        assert per_move == done, "backend starts and journal attempts disagree"
        stuck = self.store("SELECT count(*) FROM recommendations WHERE state='applying'")
        assert stuck[0][0] == 0
        return {"starts": len(b["starts"]), "journal_entries": len(rows),
                "attempts": attempts}


def evacuate(cluster: Cluster, leader: str, host: str, enter: bool = True) -> None:
    """Enter/exit maintenance through the leader's API (fire and forget: the evacuation runs
    inside the request when fully automated, and the leader may be killed meanwhile)."""
    import threading

    def call() -> None:
        try:
            httpx.post(f"{cluster.addr[leader]}/v1/hosts/{host}/maintenance/"
                       f"{'enter' if enter else 'exit'}", headers=AUTH, timeout=300)
        except httpx.HTTPError:
            pass

    threading.Thread(target=call, daemon=True).start()


def kill_run(cluster: Cluster, delays: list[float], *, daemons: int = 2,
             report: Any = None) -> list[float]:
    """Kill -9 the leader ``len(delays)`` times, each ``delay`` s into an evacuation wave;
    restart a daemon after each kill. Returns the failover times."""
    for _ in range(daemons):
        cluster.start()
    failovers = []
    hosts = [f"h{i}" for i in range(5)]
    for k, delay in enumerate(delays):
        leader, _ = cluster.leader()
        host = hosts[k % len(hosts)]
        evacuate(cluster, leader, host)
        time.sleep(delay)
        t_kill = time.monotonic()
        cluster.kill(leader)
        new, _ = cluster.leader(timeout=60)
        took = time.monotonic() - t_kill
        failovers.append(took)
        assert new != leader
        cluster.start()  # keep the number of daemons
        cluster.settled()
        # The kill may have come before the host entered maintenance (the request waits for
        # a cycle in progress): ask the new leader again (a no-op if it is in maintenance).
        r = httpx.post(f"{cluster.addr[new]}/v1/hosts/{host}/maintenance/enter", headers=AUTH,
                       timeout=300)
        assert r.status_code == 200, r.text
        # the new leader finishes the evacuation, then the host comes back
        t0 = time.monotonic()
        while any(h == host for h in cluster.backend()["vms"].values()):
            assert time.monotonic() - t0 < 120, f"{host} never emptied"
            time.sleep(0.3)
        lead, _ = cluster.leader()
        r = httpx.post(f"{cluster.addr[lead]}/v1/hosts/{host}/maintenance/exit", headers=AUTH,
                       timeout=300)
        assert r.status_code == 200, r.text
        cluster.settled()
        if report is not None:
            report(k, delay, took, cluster.check_invariants())
    return failovers
