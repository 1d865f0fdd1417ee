"""``balancer plan --fleet DIR`` on a real Dask cluster (a ``dask scheduler`` and two
``dask worker`` processes on 127.0.0.1): every snapshot planned as ``balancer plan`` plans it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from simulator.generate import generate

pytest.importorskip("distributed")

from test_sweep import BIN, ROOT, cluster  # noqa: E402, F401  (the real-cluster fixture)

SIZES = [(8, 60), (6, 40), (8, 50), (10, 70)]
# plans stop on deterministic work, never on the wall clock (the machine may be busy)
DET = ("--seed", "3", "--time-limit", "900")


def balancer(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "balancer"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    d = tmp_path / "fleet"
    d.mkdir()
    for i, (h, v) in enumerate(SIZES):
        (d / f"dc{i}.json").write_text(json.dumps(generate(h, v, seed=10 + i)))
    (d / "notes.txt").write_text("not a snapshot: ignored")
    return d


def test_fleet_plans_equal_the_single_plans_and_use_both_workers(cluster: str,  # noqa: F811
                                                                  fleet: Path) -> None:
    r = balancer("plan", "--fleet", str(fleet), "--scheduler", cluster, "--format", "json", *DET)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    rows = doc["clusters"]
    assert [x["cluster"] for x in rows] == ["dc0", "dc1", "dc2", "dc3"]
    assert len({x["worker"] for x in rows}) == 2
    for x, (h, v) in zip(rows, SIZES, strict=True):
        assert x["status"] == "ok" and (x["hosts"], x["vms"]) == (h, v)
        assert x["stopped_by"] != "wall_clock"
        one = balancer("plan", str(fleet / f"{x['cluster']}.json"), "--format", "json", *DET)
        assert one.returncode == 0, one.stderr
        want = json.loads(one.stdout)
        assert x["migrations"] == want["efficacy"]["migrations"] == len(want["migrations"])
        assert x["imbalance_after"] == want["efficacy"]["after"]["imbalance"]
        assert x["imbalance_before"] == want["efficacy"]["before"]["imbalance"]
        assert x["waves"] == len(want["waves"])
        assert x["imbalance_after"] < x["imbalance_before"]
    t = doc["totals"]
    assert t["clusters"] == t["ok"] == 4 and t["failed"] == 0
    assert t["vms"] == sum(v for _, v in SIZES)
    assert t["migrations"] == sum(x["migrations"] for x in rows)


def test_fleet_table_and_a_bad_snapshot_reported(cluster: str, fleet: Path) -> None:  # noqa: F811
    (fleet / "broken.json").write_text(json.dumps({"version": 1, "hosts": [], "vms": 3}))
    r = balancer("plan", "--fleet", str(fleet), "--scheduler", cluster, "--format", "table",
                 "--solver", "greedy")
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("5 clusters from") and "on 2 workers" in lines[0]
    assert sum(line.startswith("dc") and " ok " in line for line in lines) == 4
    assert any(line.startswith("total") and "4/5 ok" in line for line in lines)
    broken = [line for line in lines if line.startswith("broken: error:")]
    assert len(broken) == 1 and "vms" in broken[0]
    assert "Traceback" not in r.stderr


def test_fleet_bad_input_exit_2(tmp_path: Path, fleet: Path) -> None:
    for args, needle in (
            (["--fleet", str(tmp_path / "nope")], "not a folder"),
            (["--fleet", str(tmp_path / "fleet" / "dc0.json")], "not a folder"),
            (["--fleet", str(fleet), "--demo"], "not both"),
            (["--fleet", str(fleet), "--scheduler", "nowhere"], "--scheduler"),
    ):
        r = balancer("plan", *args, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = balancer("plan", "--fleet", str(empty), timeout=60)
    assert r.returncode == 2 and "no snapshot files" in r.stderr
