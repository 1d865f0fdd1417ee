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
    with a fixed ``setup`` cost (connection, device state) and an ``efficiency`` factor (the share
    of the nominal link rate the migration stream achieves) calibrated on this machine.
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
    setup_s: float = 0.05  # fixed cost per migration, seconds
    efficiency: float = 0.9  # share of the nominal link rate the stream achieves
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
    if mem_mb < 0 or bandwidth_mbps <= 0 or dirty_rate_mbps < 0:
        raise ValueError("mem_mb and dirty_rate_mbps must be >= 0, bandwidth_mbps > 0")
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
