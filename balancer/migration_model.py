"""Pre-copy live-migration time model.

Description
    QEMU's pre-copy migration first sends all guest memory, then repeatedly re-sends the pages
    the guest dirtied during the previous round, until what is left fits the allowed downtime at
    the link's rate; then it stops the guest and sends the rest (stop-and-copy). With memory
    ``M`` (MB), effective bandwidth ``R`` (MB/s), page dirty rate ``D`` (MB/s) and downtime
    limit ``T_d``:

        V_0 = M,  t_i = V_i / R,  V_{i+1} = min(D * t_i, W)       (W: writable working set)
        stop at the first round with V_i <= R * T_d (or after ``max_rounds``)
        T = setup + sum_i t_i + V_last / R

    The model converges when ``D < R``; otherwise rounds do not shrink and the migration never
    finishes unless the bandwidth is raised or the guest throttled (``converges`` is False and
    ``seconds`` is infinite). This is the model of Liu et al. (2011) and Akoush et al. (2010),
    with a fixed ``setup`` cost (starting the destination, connection, device state) and an
    ``efficiency`` factor (the share of the nominal link rate, in Mbit/s, that the stream
    achieves in MiB of guest memory) calibrated on this machine.
Calibration
    ``bench/migration_model.py --calibrate`` migrates real TCG guests (the test guest of
    tests/real, all its memory written) through the ``qemu`` backend between two network
    namespaces whose veth is shaped with ``tc tbf``, and fits ``T = setup + M / (efficiency x
    B)`` by least squares on the idle runs (128 and 512 MB at 100 Mbit/s and 1 Gbit/s); the
    dirtying runs (34 Mbit/s over a 64 MB working set) are the check. Fitted: setup 0.117 s,
    efficiency 0.922 (worst error 7.5 % over the 8 runs); the defaults below are those figures
    rounded. The measured time runs from ``Backend.start`` (destination QEMU started) to
    QEMU's ``completed``. docs/benchmarks.md, section "Migration-time model", has the table.
Requirements
    VM configured memory; link bandwidth; a dirty-rate estimate (0 for an idle guest).
Limitations
    Zero pages (never written by the guest) are sent nearly for free by QEMU; ``M`` should be
    the guest's touched memory where it is known. Compression, post-copy and auto-converge are
    not modelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelParams:
    setup_s: float = 0.12  # fixed cost per migration, seconds (calibrated, see above)
    efficiency: float = 0.92  # MiB/s of guest memory per (Mbit/s / 8) of link (calibrated)
    max_rounds: int = 30
    default_downtime_ms: float = 300.0  # QEMU's default downtime limit


@dataclass(frozen=True)
class Estimate:
    seconds: float  # wall time from start to the VM running on the destination (inf: never)
    transferred_mb: float
    rounds: int
    downtime_ms: float
    converges: bool


def estimate(mem_mb: float, bandwidth_mbps: float, *, dirty_rate_mbps: float = 0.0,
             working_set_mb: float | None = None, downtime_ms: float | None = None,
             params: ModelParams | None = None) -> Estimate:
    """Estimate one pre-copy migration. Rates are in Mbit/s, sizes in MB (MiB)."""
    p = params or ModelParams()
    for name, value, ok in (("mem_mb", mem_mb, mem_mb >= 0),
                            ("bandwidth_mbps", bandwidth_mbps, bandwidth_mbps > 0),
                            ("dirty_rate_mbps", dirty_rate_mbps, dirty_rate_mbps >= 0)):
        if not ok or value != value:  # also rejects NaN
            rule = "> 0" if name == "bandwidth_mbps" else ">= 0"
            raise ValueError(f"migration model: field '{name}' must be {rule}, got {value!r}")
    rate = bandwidth_mbps / 8.0 * p.efficiency  # MB/s
    dirty = dirty_rate_mbps / 8.0
    wss = mem_mb if working_set_mb is None else min(working_set_mb, mem_mb)
    t_d = (p.default_downtime_ms if downtime_ms is None else downtime_ms) / 1000.0
    volume = float(mem_mb)
    total_time = p.setup_s
    sent = 0.0
    rounds = 0
    while True:
        if volume <= rate * t_d or rounds >= p.max_rounds:
            break
        t = volume / rate
        total_time += t
        sent += volume
        rounds += 1
        nxt = min(dirty * t, wss)
        if nxt >= volume and rounds > 1:  # not shrinking: never converges at this rate
            return Estimate(math.inf, math.inf, rounds, math.inf, False)
        volume = nxt
    if rounds >= p.max_rounds and volume > rate * t_d:
        return Estimate(math.inf, math.inf, rounds, math.inf, False)
    stop = volume / rate
    return Estimate(total_time + stop, sent + volume, rounds, stop * 1000.0, True)
