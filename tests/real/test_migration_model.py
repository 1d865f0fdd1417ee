"""The pre-copy migration-time model (balancer.migration_model): shape and edge cases.

How well it predicts real QEMU migrations is measured by bench/migration_model.py (speed and
accuracy figures live in benchmarks, docs/benchmarks.md), not asserted here.
"""

from __future__ import annotations

import math

import pytest

from balancer.migration_model import ModelParams, estimate

P = ModelParams(setup_s=0.1, efficiency=1.0)


def test_idle_guest_is_setup_plus_memory_over_rate() -> None:
    e = estimate(1000, 800, params=P)  # 100 MB/s
    assert e.converges and e.rounds == 1
    assert e.seconds == pytest.approx(0.1 + 10.0)
    assert e.transferred_mb == pytest.approx(1000)
    assert e.downtime_ms == 0.0


def test_time_is_linear_in_memory_and_inverse_in_bandwidth() -> None:
    t1 = estimate(512, 1000, params=P).seconds - P.setup_s
    assert estimate(1024, 1000, params=P).seconds - P.setup_s == pytest.approx(2 * t1)
    assert estimate(512, 100, params=P).seconds - P.setup_s == pytest.approx(10 * t1)


def test_dirty_pages_add_rounds_until_the_rest_fits_the_downtime() -> None:
    # 100 MB/s link, 25 MB/s dirtied: rounds of 1000, 250, 62.5 ... MB until <= 30 MB.
    e = estimate(1000, 800, dirty_rate_mbps=200, downtime_ms=300, params=P)
    assert e.converges
    assert e.rounds == 3
    assert e.transferred_mb == pytest.approx(1000 + 250 + 62.5 + 15.625)
    assert e.downtime_ms == pytest.approx(156.25)
    assert e.downtime_ms <= 300


def test_working_set_caps_what_is_resent() -> None:
    wide = estimate(1000, 800, dirty_rate_mbps=400, params=P)
    narrow = estimate(1000, 800, dirty_rate_mbps=400, working_set_mb=50, params=P)
    assert narrow.seconds < wide.seconds
    assert narrow.transferred_mb <= 1000 + 50 * narrow.rounds


def test_dirtying_at_or_above_the_rate_never_converges() -> None:
    e = estimate(1000, 800, dirty_rate_mbps=800, params=P)
    assert not e.converges
    assert math.isinf(e.seconds)


def test_calibrated_defaults_reproduce_the_measured_idle_runs() -> None:
    # bench/migration_model.py: 512 MB over 1 Gbit/s measured 4.6-4.8 s, over 100 Mbit/s 44.6 s.
    assert estimate(512, 1000).seconds == pytest.approx(4.7, rel=0.05)
    assert estimate(512, 100).seconds == pytest.approx(44.6, rel=0.05)


@pytest.mark.parametrize(("kw", "field"), [
    ({"mem_mb": -1, "bandwidth_mbps": 100}, "mem_mb"),
    ({"mem_mb": 10, "bandwidth_mbps": 0}, "bandwidth_mbps"),
    ({"mem_mb": 10, "bandwidth_mbps": float("nan")}, "bandwidth_mbps"),
    ({"mem_mb": 10, "bandwidth_mbps": 100, "dirty_rate_mbps": -5}, "dirty_rate_mbps"),
])
def test_bad_input_names_the_field(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"field '{field}'"):
        estimate(**kw)
