"""The qemu (QMP) backend on real TCG guests in two network namespaces."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from balancer.executor.base import (
    Backend,
    HostUnreachable,
    IncompatibleHost,
    MigrationRequest,
    MigrationStatus,
    VMNotFound,
)
from balancer.executor.qemu import GuestSpec, QemuBackend, process_alive, qmp

from .conftest import beats, poll_until, poll_until_done, qemu_hosts, wait_beats

FAST = 8000.0  # Mbit/s: above what the unshaped veth carries, so the link sets the pace


def guest(kernel: Path, name: str = "vm1", mem: int = 64, **kw: int) -> GuestSpec:
    args = " ".join(f"{k}={v}" for k, v in {"fill": mem - 8, **kw}.items())
    return GuestSpec(name, mem, kernel=str(kernel), append=args)


def pid_of(backend: QemuBackend, vm: str, host: str) -> int:
    return int((backend.hosts[host].run_dir / f"{vm}.pid").read_text())


def alive(pid: int) -> bool:
    return process_alive(pid)


def test_implements_backend_protocol(qemu: QemuBackend) -> None:
    assert isinstance(qemu, Backend)


def test_migration_moves_the_running_guest(qemu: QemuBackend, guest_kernel: Path) -> None:
    qemu.launch(guest(guest_kernel, mem=128), "host-a")
    src_log, dst_log = qemu.serial_log("vm1", "host-a"), qemu.serial_log("vm1", "host-b")
    wait_beats(src_log, 2)
    src_pid = pid_of(qemu, "vm1", "host-a")

    h = qemu.start(MigrationRequest("vm1", "host-a", "host-b", 128, bandwidth_mbps=FAST))
    done = poll_until_done(qemu, h)

    assert done.status is MigrationStatus.COMPLETED, done
    assert done.transferred_mb > 100  # the guest's 120 MB of non-zero pages crossed the link
    assert done.downtime_ms is not None and done.downtime_ms < 2000
    assert qemu.locate("vm1") == "host-b"
    assert [(v.name, v.host, v.mem_mb, v.running) for v in qemu.inventory()] == \
        [("vm1", "host-b", 128, True)]
    deadline = time.monotonic() + 5
    while alive(src_pid) and time.monotonic() < deadline:  # the paused source was stopped
        time.sleep(0.05)
    assert not alive(src_pid)
    last_on_source = beats(src_log)[-1]
    on_dest = wait_beats(dst_log, 2)
    # The counter lives in guest RAM: the destination goes on from where the source stopped.
    assert on_dest[0] == last_on_source + 1
    assert on_dest == list(range(on_dest[0], on_dest[0] + len(on_dest)))
    time.sleep(1.2)
    assert beats(src_log)[-1] == last_on_source  # and the source prints nothing any more


def test_cancel_leaves_the_guest_running_on_its_source(qemu: QemuBackend,
                                                       guest_kernel: Path) -> None:
    qemu.launch(guest(guest_kernel), "host-a")
    src_log = qemu.serial_log("vm1", "host-a")
    wait_beats(src_log, 1)
    slow = MigrationRequest("vm1", "host-a", "host-b", 64, bandwidth_mbps=40)  # ~12 s
    h = qemu.start(slow)
    poll_until(qemu, h, lambda p: p.transferred_mb > 4)
    dst_pid = pid_of(qemu, "vm1", "host-b")
    qemu.cancel(h)
    p = poll_until_done(qemu, h, timeout=10)

    assert p.status is MigrationStatus.CANCELLED
    assert qemu.locate("vm1") == "host-a"
    deadline = time.monotonic() + 5
    while alive(dst_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(dst_pid)
    assert not (qemu.hosts["host-b"].run_dir / "vm1.json").exists()
    n = len(beats(src_log))
    wait_beats(src_log, n + 2)  # still running on the source
    # A retry needs (and gets) a new destination, and succeeds.
    h2 = qemu.start(MigrationRequest("vm1", "host-a", "host-b", 64, bandwidth_mbps=FAST))
    assert poll_until_done(qemu, h2).status is MigrationStatus.COMPLETED
    assert qemu.locate("vm1") == "host-b"


def test_destination_killed_mid_migration(qemu: QemuBackend, guest_kernel: Path) -> None:
    qemu.launch(guest(guest_kernel), "host-a")
    src_log = qemu.serial_log("vm1", "host-a")
    wait_beats(src_log, 1)
    h = qemu.start(MigrationRequest("vm1", "host-a", "host-b", 64, bandwidth_mbps=40))
    poll_until(qemu, h, lambda p: p.transferred_mb > 4)
    os.kill(pid_of(qemu, "vm1", "host-b"), signal.SIGKILL)
    p = poll_until_done(qemu, h, timeout=10)

    assert p.status is MigrationStatus.FAILED
    assert p.error  # QEMU's reason, e.g. "Unable to write to socket: Broken pipe"
    assert qemu.locate("vm1") == "host-a"
    assert [v.host for v in qemu.inventory()] == ["host-a"]
    n = len(beats(src_log))
    wait_beats(src_log, n + 2)


def test_dirtying_faster_than_the_cap_never_converges_until_the_cap_is_raised(qemu: QemuBackend,
                                                        guest_kernel: Path) -> None:
    # 12 MB/s of dirtied pages (96 Mbit/s) against a 48 Mbit/s cap: rounds never shrink.
    qemu.launch(guest(guest_kernel, mem=32, dirty=12000, wss=16), "host-a")
    wait_beats(qemu.serial_log("vm1", "host-a"), 1)
    h = qemu.start(MigrationRequest("vm1", "host-a", "host-b", 32, bandwidth_mbps=48))
    # After sending half as much again as the whole guest, it is still copying.
    p = poll_until(qemu, h, lambda p: p.transferred_mb > 48, timeout=60)
    assert p.status is MigrationStatus.ACTIVE
    # The bandwidth policy: raising the cap above the dirty rate lets it converge.
    qemu.set_bandwidth(h, FAST)
    assert poll_until_done(qemu, h, timeout=30).status is MigrationStatus.COMPLETED
    assert qemu.locate("vm1") == "host-b"


def test_a_new_backend_instance_finds_vms_and_finishes_cleanup(lab, guest_kernel: Path) -> None:
    first = QemuBackend(qemu_hosts(lab))
    first.launch(guest(guest_kernel), "host-a")
    wait_beats(first.serial_log("vm1", "host-a"), 1)
    first.start(MigrationRequest("vm1", "host-a", "host-b", 64, bandwidth_mbps=FAST))
    first.close()  # the executor "dies" without polling; QEMU carries on migrating

    second = QemuBackend(qemu_hosts(lab))
    deadline = time.monotonic() + 30
    while second.locate("vm1") != "host-b":
        assert time.monotonic() < deadline, "migration never finished without the executor"
        time.sleep(0.1)
    # The paused source copy is removed once the VM runs on the destination.
    assert [(v.name, v.host) for v in second.inventory()] == [("vm1", "host-b")]
    assert not (second.hosts["host-a"].run_dir / "vm1.json").exists()


def test_errors_are_mapped_and_name_the_vm(qemu: QemuBackend, guest_kernel: Path) -> None:
    with pytest.raises(VMNotFound, match="ghost"):
        qemu.check(MigrationRequest("ghost", "host-a", "host-b", 64))
    qemu.launch(guest(guest_kernel), "host-a")
    with pytest.raises(IncompatibleHost, match="host-z"):
        qemu.check(MigrationRequest("vm1", "host-a", "host-z", 64))
    with pytest.raises(VMNotFound, match="runs on host-a, not on host-b"):
        qemu.check(MigrationRequest("vm1", "host-b", "host-a", 64))
    bad = GuestSpec("vm2", 64, kernel=str(guest_kernel), args=("-no-such-option",))
    with pytest.raises(IncompatibleHost, match="vm2 did not start on host-b"):
        qemu.launch(bad, "host-b")
    # A QEMU whose monitor does not answer (frozen process) is "unreachable", not a crash.
    pid = pid_of(qemu, "vm1", "host-a")
    os.kill(pid, signal.SIGSTOP)
    try:
        quick = QemuBackend(list(qemu.hosts.values()), qmp_timeout=0.5)
        with pytest.raises(HostUnreachable, match="vm1 on host-a"):
            quick.locate("vm1")
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_restarted_executor_finds_and_finishes_a_migration_in_flight(
        lab, guest_kernel: Path) -> None:
    first = QemuBackend(qemu_hosts(lab))
    first.launch(guest(guest_kernel), "host-a")
    wait_beats(first.serial_log("vm1", "host-a"), 1)
    lost = first.start(MigrationRequest("vm1", "host-a", "host-b", 64, bandwidth_mbps=80))
    first.close()  # crashed before recording the handle's token

    second = QemuBackend(qemu_hosts(lab))
    found = second.find_migration("vm1")
    assert found is not None and found.token != lost.token
    assert (found.request.source, found.request.target) == ("host-a", "host-b")
    assert second.find_migration("nothere") is None
    assert second.locate("vm1") == "host-a"  # still copying: the VM is on its source
    second.set_bandwidth(found, FAST)
    assert poll_until_done(second, found).status is MigrationStatus.COMPLETED
    assert second.locate("vm1") == "host-b"
    assert second.find_migration("vm1") is None


def test_destination_dead_before_it_was_resumed_gives_the_guest_back_to_its_source(
        lab, guest_kernel: Path) -> None:
    first = QemuBackend(qemu_hosts(lab))
    first.launch(guest(guest_kernel), "host-a")
    src_log = first.serial_log("vm1", "host-a")
    wait_beats(src_log, 1)
    # ~1.3 s at 400 Mbit/s: the executor is gone before the state has all arrived (at full
    # speed its switch-over watcher could resume the destination before close())
    first.start(MigrationRequest("vm1", "host-a", "host-b", 64, bandwidth_mbps=400))
    first.close()  # the executor dies: nobody resumes the destination
    src_sock = first.hosts["host-a"].run_dir / "vm1.qmp"
    dst_sock = first.hosts["host-b"].run_dir / "vm1.qmp"
    deadline = time.monotonic() + 30
    while qmp(src_sock, "query-migrate")[0].get("status") != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    while qmp(dst_sock, "query-status")[0]["status"] == "inmigrate":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # All the state is on the destination, which waits (-S) to be resumed: it never ran the
    # guest. It dies now.
    assert qmp(dst_sock, "query-status")[0]["status"] == "paused"
    os.kill(int((first.hosts["host-b"].run_dir / "vm1.pid").read_text()), signal.SIGKILL)

    second = QemuBackend(qemu_hosts(lab))
    assert second.locate("vm1") == "host-a"  # the paused source was resumed
    assert [(v.name, v.host, v.running) for v in second.inventory()] == \
        [("vm1", "host-a", True)]
    counted = wait_beats(src_log, len(beats(src_log)) + 2)
    assert counted == list(range(1, len(counted) + 1))  # the same guest, never restarted
