"""``[backend.qemu]`` / ``[backend.libvirt]`` config: bad input is one line naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from balancer.errors import InputError
from balancer.executor.config import parse_config
from balancer.executor.libvirt_backend import LibvirtBackend
from balancer.executor.libvirt_backend import create_backend as create_libvirt
from balancer.executor.qemu import QemuBackend
from balancer.executor.qemu import create_backend as create_qemu
from balancer.snapshot import parse_snapshot

REPO = Path(__file__).resolve().parents[2]
SNAP = {"version": 1, "hosts": [
    {"name": n, "cpu_capacity": 4, "mem_capacity_mb": 1024} for n in ("h1", "h2")], "vms": [
    {"name": "v", "host": "h1", "vcpus": 1, "mem_mb": 64, "cpu_demand": 0.1,
     "mem_demand_mb": 64}]}


def qemu_hosts(tmp_path: Path) -> list[dict]:
    return [{"name": n, "address": f"10.199.0.{i}", "run_dir": str(tmp_path / n)}
            for i, n in enumerate(("h1", "h2"), 1)]


def test_valid_configs_build_the_backends(tmp_path: Path) -> None:
    snap = parse_snapshot(SNAP)
    q = create_qemu(parse_config({"backend": {"qemu": {"hosts": qemu_hosts(tmp_path)}}}), snap)
    assert isinstance(q, QemuBackend) and sorted(q.hosts) == ["h1", "h2"]
    assert (tmp_path / "h1").is_dir()
    lv = create_libvirt(parse_config({"backend": {"libvirt": {"hosts": [
        {"name": n, "uri": "qemu:///system", "migration_uri": f"qemu+tcp://{n}/system"}
        for n in ("h1", "h2")]}}}), snap)
    assert isinstance(lv, LibvirtBackend) and sorted(lv.hosts) == ["h1", "h2"]


@pytest.mark.parametrize(("backend", "patch", "message"), [
    ("qemu", None, "field 'backend.qemu' is missing"),
    ("qemu", {"hosts": []}, "field 'backend.qemu.hosts'"),
    ("qemu", {"hosts": "ROOT1"}, "field 'backend.qemu.hosts.0.address'"),
    ("qemu", {"hosts": "ROOT", "colour": 1}, "field 'backend.qemu.colour': unknown field"),
    ("qemu", {"hosts": "ROOT", "default_bandwidth_mbps": 0},
     "field 'backend.qemu.default_bandwidth_mbps'"),
    ("qemu", {"hosts": "ROOTH1"}, "no entry for snapshot hosts \\['h2'\\]"),
    ("libvirt", None, "field 'backend.libvirt' is missing"),
    ("libvirt", {"hosts": [{"name": "h1", "uri": "qemu:///system"}]},
     "field 'backend.libvirt.hosts.0.migration_uri'"),
])
def test_bad_backend_config_names_the_field(tmp_path: Path, backend: str, patch: dict | None,
                                            message: str) -> None:
    cfg: dict = {"backend": {}}
    if patch is not None:
        hosts = qemu_hosts(tmp_path)
        if patch.get("hosts") == "ROOT":
            patch = {**patch, "hosts": hosts}
        elif patch.get("hosts") == "ROOT1":
            del hosts[0]["address"]
            patch = {**patch, "hosts": hosts}
        elif patch.get("hosts") == "ROOTH1":
            patch = {**patch, "hosts": hosts[:1]}
        cfg["backend"][backend] = patch
    create = create_qemu if backend == "qemu" else create_libvirt
    with pytest.raises(InputError, match=message):
        create(parse_config(cfg), parse_snapshot(SNAP))


def test_cli_reports_a_bad_backend_config_in_one_line(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"snapshot": SNAP, "migrations": [
        {"vm": "v", "from": "h1", "to": "h2", "mem_mb": 64}]}))
    cfg = tmp_path / "exec.json"
    hosts = qemu_hosts(tmp_path)
    hosts[1]["address"] = ""
    cfg.write_text(json.dumps({"backend": {"qemu": {"hosts": hosts}}}))
    r = subprocess.run([sys.executable, "-m", "balancer.cli", "execute", str(plan), "--backend",
                        "qemu", "--config", str(cfg), "--journal", str(tmp_path / "j.sqlite")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "backend.qemu.hosts.1.address" in lines[0], r.stderr
