"""The executor (runner, journal, ``balancer execute``) driving the qemu backend on real guests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from balancer.executor.base import Progress
from balancer.executor.config import parse_config
from balancer.executor.journal import Entry, Journal, State
from balancer.executor.qemu import GuestSpec, QemuBackend, create_backend
from balancer.executor.runner import Runner
from balancer.planner import make_waves, moves_from_plan
from balancer.snapshot import parse_snapshot

from .conftest import beats, wait_beats
from .lab import Lab

REPO = Path(__file__).resolve().parents[2]


def snapshot_doc(vms: dict[str, int]) -> dict:
    hosts = [{"name": n, "cpu_capacity": 4, "mem_capacity_mb": 1024} for n in ("host-a", "host-b")]
    return {"version": 1, "hosts": hosts, "vms": [
        {"name": vm, "host": "host-a", "vcpus": 1, "mem_mb": mem, "cpu_demand": 0.1,
         "mem_demand_mb": mem} for vm, mem in vms.items()]}


def config_doc(lab: Lab, journal: Path, **migration: float) -> dict:
    mig = {"bandwidth_mbps": 40.0, "poll_interval_s": 0.1, "timeout_min_s": 60.0, **migration}
    return {
        "limits": {"max_concurrent": 1, "max_incoming_per_host": 1, "max_outgoing_per_host": 1},
        "migration": mig,
        "journal": {"path": str(journal)},
        "backend": {"qemu": {"hosts": [
            {"name": h.name, "address": h.address, "run_dir": str(h.root / "run"),
             "exec_prefix": list(h.exec_prefix())} for h in lab.hosts]}},
    }


def launch(backend: QemuBackend, kernel: Path, vms: dict[str, int], **guest_args: int) -> None:
    for vm, mem in vms.items():
        args = " ".join(f"{k}={v}" for k, v in {"fill": mem - 8, **guest_args}.items())
        backend.launch(GuestSpec(vm, mem, kernel=str(kernel), append=args), "host-a")
    for vm in vms:
        wait_beats(backend.serial_log(vm, "host-a"), 1)


def test_destination_killed_marks_the_entry_failed_and_the_plan_goes_on(
        lab: Lab, guest_kernel: Path, tmp_path: Path) -> None:
    vms = {"vm1": 32, "vm2": 32}
    snap = parse_snapshot(snapshot_doc(vms))
    cfg = parse_config(config_doc(lab, tmp_path / "j.sqlite"))
    backend = create_backend(cfg, snap)
    launch(backend, guest_kernel, vms)
    moves = moves_from_plan({"migrations": [
        {"vm": vm, "from": "host-a", "to": "host-b", "mem_mb": mem} for vm, mem in vms.items()]})
    killed: list[int] = []

    def on_event(kind: str, e: Entry, p: Progress | None) -> None:
        # Kill vm1's destination QEMU once a few MB have crossed.
        if kind == "progress" and e.vm == "vm1" and p and p.transferred_mb > 3 and not killed:
            pid = int((tmp_path / "lab/host-b/run/vm1.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    journal = Journal(tmp_path / "j.sqlite")
    runner = Runner(backend, journal, cfg, {"host-a": 1024, "host-b": 1024}, on_event=on_event)
    summary = runner.run(make_waves(snap, moves))
    journal.close()

    assert killed
    states = {e.vm: (e.state, e.reason) for e in summary.entries}
    assert states["vm1"][0] is State.FAILED and "MigrationFailed" in states["vm1"][1]
    assert states["vm2"][0] is State.SUCCEEDED
    # Nothing lost: each VM runs on exactly one host, vm1 still on its source.
    assert sorted((v.name, v.host) for v in backend.inventory()) == \
        [("vm1", "host-a"), ("vm2", "host-b")]
    n = len(beats(backend.serial_log("vm1", "host-a")))
    wait_beats(backend.serial_log("vm1", "host-a"), n + 1)


def test_non_converging_migration_is_cancelled_by_the_timeout(
        lab: Lab, guest_kernel: Path, tmp_path: Path) -> None:
    # The guest dirties 12 MB/s; the cap is 48 Mbit/s (6 MB/s): pre-copy never converges.
    vms = {"vm1": 32}
    snap = parse_snapshot(snapshot_doc(vms))
    cfg = parse_config(config_doc(lab, tmp_path / "j.sqlite", bandwidth_mbps=48.0,
                                  timeout_min_s=6.0, timeout_factor=1.0))
    backend = create_backend(cfg, snap)
    launch(backend, guest_kernel, vms, dirty=12000, wss=16)
    moves = moves_from_plan({"migrations": [
        {"vm": "vm1", "from": "host-a", "to": "host-b", "mem_mb": 32}]})
    journal = Journal(tmp_path / "j.sqlite")
    t0 = time.monotonic()
    summary = Runner(backend, journal, cfg, {"host-a": 1024, "host-b": 1024}).run(
        make_waves(snap, moves))
    took = time.monotonic() - t0
    journal.close()

    (entry,) = summary.entries
    assert entry.state is State.FAILED
    assert entry.reason.startswith("MigrationTimeout")
    assert 6.0 <= took < 20.0
    assert [(v.name, v.host, v.running) for v in backend.inventory()] == \
        [("vm1", "host-a", True)]
    assert not (tmp_path / "lab/host-b/run/vm1.json").exists()  # destination cleaned up


def execute(plan: Path, cfg: Path, journal: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "balancer.cli", "execute", str(plan), "--backend", "qemu",
         "--config", str(cfg), "--journal", str(journal), "--format", "json", "--quiet"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_executor_killed_mid_plan_and_restarted_reconciles(
        lab: Lab, guest_kernel: Path, tmp_path: Path) -> None:
    vms = {"vm1": 32, "vm2": 32, "vm3": 32}
    snap_doc = snapshot_doc(vms)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"snapshot": snap_doc, "migrations": [
        {"vm": vm, "from": "host-a", "to": "host-b", "mem_mb": mem} for vm, mem in vms.items()]}))
    cfg_path = tmp_path / "exec.json"
    cfg_path.write_text(json.dumps(config_doc(lab, tmp_path / "unused.sqlite")))
    journal = tmp_path / "journal.sqlite"
    backend = create_backend(parse_config(json.loads(cfg_path.read_text())),
                             parse_snapshot(snap_doc))
    launch(backend, guest_kernel, vms)
    last_beat = {}

    proc = execute(plan, cfg_path, journal)
    try:
        # Kill the executor with SIGKILL while vm2 (the second migration) is in flight.
        deadline = time.monotonic() + 60
        while not (tmp_path / "lab/host-b/run/vm2.json").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "vm2's migration never started"
            time.sleep(0.05)
        time.sleep(0.5)
        proc.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)  # reap it and close its pipes
    j = Journal(journal)
    before = {e.vm: e.state for e in j.entries(j.plan_ids()[-1])}
    j.close()
    assert before["vm1"] is State.SUCCEEDED
    assert before["vm2"] is State.RUNNING  # the crash left it unfinished
    assert before["vm3"] is State.PLANNED
    for vm in vms:
        last_beat[vm] = beats(backend.serial_log(vm, "host-a"))

    again = execute(plan, cfg_path, journal)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    summary = json.loads(out)
    assert summary["counts"]["succeeded"] == 3, summary
    assert sorted((v.name, v.host) for v in backend.inventory()) == \
        [("vm1", "host-b"), ("vm2", "host-b"), ("vm3", "host-b")]
    for vm in ("vm2", "vm3"):  # their guests went on counting on the destination
        on_dest = wait_beats(backend.serial_log(vm, "host-b"), 1)
        assert on_dest[0] == beats(backend.serial_log(vm, "host-a"))[-1] + 1
        assert last_beat[vm]
