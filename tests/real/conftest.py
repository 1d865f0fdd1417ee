"""Fixtures for the real-backend tests: two hosts in network namespaces, the tiny guest, QEMU.

Each test gets a fresh pair of namespaces (per-run names, so leftovers of a crashed run never
clash, and a sweep removes those whose run is dead) and its own run directories; every QEMU and
libvirtd started in them is killed and the namespaces deleted when the test ends, pass or fail.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancer.executor.base import Handle, MigrationStatus, Progress
from balancer.executor.qemu import QemuBackend, QemuHost

from . import lab as labmod


@pytest.fixture(scope="session")
def guest_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    labmod.sweep_leftovers()
    return labmod.build_guest(tmp_path_factory.mktemp("guest"))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[labmod.Lab]:
    the_lab = labmod.Lab.create(tmp_path / "lab")
    try:
        yield the_lab
    finally:
        the_lab.close()


def qemu_hosts(the_lab: labmod.Lab) -> list[QemuHost]:
    return [QemuHost(h.name, h.address, h.root / "run", h.exec_prefix()) for h in the_lab.hosts]


@pytest.fixture
def qemu(lab: labmod.Lab) -> Iterator[QemuBackend]:
    backend = QemuBackend(qemu_hosts(lab))
    try:
        yield backend
    finally:
        backend.close()  # lab.close() then kills every QEMU in the namespaces


HB = re.compile(r"^hb (\d+)$", re.M)


def beats(path: Path) -> list[int]:
    """Heartbeat counters printed on a serial log, in order."""
    try:
        return [int(n) for n in HB.findall(path.read_text(errors="replace"))]
    except FileNotFoundError:
        return []


def wait_beats(path: Path, count: int, timeout: float = 20.0) -> list[int]:
    """Wait until ``path`` holds at least ``count`` heartbeats; return them."""
    deadline = time.monotonic() + timeout
    while True:
        got = beats(path)
        if len(got) >= count:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: {len(got)} heartbeats after {timeout}s, "
                                 f"wanted {count}")
        time.sleep(0.1)


def poll_until_done(backend: object, handle: Handle, timeout: float = 60.0) -> Progress:
    deadline = time.monotonic() + timeout
    while True:
        p = backend.poll(handle)  # type: ignore[attr-defined]
        if p.status is not MigrationStatus.ACTIVE:
            return p
        if time.monotonic() > deadline:
            raise AssertionError(f"migration still active after {timeout}s: {p}")
        time.sleep(0.05)


def poll_until(backend: object, handle: Handle, pred, timeout: float = 30.0) -> Progress:
    deadline = time.monotonic() + timeout
    while True:
        p = backend.poll(handle)  # type: ignore[attr-defined]
        if pred(p):
            return p
        if p.status is not MigrationStatus.ACTIVE or time.monotonic() > deadline:
            raise AssertionError(f"condition not reached: {p}")
        time.sleep(0.05)
