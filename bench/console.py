"""Console benchmark: the 5,000-host cluster page in a real headless Chromium.

    python3 bench/console.py [--hosts 5000] [--vms 40000] [--runs 5]
    python3 bench/console.py --screenshots docs      # the PNGs in docs/ (demo cluster)

Starts ``balancer serve`` (push source, simulated backend, SQLite in a temp dir) on a free
loopback port, posts a seeded synthetic cluster (``simulator.generate``) and one round of
samples, lets the service build its first estimate (``GET /v1/cluster``, not timed: that is the
service's ingest path, not the console), then measures with Debian's ``chromium`` driven by
Playwright:

1. the server's answer for ``/ui/`` and for the cluster fragment (``/ui/part/cluster``, 200 and
   304), wall time seen by an HTTP client;
2. ``/ui/`` in a fresh browser page, ``--runs`` times: first contentful paint, the load event,
   and "complete" (every host tile in the DOM and the console's script running) — target: the
   5,000-host page renders in <= 2 s;
3. how long an open page takes to show a change made elsewhere (``PUT /v1/automation``
   switching the level), ``--runs`` times — target: <= 2 s.

Prints a table (min, median, max); exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "bench-console"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TARGET_S = 2.0


def serve(config: str) -> tuple[subprocess.Popen[str], str, threading.Thread]:
    proc = subprocess.Popen([sys.executable, "-m", "balancer.cli", "serve", "--config", config,
                             "--port", "0"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env={**os.environ, "BALANCER_API_TOKEN": TOKEN})
    assert proc.stderr is not None
    url = None
    for line in proc.stderr:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        raise SystemExit("balancer serve did not start")
    drain = threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True)
    drain.start()
    return proc, url, drain


def stop(proc: subprocess.Popen[str], drain: threading.Thread) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    drain.join(timeout=5)


def config(tmp: str, **extra: str) -> str:
    path = Path(tmp) / "bench.toml"
    text = f"""
[server]
host = "127.0.0.1"
[loop]
interval_s = 3600
imbalance_cycles = 1
[cluster]
name = "{extra.get('name', 'bench')}"
time_limit_s = 2
{extra.get('cluster', '')}
[ingest]
source = "{extra.get('source', 'push')}"
window_s = 300
stale_after_s = 3600
retention_s = 3600
[executor]
backend = "simulated"
{extra.get('executor', '')}
[store]
path = "{Path(tmp) / 'state.db'}"
{extra.get('tail', '')}
"""
    path.write_text(text)
    return str(path)


def spread(xs: list[float]) -> str:
    return f"{min(xs):.3f} / {statistics.median(xs):.3f} / {max(xs):.3f}"


def measure(args: argparse.Namespace) -> int:
    from playwright.sync_api import sync_playwright

    from balancer.api.testing import samples_for
    from simulator.generate import generate

    t0 = time.monotonic()
    doc = generate(args.hosts, args.vms, seed=args.seed)
    print(f"generated {args.hosts} hosts, {args.vms} VMs in {time.monotonic() - t0:.1f} s",
          file=sys.stderr)
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        proc, url, drain = serve(config(tmp))
        try:
            with httpx.Client(base_url=url, timeout=600, headers=AUTH) as c:
                c.post("/v1/inventory", json=doc).raise_for_status()
                smp = samples_for(doc, time.time(), times=(0.0,))
                for i in range(0, len(smp), 20_000):
                    c.post("/v1/metrics", json={"samples": smp[i:i + 20_000]}
                           ).raise_for_status()
                t0 = time.monotonic()
                c.get("/v1/cluster").raise_for_status()  # the service's first estimate
                print(f"first estimate (GET /v1/cluster) {time.monotonic() - t0:.1f} s",
                      file=sys.stderr)
                page_s, part_s, part304_s = [], [], []
                for _ in range(args.runs):
                    t0 = time.monotonic()
                    r = c.get("/ui/")
                    page_s.append(time.monotonic() - t0)
                    t0 = time.monotonic()
                    r = c.get("/ui/part/cluster")
                    part_s.append(time.monotonic() - t0)
                    t0 = time.monotonic()
                    c.get("/ui/part/cluster", headers={"If-None-Match": r.headers["etag"]})
                    part304_s.append(time.monotonic() - t0)
                size = len(c.get("/ui/").content)
                rows += [(f"server: GET /ui/ ({size / 1e6:.2f} MB)", spread(page_s), ""),
                         ("server: GET /ui/part/cluster (200)", spread(part_s), ""),
                         ("server: GET /ui/part/cluster (304)", spread(part304_s), "")]
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                try:
                    rows += browser_runs(browser, url, args)
                finally:
                    browser.close()
        finally:
            stop(proc, drain)
    ok = all(verdict != "MISSED" for _, _, verdict in rows)
    w = max(len(r[0]) for r in rows)
    print(f"\nconsole, {args.hosts} hosts / {args.vms} VMs, {args.runs} runs "
          f"(seconds: min / median / max)")
    for name, figure, verdict in rows:
        print(f"  {name:<{w}}  {figure:<24} {verdict}")
    return 0 if ok else 1


def browser_runs(browser: Any, url: str, args: argparse.Namespace) -> list[tuple[str, str, str]]:
    fcp, load, complete, update = [], [], [], []
    for _ in range(args.runs):
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        page = ctx.new_page()
        page.goto(f"{url}/ui/", wait_until="commit")
        page.wait_for_function(
            f"document.documentElement.dataset.ready === '1' && "
            f"document.querySelectorAll('a.tile').length === {args.hosts}",
            polling=20, timeout=120_000)
        t = page.evaluate("""() => {
            const nav = performance.getEntriesByType('navigation')[0];
            const paint = performance.getEntriesByName('first-contentful-paint')[0];
            return {fcp: paint ? paint.startTime : null, now: performance.now(),
                    load: nav.loadEventEnd || null};
        }""")
        page.wait_for_load_state("load")
        if t["load"] is None:
            t["load"] = page.evaluate(
                "performance.getEntriesByType('navigation')[0].loadEventEnd")
        fcp.append((t["fcp"] or float("nan")) / 1000)
        load.append(t["load"] / 1000)
        complete.append(t["now"] / 1000)
        ctx.close()
    # An open page following a change made elsewhere.
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.goto(f"{url}/ui/")
    page.wait_for_function("document.documentElement.dataset.ready === '1'")
    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as c:
        for i in range(args.runs):
            level = ("partially", "manual")[i % 2]
            page.wait_for_timeout(1500)
            t0 = time.monotonic()
            c.put("/v1/automation", json={"automation": level}).raise_for_status()
            page.wait_for_function(
                f"document.getElementById('automation-level').textContent.trim() === '{level}'",
                polling=20, timeout=60_000)
            update.append(time.monotonic() - t0)
    ctx.close()

    def verdict(xs: list[float]) -> str:
        return "met" if statistics.median(xs) <= TARGET_S and max(xs) <= TARGET_S else "MISSED"

    return [("browser: first contentful paint", spread(fcp), ""),
            ("browser: load event", spread(load), verdict(load)),
            ("browser: complete (all tiles, script ready)", spread(complete), verdict(complete)),
            ("open page shows a change made elsewhere", spread(update), verdict(update))]


def screenshots(args: argparse.Namespace) -> int:
    """PNGs of each page on the demo cluster, with a migration in flight on one of them; then
    the recommendations page of the demo with power management on (its Power table)."""
    from playwright.sync_api import sync_playwright

    out = Path(args.screenshots)
    out.mkdir(parents=True, exist_ok=True)
    inventory = ROOT / "balancer/data/demo-cluster.json"
    power = ('[power]\nautomation = "manual"\nstandby_cycles = 1\nmax_switch = 2\n'
             'command = "/usr/local/bin/host-power {action} {host}"')
    for tail, shots in (("", shoot), (power, shoot_power)):
        with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
            cfg = config(tmp, source="simulated", name="demo",
                         cluster=f'inventory = "{inventory}"\nseed = 0',
                         executor="[executor.settings.simulated]\ntime_scale = 0.25", tail=tail)
            proc, url, drain = serve(cfg)
            try:
                deadline = time.monotonic() + 120
                while httpx.get(f"{url}/readyz").status_code != 200:
                    if time.monotonic() > deadline:
                        raise SystemExit("the demo's first cycle did not finish")
                    time.sleep(0.3)
                with sync_playwright() as p:
                    browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                    try:
                        shots(browser, url, out)
                    finally:
                        browser.close()
            finally:
                stop(proc, drain)
    return 0


def shoot_power(browser: Any, url: str, out: Path) -> None:
    ctx = browser.new_context(viewport={"width": 1280, "height": 860}, device_scale_factor=1)
    page = ctx.new_page()
    page.goto(f"{url}/ui/recommendations")
    page.wait_for_function("document.documentElement.dataset.ready === '1'")
    page.wait_for_selector("#power-recs")
    page.wait_for_timeout(400)
    page.screenshot(path=str(out / "console-power.png"))
    print(f"wrote {out / 'console-power.png'}", file=sys.stderr)
    ctx.close()


def shoot(browser: Any, url: str, out: Path) -> None:
    ctx = browser.new_context(viewport={"width": 1280, "height": 860}, device_scale_factor=1)
    page = ctx.new_page()

    def snap(path: str, name: str, ready: str | None = None, full: bool = False) -> None:
        page.goto(f"{url}{path}")
        page.wait_for_function("document.documentElement.dataset.ready === '1'")
        if ready:
            page.wait_for_selector(ready)
        page.wait_for_timeout(400)
        page.screenshot(path=str(out / f"console-{name}.png"), full_page=full)
        print(f"wrote {out / f'console-{name}.png'}", file=sys.stderr)

    snap("/ui/", "cluster", "a.tile")
    snap("/ui/hosts/host-002", "host", "#host-vms")
    snap("/ui/recommendations", "recommendations", "section.wave")
    # a migration in flight: apply the biggest move and photograph the migrations page
    recs = httpx.get(f"{url}/v1/recommendations").json()
    rec = max(recs[1:], key=lambda r: r["mem_mb"])
    page.goto(f"{url}/ui/migrations")
    page.wait_for_function("document.documentElement.dataset.ready === '1'")
    done = threading.Event()

    def apply() -> None:
        r = httpx.post(f"{url}/v1/recommendations/{rec['id']}/apply", headers=AUTH, timeout=300)
        print(f"apply {rec['vm']}: {r.status_code}", file=sys.stderr)
        done.set()

    # an earlier move in the history first
    httpx.post(f"{url}/v1/recommendations/{recs[0]['id']}/apply", headers=AUTH, timeout=300)
    t = threading.Thread(target=apply)
    t.start()
    page.locator("#inflight tbody tr").filter(has_text=re.compile(r"\d+ / \d+ MiB")).wait_for(
        timeout=60_000)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(out / "console-migrations.png"))
    print(f"wrote {out / 'console-migrations.png'}", file=sys.stderr)
    t.join()
    page.goto(f"{url}/ui/whatif")
    page.wait_for_function("document.documentElement.dataset.ready === '1'")
    page.evaluate(f"sessionStorage.setItem('balancer.token', {json.dumps(TOKEN)})")
    page.reload()
    page.wait_for_function("document.documentElement.dataset.ready === '1'")
    page.get_by_label("Migration budget").fill("20")
    page.get_by_role("button", name="Show the plan").click()
    page.get_by_role("status").filter(has_text=re.compile("Plan ready|Refused")).wait_for(
        timeout=120_000)
    print("what-if:", page.get_by_role("status").inner_text(), file=sys.stderr)
    page.screenshot(path=str(out / "console-whatif.png"))
    print(f"wrote {out / 'console-whatif.png'}", file=sys.stderr)
    page.goto(f"{url}/ui/automation")
    page.wait_for_function("document.documentElement.dataset.ready === '1'")
    page.screenshot(path=str(out / "console-automation.png"))
    print(f"wrote {out / 'console-automation.png'}", file=sys.stderr)
    ctx.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, default=5000)
    ap.add_argument("--vms", type=int, default=40000)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--screenshots", metavar="DIR",
                    help="write console-*.png of each page (demo cluster) instead")
    args = ap.parse_args()
    return screenshots(args) if args.screenshots else measure(args)


if __name__ == "__main__":
    sys.exit(main())
