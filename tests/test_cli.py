"""`balancer plan` through the real command line."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import doc, host, vm

CLI = [sys.executable, "-m", "balancer.cli"]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, input=stdin, timeout=120)


def test_demo_json_has_the_documented_shape() -> None:
    p = run("plan", "--demo", "--time-limit", "2", "--format", "json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert set(out) >= {"migrations", "efficacy", "solver"}
    m = out["migrations"][0]
    assert set(m) >= {"vm", "from", "to", "reason"}
    eff = out["efficacy"]
    for side in ("before", "after"):
        assert set(eff[side]) >= {"cpu_std", "mem_std", "cpu_max", "mem_max"}
    assert eff["migrations"] == len(out["migrations"])
    assert eff["moved_mem_mb"] == sum(x["mem_mb"] for x in out["migrations"])
    assert set(out["solver"]) >= {"status", "objective", "bound", "seconds"}
    # the demo has host-003 in maintenance: every VM there leaves
    assert any(x["from"] == "host-003" and "evacuates host-003" in x["reason"]
               for x in out["migrations"])
    assert eff["after"]["cpu_std"] + eff["after"]["mem_std"] < \
        eff["before"]["cpu_std"] + eff["before"]["mem_std"]


def test_table_format_for_people() -> None:
    p = run("plan", "--demo", "--time-limit", "2", "--format", "table")
    assert p.returncode == 0, p.stderr
    assert "imbalance (cpu std + mem std):" in p.stdout
    assert "host-003" in p.stdout and "maintenance" in p.stdout
    assert "reason" in p.stdout


def test_snapshot_from_stdin_and_budget_flags() -> None:
    d = doc([host("h1"), host("h2")], [vm(f"v{i}", "h1", cpu=1.5) for i in range(6)])
    p = run("plan", "-", "--max-migrations", "1", "--threshold", "5", stdin=json.dumps(d))
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["migrations"]) == 1


def test_infeasible_exits_3_naming_the_rule() -> None:
    d = doc([host("h1"), host("h2")], [vm(f"w{i}", "h1") for i in range(3)],
            [{"name": "web", "type": "anti_affinity", "vms": ["w0", "w1", "w2"]}])
    p = run("plan", "-", stdin=json.dumps(d))
    assert p.returncode == 3
    assert p.stderr.count("\n") == 1 and "rule web" in p.stderr


def test_bad_flag_values_exit_2() -> None:
    for args in (["--max-migrations", "-3"], ["--time-limit", "0"], ["--max-moved-mem-gb", "x"],
                 ["--mem-overcommit", "nan"]):
        p = run("plan", "--demo", *args)
        assert p.returncode == 2, args
        assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
