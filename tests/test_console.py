"""The web console in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

A real ``balancer serve`` process runs the demo cluster (bundled inventory, simulated metrics and
a simulated backend slowed down so migrations take seconds) with ``BALANCER_API_TOKEN`` set.
The browser loads ``/ui/``, finds every host and every open recommendation, is refused without
the token, applies a move with it and watches the move go through "in flight" into the
history; a page opened with every outside host blocked renders fully.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright import sync_api as playwright_api

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "console-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PAGES = ("/ui/", "/ui/recommendations", "/ui/migrations", "/ui/whatif", "/ui/automation",
         "/ui/hosts/host-003")

if not Path(CHROMIUM).exists():  # .ci/install.d/40-chromium.sh installs it
    pytest.fail(f"{CHROMIUM} is missing: run bash .ci/install.d/40-chromium.sh",
                pytrace=False)


# -- the service -------------------------------------------------------------------------------
class Serve:
    """``balancer serve --config FILE --port 0`` in a subprocess; stderr drained on a thread."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "balancer.cli", "serve", "--config", str(config),
             "--port", "0"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            env={**os.environ, **env})
        self.lines: list[str] = []
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, name="serve-stderr", daemon=True)
        self._reader.start()
        if not self._listening.wait(60):
            self.stop()
            raise AssertionError("serve did not start:\n" + "".join(self.lines))
        m = re.search(r"listening on (http://\S+)", "".join(self.lines))
        assert m, self.lines
        self.url = m.group(1)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "listening on" in line:
                self._listening.set()
        self._listening.set()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode


def demo_config(tmp: Path, *, time_scale: float = 0.1, extra: str = "") -> Path:
    """The demo (configs/demo.toml) with a slowed simulated backend: migrations take seconds."""
    inventory = ROOT / "balancer/data/demo-cluster.json"
    path = tmp / "console.toml"
    path.write_text(f"""
[server]
host = "127.0.0.1"
[loop]
interval_s = 3600
imbalance_cycles = 1
cooldown_s = 600
[cluster]
name = "demo"
automation = "manual"
inventory = "{inventory}"
threshold = 3
time_limit_s = 2
seed = 0
[ingest]
source = "simulated"
window_s = 300
stale_after_s = 120
retention_s = 900
simulated_period_s = 10
[executor]
backend = "simulated"
[executor.settings.simulated]
time_scale = {time_scale}
[executor.settings.migration]
poll_interval_s = 1.0
[store]
path = "{tmp / 'state.db'}"
{extra}
""")
    return path


def wait_ready(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the first control cycle did not finish"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("console")
    serve = Serve(demo_config(tmp), {"BALANCER_API_TOKEN": TOKEN})
    try:
        wait_ready(serve.url)
        yield serve.url
    finally:
        assert serve.stop() == 0, "".join(serve.lines[-20:])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(20_000)
    try:
        yield ctx
    finally:
        ctx.close()


def open_page(context: Any, url: str) -> tuple[Any, list[str]]:
    """A page at ``url`` once its script ran; JS errors are collected into the list."""
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}")
            if m.type == "error" else None)
    page.goto(url)
    page.wait_for_selector("html[data-ready='1']", state="attached")
    return page, errors


def sign_in(page: Any, token: str) -> None:
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()


# -- the tests -----------------------------------------------------------------------------------
def test_cluster_page_shows_every_host_by_state_with_imbalance(demo: str, context: Any) -> None:
    state = httpx.get(f"{demo}/v1/cluster").json()
    page, errors = open_page(context, f"{demo}/ui/")
    tiles = page.locator("a.tile[data-host]")
    shown = set(tiles.evaluate_all("els => els.map(e => e.dataset.host)"))
    assert shown == {h["name"] for h in state["hosts"]}
    for h in state["hosts"]:  # grouped by state
        group = page.locator(f"ul.tiles[data-state='{h['state']}']")
        assert group.locator(f"a[data-host='{h['name']}']").count() == 1
    assert page.locator("ul.tiles[data-state='maintenance'] a").count() == sum(
        h["state"] == "maintenance" for h in state["hosts"]) >= 1
    imb = float(page.locator("#imbalance").inner_text())
    assert imb == pytest.approx(state["imbalance"]["imbalance"], abs=0.02)
    assert page.locator("#threshold").inner_text() == "3 of 5"
    # Each tile says its utilisation in words (title) and colours by band.
    hot = max(state["hosts"], key=lambda h: max(h["cpu_util"], h["mem_util"]))
    tile = page.locator(f"a.tile[data-host='{hot['name']}']")
    assert f"CPU {100 * hot['cpu_util']:.0f}% demand" in tile.get_attribute("title")
    assert "hot" in tile.get_attribute("class") or "warm" in tile.get_attribute("class")
    # A host opens to its VMs.
    tile.click()
    page.wait_for_url(f"**/ui/hosts/{hot['name']}")
    vms = {v["name"] for v in state["vms"] if v["host"] == hot["name"]}
    rows = page.locator("#host-vms tbody tr[data-vm]")
    assert set(rows.evaluate_all("els => els.map(e => e.dataset.vm)")) == vms
    assert errors == []


def test_recommendations_page_lists_every_open_recommendation(demo: str, context: Any) -> None:
    page, errors = open_page(context, f"{demo}/ui/recommendations")
    recs = httpx.get(f"{demo}/v1/recommendations").json()
    assert recs, "the demo should have open recommendations after its first cycle"
    rows = page.locator("section.wave tr[data-rec]")
    shown = rows.evaluate_all("els => els.map(e => Number(e.dataset.rec))")
    assert sorted(shown) == sorted(r["id"] for r in recs)
    r0 = recs[0]
    row = page.locator(f"section.wave tr[data-rec='{r0['id']}']")
    cells = row.locator("td").all_inner_texts()
    assert cells[0] == r0["vm"] and cells[2] == r0["source"] and cells[3] == r0["target"]
    assert cells[4] == r0["reason"]
    assert float(cells[5]) == pytest.approx(r0["gain"], abs=1e-4)
    assert cells[6] == f"{r0['mem_mb'] / 1024:.1f} GiB"
    assert page.locator("#rec-count .count").inner_text() == str(len(recs))
    # every recommendation sits in exactly one wave, each wave has its apply-all button
    waves = page.locator("section.wave")
    ids = []
    for i in range(waves.count()):
        button = waves.nth(i).locator("button.apply-wave")
        ids += [int(x) for x in button.get_attribute("data-ids").split(",")]
    assert sorted(ids) == sorted(r["id"] for r in recs)
    assert errors == []


def test_apply_is_refused_without_the_token_then_moves_through_flight_to_history(
        demo: str, context: Any) -> None:
    recs = httpx.get(f"{demo}/v1/recommendations").json()
    # The biggest move: at the test's time scale it stays in flight for a few seconds.
    rec = max(recs, key=lambda r: (r["mem_mb"], -r["id"]))
    page, errors = open_page(context, f"{demo}/ui/recommendations")
    watcher, watch_errors = open_page(context, f"{demo}/ui/migrations")
    apply = page.get_by_role("button", name=f"Apply: move {rec['vm']} to {rec['target']}")

    # Without the token: refused, and nothing changed.
    apply.click()
    page.get_by_role("status").filter(has_text="Refused").wait_for()
    assert "401" in page.get_by_role("status").inner_text()
    assert httpx.get(f"{demo}/v1/recommendations/{rec['id']}").json()["state"] == "pending"
    # A wrong token does not sign in.
    sign_in(page, "not-the-token")
    page.get_by_role("status").filter(has_text="Refused: sign-in").wait_for()
    assert page.locator("#who").inner_text() == "read-only"
    assert page.evaluate("sessionStorage.getItem('balancer.token')") is None

    # With the token (kept in sessionStorage only; no cookie at all).
    sign_in(page, TOKEN)
    page.locator("#who", has_text="signed in").wait_for()
    assert page.evaluate("sessionStorage.getItem('balancer.token')") == TOKEN
    assert context.cookies() == []
    apply.click()
    # The other page watches it: in flight with progress, then in the history.
    flight = watcher.locator(f"#inflight tbody tr[data-vm='{rec['vm']}']")
    flight.wait_for(timeout=20_000)
    assert rec["source"] in flight.inner_text() and rec["target"] in flight.inner_text()
    # live progress: MiB moved of the total and the transfer rate, pushed by the server
    moving = flight.filter(has_text=re.compile(r"\d+ / \d+ MiB"))
    moving.wait_for(timeout=20_000)
    assert re.search(r"\d+ Mbit/s", moving.inner_text())
    done = watcher.locator(f"#history tr[data-vm='{rec['vm']}'][data-state='completed']")
    done.wait_for(timeout=60_000)
    page.get_by_role("status").filter(has_text=f"{rec['vm']} moved to {rec['target']}").wait_for(
        timeout=60_000)
    assert httpx.get(f"{demo}/v1/recommendations/{rec['id']}").json()["state"] == "applied"
    hist = httpx.get(f"{demo}/v1/history", params={"vm": rec["vm"]}).json()
    assert hist[0]["state"] == "completed" and hist[0]["rec_id"] == rec["id"]
    # The applied move leaves the open list without a reload.
    page.locator(f"section.wave tr[data-rec='{rec['id']}']").wait_for(state="detached")
    # the browser logs the two refusals (apply, sign-in) and nothing else
    assert len(errors) == 2 and all("status of 401" in e for e in errors), errors
    assert watch_errors == []


def test_dismiss_with_the_token_and_pages_follow_changes_made_elsewhere(
        demo: str, context: Any) -> None:
    page, errors = open_page(context, f"{demo}/ui/recommendations")
    recs = httpx.get(f"{demo}/v1/recommendations").json()
    assert len(recs) >= 2
    sign_in(page, TOKEN)
    page.locator("#who", has_text="signed in").wait_for()
    first, second = recs[0], recs[1]
    page.get_by_role("button", name=f"Dismiss the move of {first['vm']}").click()
    page.locator(f"section.wave tr[data-rec='{first['id']}']").wait_for(state="detached")
    assert httpx.get(f"{demo}/v1/recommendations/{first['id']}").json()["state"] == "dismissed"
    # A change made by someone else (the API) shows up without a reload.
    t0 = time.monotonic()
    r = httpx.post(f"{demo}/v1/recommendations/{second['id']}/dismiss", headers=AUTH)
    assert r.status_code == 200
    page.locator(f"section.wave tr[data-rec='{second['id']}']").wait_for(state="detached",
                                                                         timeout=10_000)
    assert time.monotonic() - t0 < 10
    assert page.locator(f"#recent tr[data-rec='{second['id']}'] td.st").inner_text() \
        == "dismissed"
    assert errors == []


def test_pages_render_fully_with_no_outside_host_reachable(demo: str, browser: Any) -> None:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, offline=False)
    outside: list[str] = []
    failed: list[str] = []

    def route(r: Any) -> None:
        host = re.match(r"^[a-z]+://([^/:]+)", r.request.url)
        if r.request.url.startswith("data:") or (host and host.group(1) == "127.0.0.1"):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort("internetdisconnected")

    ctx.route("**/*", route)
    try:
        for path in PAGES:
            page, errors = open_page(ctx, f"{demo}{path}")
            page_failed = lambda req: failed.append(f"{req.url} {req.failure}")  # noqa: E731
            page.on("requestfailed", page_failed)
            page.wait_for_load_state("networkidle")
            # The stylesheet applied (header colour), the script ran, content is there.
            bg = page.evaluate("getComputedStyle(document.querySelector('header.top'))"
                               ".backgroundColor")
            assert bg == "rgb(20, 50, 90)", path
            assert page.locator("main h1").count() == 1
            assert page.locator("nav a[aria-current='page']").count() == 1
            if path == "/ui/":
                assert page.locator("a.tile").count() == 16
            assert errors == [], (path, errors)
            assert failed == [], (path, failed)  # (closing the page aborts its live fetches)
            page.remove_listener("requestfailed", page_failed)
            page.close()
    finally:
        ctx.close()
    assert outside == [] and failed == []
    # Nothing served points outside: no absolute URL in a template, the script or stylesheet.
    files = [*(ROOT / "balancer/console/templates").glob("*.html"),
             *(ROOT / "balancer/console/static").glob("*")]
    for f in files:
        assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", f.read_text()), f


def test_root_redirects_to_the_console(demo: str) -> None:
    r = httpx.get(f"{demo}/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    assert httpx.get(f"{demo}/ui/hosts/no-such-host").status_code == 404
    assert "set-cookie" not in httpx.get(f"{demo}/ui/").headers


def test_whatif_shows_the_plan_for_the_chosen_threshold_and_budget(demo: str,
                                                                   context: Any) -> None:
    page, errors = open_page(context, f"{demo}/ui/whatif")
    # what-if is computation: refused without the token
    page.get_by_role("button", name="Show the plan").click()
    page.get_by_role("status").filter(has_text="Refused: what-if").wait_for()
    errors.clear()  # (the browser logs the 401)
    sign_in(page, TOKEN)
    page.locator("#who", has_text="signed in").wait_for()
    pending = httpx.get(f"{demo}/v1/recommendations").json()
    inv = httpx.get(f"{demo}/v1/cluster").json()
    in_maintenance = {h["name"] for h in inv["hosts"] if h["state"] == "maintenance"}
    evacuees = {v["name"] for v in inv["vms"] if v["host"] in in_maintenance}
    page.get_by_label("Migration threshold").select_option("1")
    page.get_by_label("Migration budget").fill("")
    page.get_by_role("button", name="Show the plan").click()
    page.get_by_role("status").filter(has_text="Plan ready").wait_for(timeout=60_000)
    rows = page.locator("#wi-moves tbody tr[data-vm]")
    # threshold 1: only mandatory moves: the host in maintenance is evacuated, no balancing
    assert evacuees <= set(rows.evaluate_all("els => els.map(e => e.dataset.vm)"))
    reasons = page.locator("#wi-moves tbody tr td:nth-child(4)").all_inner_texts()
    assert reasons and not [t for t in reasons if t.startswith("balance")], reasons
    # the engine gives no balance/migration-cost curve today: the page says so, no slider
    assert page.locator("#wi-frontier").is_hidden()
    assert page.locator("#wi-nofrontier").is_visible()
    page.get_by_label("Migration threshold").select_option("5")
    page.get_by_label("Migration budget").fill(str(len(evacuees) + 2))
    page.get_by_role("button", name="Show the plan").click()
    page.get_by_role("status").filter(has_text=f"Plan ready: {len(evacuees) + 2} moves")\
        .or_(page.get_by_role("status").filter(has_text="Plan ready")).wait_for(timeout=60_000)
    assert 0 < rows.count() <= len(evacuees) + 2
    summary = page.locator("#wi-summary").inner_text()
    assert "Imbalance before" in summary and "Imbalance after" in summary
    # nothing changed
    assert httpx.get(f"{demo}/v1/recommendations").json() == pending
    assert errors == []


def test_whatif_slider_walks_the_frontier_when_the_engine_gives_one(demo: str,
                                                                    context: Any) -> None:
    """The engine may add ``frontier`` to a plan; the page then offers a slider along it."""
    page, errors = open_page(context, f"{demo}/ui/whatif")
    asked: list[dict[str, Any]] = []

    def fake(route: Any) -> None:
        body = route.request.post_data_json
        asked.append(body)
        k = body.get("max_migrations")
        frontier = [{"migrations": m, "imbalance": round(0.44 - 0.03 * m, 4),
                     "moved_mem_mb": 16384 * m} for m in range(0, 11)]
        route.fulfill(json={
            "migrations": [{"vm": f"vm-{i:05d}", "from": "host-002", "to": "host-014",
                            "reason": "balance: test", "mem_mb": 16384, "gain": 0.03}
                           for i in range(10 if k is None else k)],
            "efficacy": {"before": {"imbalance": 0.44}, "after": {"imbalance": 0.14},
                         "migrations": 10 if k is None else k, "moved_mem_mb": 163840},
            "solver": {"status": "FEASIBLE", "seconds": 0.5}, "frontier": frontier})

    page.route("**/v1/whatif/current", fake)
    page.get_by_role("button", name="Show the plan").click()
    slider = page.get_by_label(re.compile("Balance against migrations"))
    slider.wait_for()
    assert page.locator("#wi-nofrontier").is_hidden()
    assert slider.get_attribute("max") == "10"
    slider.focus()
    for _ in range(7):  # keyboard: from 10 migrations down to 3
        page.keyboard.press("ArrowLeft")
    assert page.locator("#wi-point").inner_text().startswith("3 migrations")
    page.get_by_role("button", name="Show the plan at this point").click()
    page.wait_for_function("document.querySelectorAll('#wi-moves tbody tr[data-vm]').length"
                           " === 3")
    assert asked[-1]["max_migrations"] == 3
    assert page.get_by_label("Migration budget").input_value() == "3"
    assert errors == []


def test_automation_overrides_and_maintenance_from_the_console(demo: str, context: Any) -> None:
    page, errors = open_page(context, f"{demo}/ui/automation")
    page.on("dialog", lambda d: d.accept())
    sign_in(page, TOKEN)
    page.locator("#who", has_text="signed in").wait_for()
    # cluster level and threshold
    page.get_by_label("Automation level").select_option("partially")
    page.locator("#cl-threshold").select_option("2")
    page.get_by_role("button", name="Save cluster settings").click()
    page.locator("#cur-level", has_text="partially").wait_for()
    got = httpx.get(f"{demo}/v1/automation").json()
    assert got["automation"] == "partially" and got["threshold"] == 2
    # a VM override, shown in the table and by the API, then removed
    vm = httpx.get(f"{demo}/v1/cluster").json()["vms"][0]["name"]
    page.get_by_label("VM", exact=True).fill(vm)
    page.get_by_label("Level", exact=True).select_option("disabled")
    page.get_by_role("button", name="Set override").click()
    page.locator(f"#overrides tr[data-vm='{vm}']").wait_for()
    assert httpx.get(f"{demo}/v1/automation").json()["vm_automation"] == {vm: "disabled"}
    page.get_by_role("button", name=f"Remove the override of {vm}").click()
    page.locator(f"#overrides tr[data-vm='{vm}']").wait_for(state="detached")
    assert httpx.get(f"{demo}/v1/automation").json()["vm_automation"] == {}
    # an unknown VM is refused with the reason
    page.get_by_label("VM", exact=True).fill("no-such-vm")
    page.get_by_role("button", name="Set override").click()
    page.get_by_role("status").filter(has_text="is not in the inventory").wait_for()
    # a host into maintenance and out again; the cluster page follows
    host = "host-015"
    cluster, cluster_errors = open_page(context, f"{demo}/ui/")
    page.get_by_role("button", name=f"Put {host} into maintenance").click()
    page.locator(f"#maint tr[data-host='{host}'] td.st", has_text="maintenance").wait_for(
        timeout=60_000)
    states = {h["name"]: h["state"] for h in httpx.get(f"{demo}/v1/cluster").json()["hosts"]}
    assert states[host] == "maintenance"
    cluster.locator(f"ul.tiles[data-state='maintenance'] a[data-host='{host}']").wait_for()
    page.get_by_role("button", name=f"Take {host} out of maintenance").click()
    page.locator(f"#maint tr[data-host='{host}'] td.st", has_text="active").wait_for(
        timeout=60_000)
    cluster.locator(f"ul.tiles[data-state='active'] a[data-host='{host}']").wait_for()
    # back to the demo's settings
    r = httpx.put(f"{demo}/v1/automation", json={"automation": "manual", "threshold": 3},
                  headers=AUTH)
    assert r.status_code == 200
    assert [e for e in errors if "status of 404" not in e] == [] and cluster_errors == []


def test_keyboard_reaches_every_control_and_they_are_labelled(demo: str, context: Any) -> None:
    for path in PAGES:
        page, _ = open_page(context, f"{demo}{path}")
        unlabelled = page.evaluate("""() => [...document.querySelectorAll(
            'input, select, button, a[href]')].filter(e => !e.hidden && e.offsetParent !== null)
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                    && !(e.textContent || '').trim() && !e.placeholder)
            .map(e => e.outerHTML.slice(0, 80))""")
        assert unlabelled == [], (path, unlabelled)
        # Tab walks the controls: the skip link first, then the navigation
        page.locator("body").focus()
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.className") == "skip"
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Cluster"
        page.close()


def test_a_standby_is_approved_from_the_console_once_its_host_is_empty(
        tmp_path: Path, context: Any) -> None:
    """The demo with power management on: the console shows the standby with its watts,
    refuses it while the host runs VMs, and carries it out once they have left."""
    log = tmp_path / "power.log"
    power = f"""
[power]
automation = "manual"
standby_cycles = 1
command = "sh -c 'echo {{action}} {{host}} >> {log}'"
"""
    serve = Serve(demo_config(tmp_path, time_scale=0.01, extra=power),
                  {"BALANCER_API_TOKEN": TOKEN})
    try:
        wait_ready(serve.url)
        url = serve.url
        recs = httpx.get(f"{url}/v1/recommendations").json()
        sb = next(r for r in recs if r["kind"] == "standby")
        host = sb["source"]
        page, errors = open_page(context, f"{url}/ui/recommendations")
        row = page.locator(f"#power-recs tr[data-rec='{sb['id']}']")
        cells = row.locator("td").all_inner_texts()
        assert cells[0] == "standby" and cells[1] == host and cells[3] == sb["reason"]
        assert cells[2] == f"{round(sb['gain'])} W"
        sign_in(page, TOKEN)
        page.locator("#who", has_text="signed in").wait_for()
        apply = page.get_by_role("button", name=f"Apply: standby {host}")
        apply.click()
        page.get_by_role("status").filter(has_text="apply the moves that empty it").wait_for()
        assert not log.exists()
        for r in recs:
            if r["kind"] == "power":
                got = httpx.post(f"{url}/v1/recommendations/{r['id']}/apply", headers=AUTH,
                                 timeout=60)
                assert got.status_code == 200 and \
                    got.json()["recommendation"]["state"] == "applied", got.text
        apply.click()
        page.get_by_role("status").filter(has_text=f"standby of {host} done").wait_for()
        row.wait_for(state="detached")
        assert log.read_text() == f"standby {host}\n"
        states = {h["name"]: h["state"] for h in httpx.get(f"{url}/v1/cluster").json()["hosts"]}
        assert states[host] == "standby"
        # the one refusal (409) is the only error the browser logs
        assert len(errors) == 1 and "status of 409" in errors[0], errors
    finally:
        assert serve.stop() == 0, "".join(serve.lines[-20:])
