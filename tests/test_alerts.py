"""packaging/prometheus/alerts.yml and packaging/grafana/balancer.json against the real thing.

``promtool check rules`` passes. Then one real Prometheus (Debian package) scrapes real
``balancer serve`` daemons, each with one alert condition forced, and evaluates a copy of the
rules whose windows and ``for:`` durations are cut from minutes to seconds (nothing else is
changed, which the test checks):

- ``imbalanced``: the demo cluster, recommend-only (imbalance 0.27 > 0.2) and otherwise healthy;
- ``stuck``: the demo cluster with a one-hour interval (one cycle, then none);
- ``failing``: the demo cluster fully automated on a simulated backend where every migration
  fails;
- ``stale``: the demo inventory fed by push with no samples pushed (every VM stale);
- ``down``: a target where nothing listens;
- ``ha0``, ``ha1``: two daemons sharing one PostgreSQL store (target label ``cluster="ha"``,
  as docs/operations.md says to scrape one cluster's daemons); one leads until the test makes
  the store refuse connections, so that the leader cannot renew its lease and steps down and
  the follower cannot take it: both still serve /metrics, neither leads.

Each alert must fire for its daemon, and the healthy one must not fire the others; the leader
alert must not fire while the pair has a leader, and must clear once the store is back. Every
dashboard expression names only metrics a demo daemon's /metrics exports and evaluates on that
Prometheus without error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "packaging" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "packaging" / "grafana" / "balancer.json"
DEMO = ROOT / "balancer" / "data" / "demo-cluster.json"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
WINDOW = "30s"  # the rules' [15m] windows in the test copy
FOR = "3s"  # every `for:` in the test copy
HA_CLUSTER = "ha"  # the target label `cluster` of the two daemons that share a PostgreSQL store
HA_LEASE_S = 5.0  # a follower takes over this long after the leader stops renewing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_promtool_check_rules_passes() -> None:
    assert PROMTOOL is not None, "needs promtool: .ci/install.d/30-prometheus.sh (prometheus)"
    r = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    n = len(yaml.safe_load(RULES.read_text())["groups"][0]["rules"])
    assert f"SUCCESS: {n} rules found" in r.stdout


def test_promtool_unit_tests_pin_each_threshold() -> None:
    # packaging/prometheus/alerts_test.yml: series just under and over each threshold, each
    # alert's labels and rendered annotations, the leader alert for an HA job without a leader
    assert PROMTOOL is not None
    r = subprocess.run([PROMTOOL, "test", "rules", str(RULES.with_name("alerts_test.yml"))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def fast_rules() -> tuple[str, list[str]]:
    """The rules with [15m] windows -> WINDOW and every `for:` -> FOR; the alert names."""
    doc = yaml.safe_load(RULES.read_text())
    names = []
    for group in doc["groups"]:
        for rule in group["rules"]:
            names.append(rule["alert"])
            original = rule["expr"]
            rule["expr"] = original.replace("[15m]", f"[{WINDOW}]")
            # only the durations change: the rest of the expression is the shipped one
            assert re.sub(r"\[[^\]]+\]", "[]", rule["expr"]) == \
                re.sub(r"\[[^\]]+\]", "[]", original)
            if "for" in rule:
                rule["for"] = FOR
    return yaml.safe_dump(doc), names


# -- daemons --------------------------------------------------------------------------------
def daemon_config(kind: str, tmp: Path, store_url: str = "") -> str:
    base = f"""
[server]
host = "127.0.0.1"
port = 0
[cluster]
name = "{kind}"
inventory = "{DEMO}"
time_limit_s = 0.5
[store]
path = "{tmp / 'balancer.db'}"
"""
    if kind == "imbalanced":
        return base + '[loop]\ninterval_s = 2.0\nimbalance_cycles = 1\n' \
                      '[ingest]\nsource = "simulated"\nwindow_s = 60.0\nstale_after_s = 60.0\n' \
                      'retention_s = 120.0\nsimulated_period_s = 5.0\n'
    if kind == "stuck":
        return base + '[loop]\ninterval_s = 3600.0\n' \
                      '[ingest]\nsource = "simulated"\nwindow_s = 60.0\nstale_after_s = 60.0\n' \
                      'retention_s = 120.0\nsimulated_period_s = 5.0\n'
    if kind == "failing":
        cfg = base.replace('time_limit_s = 0.5', 'time_limit_s = 0.5\nautomation = "fully"')
        return cfg + '[loop]\ninterval_s = 2.0\nimbalance_cycles = 1\ncooldown_s = 0.0\n' \
                     '[ingest]\nsource = "simulated"\nwindow_s = 60.0\nstale_after_s = 60.0\n' \
                     'retention_s = 120.0\nsimulated_period_s = 5.0\n' \
                     '[executor.settings.simulated.faults]\nfailure_rate = 1.0\n'
    if kind == "stale":
        return base + '[loop]\ninterval_s = 2.0\n[ingest]\nsource = "push"\n'
    if kind.startswith("ha"):  # ha0, ha1: one PostgreSQL store, a short lease
        sqlite = f'path = "{tmp / "balancer.db"}"'
        return base.replace(sqlite, f'url = "{store_url}"\nlease_s = {HA_LEASE_S}\n'
                                    f'node = "{kind}"').replace(f'name = "{kind}"',
                                                                'name = "ha"') \
            + '[loop]\ninterval_s = 2.0\n' \
              '[ingest]\nsource = "simulated"\nwindow_s = 60.0\nstale_after_s = 60.0\n' \
              'retention_s = 120.0\nsimulated_period_s = 5.0\n'
    raise ValueError(kind)


class Daemon:
    def __init__(self, kind: str, tmp: Path, store_url: str = "") -> None:
        self.kind = kind
        folder = tmp / kind
        folder.mkdir()
        cfg = folder / "balancer.toml"
        cfg.write_text(daemon_config(kind, folder, store_url))
        self.log_path = folder / "stderr.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115
        env = {k: v for k, v in os.environ.items()
               if k not in ("BALANCER_API_TOKEN", "NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY")}
        self.proc = subprocess.Popen([sys.executable, "-m", "balancer.cli", "serve", "--config",
                                      str(cfg)], stdout=subprocess.DEVNULL, stderr=self.log,
                                     env={**env, "PYTHONUNBUFFERED": "1"})
        self.address = ""

    def wait_listening(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            m = re.search(r"listening on http://(\S+)", self.log_path.read_text())
            if m:
                self.address = m.group(1)
                return
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            time.sleep(0.2)
        raise AssertionError(f"{self.kind}: not listening: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


KINDS = ("imbalanced", "stuck", "failing", "stale")


def set_connections(store_url: str, allow: bool) -> None:
    """Let the store's database accept connections again, or refuse them and end the open
    sessions: to the daemons the store is gone (the server itself, shared with other tests,
    keeps running)."""
    import psycopg

    from tests.pgutil import PG_ADMIN

    name = store_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(allow).lower()}')
        if not allow:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                         "datname = %s AND pid <> pg_backend_pid()", (name,))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Daemons of each kind, a dead target, two daemons on one PostgreSQL store (cluster
    ``ha``), and Prometheus scraping them with the fast rules."""
    from tests.pgutil import create_database, drop_database

    assert PROMETHEUS is not None, "needs the prometheus binary: .ci/install.d/30-prometheus.sh"
    tmp = tmp_path_factory.mktemp("alerts")
    store_url = create_database()
    daemons = [Daemon(k, tmp) for k in KINDS]
    ha = [Daemon(f"ha{i}", tmp, store_url) for i in range(2)]
    proc = None
    log = None
    try:
        deadline = time.monotonic() + 120
        for d in daemons + ha:
            d.wait_listening(deadline)
        dead = f"127.0.0.1:{free_port()}"
        rules, names = fast_rules()
        (tmp / "rules.yml").write_text(rules)
        targets = {d.kind: d.address for d in daemons} | {"down": dead}
        static = "\n".join(
            f'      - targets: ["{addr}"]\n        labels: {{kind: "{kind}"}}'
            for kind, addr in targets.items())
        static += "".join(
            f'\n      - targets: ["{d.address}"]\n        labels: {{kind: "{d.kind}", '
            f'cluster: "{HA_CLUSTER}"}}' for d in ha)
        (tmp / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{tmp / 'rules.yml'}"]
scrape_configs:
  - job_name: balancer
    static_configs:
{static}
""")
        port = free_port()
        log = open(tmp / "prometheus.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prometheus did not start"
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield {"url": url, "names": names, "daemons": {d.kind: d for d in daemons + ha},
               "started": time.monotonic(), "store_url": store_url}
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log is not None:
            log.close()
        for d in daemons + ha:
            d.stop()
        drop_database(store_url)


def firing(url: str) -> set[tuple[str, str]]:
    alerts = httpx.get(f"{url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    return {(a["labels"]["alertname"], a["labels"].get("kind", "")) for a in alerts
            if a["state"] == "firing"}


EXPECTED = {
    ("BalancerImbalanceHigh", "imbalanced"),
    ("BalancerNoCycleCompleted", "stuck"),
    ("BalancerMigrationsFailing", "failing"),
    ("BalancerStaleMetrics", "stale"),
    ("BalancerDown", "down"),
}
# The healthy daemon must not fire these (its imbalance is the condition forced on it).
NOT_ON_HEALTHY = {"BalancerNoCycleCompleted", "BalancerMigrationsFailing",
                  "BalancerStaleMetrics", "BalancerDown"}


LEADER_RULE = "BalancerLeaderMissing"  # fired by test_leader_missing_fires_when_...


def test_every_alert_fires_where_its_condition_is_forced(cluster: dict[str, Any]) -> None:
    url = cluster["url"]
    tested = {name for name, _ in EXPECTED} | {LEADER_RULE}
    assert set(cluster["names"]) == tested, "an alert without a live test"
    deadline = time.monotonic() + 150
    seen: set[tuple[str, str]] = set()
    # what fires on the healthy daemon once its first cycle is in (before it, a slow first
    # cycle on a loaded machine is longer than the test copy's 30 s window and 3 s `for:`)
    healthy: set[tuple[str, str]] = set()
    first = 'balancer_cycles_total{kind="imbalanced", result="ok"} > 0'
    since: float | None = None  # when Prometheus first had that cycle
    while time.monotonic() < deadline and not EXPECTED <= seen:
        now = firing(url)
        seen |= now
        if since is None and query(url, first):
            since = time.monotonic()
        if since is not None and time.monotonic() - since > 3:  # a few rule evaluations
            healthy |= {(n, k) for n, k in now if k == "imbalanced"}
        time.sleep(1)
    assert EXPECTED <= seen, f"not fired: {sorted(EXPECTED - seen)}; fired: {sorted(seen)}"
    assert query(url, first), "the healthy daemon completed no cycle"
    wrong = {(n, k) for n, k in healthy if n in NOT_ON_HEALTHY}
    assert not wrong, wrong


def query(url: str, promql: str) -> dict[str, float]:
    """instance (or cluster) -> value of an instant query."""
    body = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert body["status"] == "success", body
    return {r["metric"].get("instance", r["metric"].get("cluster", "")): float(r["value"][1])
            for r in body["data"]["result"]}


def leader_alert(url: str) -> dict[str, Any] | None:
    """The BalancerLeaderMissing alert of the HA cluster (pending or firing), if any."""
    alerts = httpx.get(f"{url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    mine = [a for a in alerts if a["labels"]["alertname"] == LEADER_RULE
            and a["labels"].get("cluster") == HA_CLUSTER]
    assert len(mine) <= 1, mine
    return mine[0] if mine else None


def test_leader_missing_fires_when_no_daemon_can_lead(cluster: dict[str, Any]) -> None:
    """Two daemons on one PostgreSQL store; the store refuses connections, so the leader cannot
    renew its lease and steps down, and the follower cannot take it over: both are up and
    scraped, neither leads, the alert fires; once the store is back one leads and it clears."""
    url, store_url = cluster["url"], cluster["store_url"]
    ha = [cluster["daemons"][f"ha{i}"] for i in range(2)]
    leads = f'max by (job, cluster) (balancer_leader{{cluster="{HA_CLUSTER}"}})'
    up = f'up{{cluster="{HA_CLUSTER}"}}'
    deadline = time.monotonic() + 90
    while query(url, leads) != {HA_CLUSTER: 1.0} or sorted(query(url, up).values()) != [1.0, 1.0]:
        assert time.monotonic() < deadline, (query(url, leads), query(url, up))
        time.sleep(0.5)
    roles = [httpx.get(f"http://{d.address}/v1/leader", timeout=5).json()["role"] for d in ha]
    assert sorted(roles) == ["follower", "leader"], roles
    follower = ha[roles.index("follower")].kind
    # a pair with a leader: the alert stays quiet for longer than its `for:`, and the follower
    # (which runs no cycles, by design) does not count as a daemon whose cycles stopped
    quiet_until = time.monotonic() + 8
    while time.monotonic() < quiet_until:
        assert leader_alert(url) is None, leader_alert(url)
        assert ("BalancerNoCycleCompleted", follower) not in firing(url)
        time.sleep(0.5)
    set_connections(store_url, allow=False)
    try:
        deadline = time.monotonic() + 90
        while (alert := leader_alert(url)) is None or alert["state"] != "firing":
            assert time.monotonic() < deadline, f"{LEADER_RULE} did not fire: {alert}"
            time.sleep(0.5)
        assert alert["labels"]["severity"] == "critical"
        assert alert["annotations"]["summary"] == \
            f"no balancer daemon of balancer (cluster {HA_CLUSTER}) is leading"
        # the daemons are there and answer: what is missing is a leader, not the daemons
        assert sorted(query(url, up).values()) == [1.0, 1.0]
        assert all(d.proc.poll() is None for d in ha)
        for d in ha:
            text = httpx.get(f"http://{d.address}/metrics", timeout=10).text
            assert re.search(r"^balancer_leader 0\.0$", text, re.M), d.kind
            assert httpx.get(f"http://{d.address}/v1/leader", timeout=10).json()["role"] == \
                "follower"
    finally:
        set_connections(store_url, allow=True)
    # the store is back: one of them takes the lease and the alert clears
    deadline = time.monotonic() + 90
    while leader_alert(url) is not None or query(url, leads) != {HA_CLUSTER: 1.0}:
        assert time.monotonic() < deadline, (leader_alert(url), query(url, leads))
        time.sleep(0.5)


# -- the Grafana dashboard ------------------------------------------------------------------
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
            "or", "unless", "offset", "inf", "nan"}


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    for var in doc.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q)
            exprs.append(m.group(1) if m else q)
    return exprs


def concrete(expr: str) -> str:
    """The expression as Grafana sends it: variables replaced."""
    return (expr.replace("$__rate_interval", "30s").replace("$__interval", "5s")
            .replace("$instance", ".*").replace("${instance:regex}", ".*"))


def metric_names(expr: str) -> set[str]:
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', concrete(expr))
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        rest = e[m.end():].lstrip()
        if m.group(0) in KEYWORDS or rest.startswith("("):
            continue
        names.add(m.group(0))
    return names


def test_dashboard_has_the_panels_operators_need() -> None:
    doc = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in doc["panels"])
    for word in ("imbalance", "recommendations", "migrations", "cycle duration",
                 "ingestion", "heat map"):
        assert word in titles, word
    assert any(p["type"] == "heatmap" for p in doc["panels"])
    assert len(dashboard_exprs()) >= 8


def test_dashboard_expressions_use_exported_metrics_and_evaluate(
        cluster: dict[str, Any]) -> None:
    url = cluster["url"]
    daemon = cluster["daemons"]["failing"]  # exports every family, migrations included
    exported = set()
    for line in httpx.get(f"http://{daemon.address}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            exported.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))  # type: ignore[union-attr]
    for expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, f"{expr}: not exported: {sorted(names - exported)}"
    # give Prometheus a few scrapes and cycles, then every expression evaluates with data
    time.sleep(max(0.0, cluster["started"] + 20 - time.monotonic()))
    for expr in dashboard_exprs():
        r = httpx.get(f"{url}/api/v1/query", params={"query": concrete(expr)}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        assert body["data"]["result"], f"no data for {expr}"
