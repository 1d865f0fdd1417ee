"""Measure real QEMU live migrations and compare them with ``balancer.migration_model``.

One command (root; QEMU, iproute2 and gcc from .ci/install.d/20-real-migration.sh)::

    python3 bench/migration_model.py [--repeat N] [--links 1000,100] [--mems 128,512]
                                     [--calibrate] [--plot docs/migration-model.png]

Two network namespaces joined by a veth pair (tests/real/lab.py), the veth shaped with
``tc ... tbf`` to each link rate; on each link, 128 and 512 MB TCG guests (the tiny test guest
of tests/real/guest, which writes non-zero data into all its memory), idle and dirtying memory,
are migrated from one namespace to the other through the ``qemu`` backend. The measured time is
from ``Backend.start`` to QEMU's ``completed`` (polled every 10 ms). It prints predicted
against measured times with the error, and with ``--calibrate`` the ``ModelParams`` fitted to
the idle runs (least squares of ``T = setup + M / (efficiency x B)``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tqdm import tqdm  # noqa: E402

from balancer.executor.base import MigrationRequest, MigrationStatus  # noqa: E402
from balancer.executor.qemu import GuestSpec, QemuBackend, QemuHost, qmp  # noqa: E402
from balancer.migration_model import ModelParams, estimate  # noqa: E402
from tests.real import lab as labmod  # noqa: E402

# Dirtying workload: 4 MB/s (32 Mbit/s) of page writes cycling over a 64 MB working set.
DIRTY_KBPS = 4096
DIRTY_WSS_MB = 64
UNCAPPED_MBPS = 80000.0  # QEMU's max-bandwidth far above the link: the link sets the pace


@dataclass
class Run:
    link_mbps: float
    mem_mb: int
    dirty: bool
    measured_s: float
    qemu_total_s: float
    transferred_mb: float
    downtime_ms: float

    @property
    def dirty_rate_mbps(self) -> float:
        return DIRTY_KBPS * 1024 * 8 / 1e6 if self.dirty else 0.0


def measure(backend: QemuBackend, kernel: Path, link: float, mem: int, dirty: bool,
            index: int) -> Run:
    vm = f"bench{index}"
    append = f"fill={mem}" + (f" dirty={DIRTY_KBPS} wss={DIRTY_WSS_MB}" if dirty else "")
    backend.launch(GuestSpec(vm, mem, kernel=str(kernel), append=append), "host-a")
    log = backend.serial_log(vm, "host-a")
    deadline = time.monotonic() + 60
    while "hb 2" not in (log.read_text() if log.exists() else ""):  # filled, ticking
        if time.monotonic() > deadline:
            raise RuntimeError(f"guest {vm} did not start: {log}")
        time.sleep(0.05)
    src = backend.hosts["host-a"]
    t0 = time.monotonic()
    h = backend.start(MigrationRequest(vm, "host-a", "host-b", mem, bandwidth_mbps=UNCAPPED_MBPS))
    while True:
        info = qmp(src.run_dir / f"{vm}.qmp", "query-migrate")[0]
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.01)
    measured = time.monotonic() - t0
    if info["status"] != "completed":
        raise RuntimeError(f"{vm}: migration {info['status']}: {info.get('error-desc')}")
    p = backend.poll(h)  # stops the paused source once the destination runs
    assert p.status is MigrationStatus.COMPLETED, p
    backend.destroy(vm)
    ram = info.get("ram", {})
    return Run(link, mem, dirty, measured, info.get("total-time", 0) / 1000.0,
               ram.get("transferred", 0) / 2**20, float(info.get("downtime", 0)))


def predict(r: Run, params: ModelParams | None = None) -> float:
    return estimate(r.mem_mb, r.link_mbps, dirty_rate_mbps=r.dirty_rate_mbps,
                    working_set_mb=DIRTY_WSS_MB if r.dirty else None, params=params).seconds


def calibrate(runs: list[Run]) -> ModelParams:
    """Least-squares fit of T = setup + M / (efficiency x B) on the idle runs."""
    idle = [r for r in runs if not r.dirty]
    xs = [r.mem_mb / (r.link_mbps / 8.0) for r in idle]  # seconds at 100 % efficiency
    ys = [r.measured_s for r in idle]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / \
        sum((x - mx) ** 2 for x in xs)
    setup = my - slope * mx
    return ModelParams(setup_s=round(max(setup, 0.0), 3), efficiency=round(1.0 / slope, 3))


def table(runs: list[Run], params: ModelParams | None = None) -> str:
    lines = ["| link | guest | workload | measured s | QEMU total s | predicted s | error | "
             "sent MB | downtime ms |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        pred = predict(r, params)
        err = 100.0 * (pred - r.measured_s) / r.measured_s
        wl = f"dirty {r.dirty_rate_mbps:.0f} Mbit/s" if r.dirty else "idle"
        lines.append(f"| {r.link_mbps:g} Mbit/s | {r.mem_mb} MB | {wl} | {r.measured_s:.2f} | "
                     f"{r.qemu_total_s:.2f} | {pred:.2f} | {err:+.1f} % | "
                     f"{r.transferred_mb:.0f} | {r.downtime_ms:.0f} |")
    worst = max(abs(predict(r, params) - r.measured_s) / r.measured_s for r in runs)
    lines.append(f"\nworst error {100 * worst:.1f} % over {len(runs)} runs")
    return "\n".join(lines)


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for dirty, marker in ((False, "o"), (True, "^")):
        sel = [r for r in runs if r.dirty == dirty]
        ax.scatter([r.measured_s for r in sel], [predict(r) for r in sel], marker=marker,
                   label="dirtying" if dirty else "idle")
    hi = max(max(r.measured_s, predict(r)) for r in runs) * 1.3
    lo = min(min(r.measured_s, predict(r)) for r in runs) / 1.3
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.fill_between([lo, hi], [lo * 0.8, hi * 0.8], [lo * 1.2, hi * 1.2], color="grey",
                    alpha=0.2, label="±20 %")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured migration time, s")
    ax.set_ylabel("predicted, s")
    ax.set_title("Pre-copy model vs real QEMU migrations (veth, tbf)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--links", default="1000,100", help="link rates, Mbit/s")
    ap.add_argument("--mems", default="128,512", help="guest sizes, MB")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--plot", type=Path, help="write predicted vs measured as a PNG")
    args = ap.parse_args(argv)
    links = [float(x) for x in args.links.split(",")]
    mems = [int(x) for x in args.mems.split(",")]
    cases = [(link, mem, dirty) for link in links for mem in mems for dirty in (False, True)
             for _ in range(args.repeat)]
    work = Path(tempfile.mkdtemp(prefix="balancer-bench-"))
    labmod.sweep_leftovers()
    kernel = labmod.build_guest(work / "guest")
    the_lab = labmod.Lab.create(work / "lab")
    runs: list[Run] = []
    try:
        backend = QemuBackend([QemuHost(h.name, h.address, h.root / "run", h.exec_prefix())
                               for h in the_lab.hosts])
        shaped: float | None = None
        for i, (link, mem, dirty) in enumerate(tqdm(cases, desc="migrations", unit="run")):
            if link != shaped:
                the_lab.shape(link)
                shaped = link
            runs.append(measure(backend, kernel, link, mem, dirty, i))
    finally:
        the_lab.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"model defaults: {ModelParams()}")
    print(table(runs))
    if args.calibrate:
        fitted = calibrate(runs)
        print(f"\nfitted on the idle runs: {fitted}")
        print(table(runs, fitted))
    if args.plot:
        plot(runs, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
