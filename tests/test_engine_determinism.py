"""The same snapshot, options and seed give the same plan whatever the machine's load."""

from __future__ import annotations

import subprocess
import sys

from balancer.service import PlanOptions, plan
from balancer.snapshot import parse_snapshot
from simulator.generate import generate_skewed

BURN = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end:\n    pass\n"


def test_two_runs_one_under_a_cpu_burner_give_identical_plans() -> None:
    snap = parse_snapshot(generate_skewed(24, 300, 5, rules=True))
    # default effort (deterministic units); the wall-clock limit is only a safety stop
    opts = PlanOptions(threshold=5, time_limit=300)
    quiet = plan(snap, opts)
    burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(3)]
    try:
        loaded = plan(snap, opts)
    finally:
        for b in burners:
            b.kill()
        for b in burners:
            b.wait()
    assert quiet.solver["stopped_by"] in ("effort", "converged", "optimal")
    assert loaded.solver["stopped_by"] == quiet.solver["stopped_by"]
    assert loaded.placement == quiet.placement
    assert [(m.vm, m.target, m.reason) for m in loaded.moves] == \
        [(m.vm, m.target, m.reason) for m in quiet.moves]
    assert quiet.moves, "a skewed cluster must be rebalanced"
