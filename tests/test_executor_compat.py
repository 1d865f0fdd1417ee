"""Issue 6, executor part: the pre-migration compatibility check, through the simulated backend.

The simulated backend refuses what the snapshot says a destination cannot run; the runner asks
``check`` before every start, so an incompatible move is journaled ``skipped`` with the
backend's reason, is never started, and the rest of the plan runs.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from balancer.executor.base import IncompatibleHost, MigrationRequest
from balancer.executor.compat import (
    QemuOffer,
    RunningGuest,
    is_local_uri,
    parse_domain_xml,
    qemu_lacks,
    refusal,
)
from balancer.executor.config import ExecutorConfig, parse_config
from balancer.executor.journal import Journal, State
from balancer.executor.runner import Runner, RunSummary
from balancer.executor.simulated import SimulatedBackend
from balancer.model import ClusterSnapshot, Move
from balancer.planner import Waves, add_waves, make_waves
from balancer.snapshot import parse_snapshot, to_dict
from simulator.generate import generate

from conftest import host, vm

GIB = 1024
ROOT = Path(__file__).parents[1]


def compat_cluster() -> dict[str, Any]:
    """a: prod + dmz, Skylake; b: prod only, Haswell (no avx512f); c: like a."""
    hosts = [
        {**host("a", mem=64 * GIB), "networks": ["prod", "dmz"], "datastores": ["ds1"],
         "cpu_model": "Skylake-Server", "cpu_features": ["avx2", "avx512f"]},
        {**host("b", mem=64 * GIB), "networks": ["prod"], "datastores": ["ds1"],
         "cpu_model": "Haswell", "cpu_features": ["avx2"]},
        {**host("c", mem=64 * GIB), "networks": ["prod", "dmz"], "datastores": ["ds1"],
         "cpu_model": "Skylake-Server", "cpu_features": ["avx2", "avx512f"]},
    ]
    vms = [
        {**vm("web", "a", mem=4 * GIB), "networks": ["prod", "dmz"]},  # b lacks dmz
        {**vm("db", "a", mem=8 * GIB), "networks": ["prod"], "datastores": ["ds1"]},
        {**vm("ml", "a", mem=4 * GIB), "cpu_features": ["avx512f"]},  # b lacks avx512f
        {**vm("app", "a", mem=4 * GIB), "networks": ["prod"]},
        {**vm("local", "c", mem=2 * GIB), "local_storage": True},
    ]
    return {"version": 1, "hosts": hosts, "vms": vms, "rules": []}


def run_plan(s: ClusterSnapshot, waves: Waves, c: ExecutorConfig, tmp_path: Path,
             backend: Any = None) -> tuple[RunSummary, Any]:
    backend = backend or SimulatedBackend.from_snapshot(s, c)
    journal = Journal(tmp_path / "journal.sqlite", synchronous="normal")
    try:
        runner = Runner(backend, journal, c, {h.name: float(h.mem_capacity) for h in s.hosts})
        return runner.run(waves), backend
    finally:
        journal.close()


def test_incompatible_moves_are_skipped_with_the_reason_and_the_plan_goes_on(tmp_path):
    s = parse_snapshot(compat_cluster())
    moves = [Move("web", "a", "b", "", 4 * GIB), Move("db", "a", "b", "", 8 * GIB),
             Move("ml", "a", "b", "", 4 * GIB), Move("app", "a", "c", "", 4 * GIB),
             Move("local", "c", "a", "", 2 * GIB)]
    summary, backend = run_plan(s, make_waves(s, moves), parse_config({}), tmp_path)
    by_vm = {e.vm: e for e in summary.entries}

    assert by_vm["web"].state is State.SKIPPED
    assert by_vm["web"].reason == "incompatible: destination b lacks network dmz used by web"
    assert by_vm["ml"].state is State.SKIPPED
    assert by_vm["ml"].reason == "incompatible: destination b lacks cpu feature avx512f used by ml"
    assert by_vm["local"].state is State.SKIPPED
    assert "local storage" in by_vm["local"].reason
    assert by_vm["db"].state is State.SUCCEEDED and by_vm["app"].state is State.SUCCEEDED
    assert summary.ok  # refused moves are skipped, not failed
    assert sorted((vm_, dst) for _, vm_, _, dst, _ in backend.starts) == [("app", "c"),
                                                                         ("db", "b")]
    assert backend.refusals == []  # nothing was started that the backend then refused
    where = {v.name: v.host for v in backend.inventory()}
    assert where == {"web": "a", "db": "b", "ml": "a", "app": "c", "local": "c"}
    # the journal keeps the reason, in the entry and in its events
    journal = Journal(tmp_path / "journal.sqlite")
    try:
        web = journal.entries(summary.plan_id)[by_vm["web"].id]
        assert web.state is State.SKIPPED and "network dmz" in web.reason
        events = journal.events(summary.plan_id, web.id)
        assert [ev[2] for ev in events] == ["planned", "skipped"]  # never running
        assert "lacks network dmz" in events[-1][5]
    finally:
        journal.close()


def test_the_simulated_backend_refuses_what_the_snapshot_says_is_incompatible():
    s = parse_snapshot(compat_cluster())
    backend = SimulatedBackend.from_snapshot(s, parse_config({}))
    with pytest.raises(IncompatibleHost, match="destination b lacks network dmz used by web"):
        backend.check(MigrationRequest("web", "a", "b", 4 * GIB))
    backend.check(MigrationRequest("web", "a", "c", 4 * GIB))  # c has dmz
    with pytest.raises(IncompatibleHost, match="cpu feature avx512f"):
        backend.start(MigrationRequest("ml", "a", "b", 4 * GIB))
    assert backend.refusals == [("ml", "a", "b",
                                 "destination b lacks cpu feature avx512f used by ml")]
    assert backend.starts == []
    # without the snapshot's compatibility fields nothing is refused
    plain = SimulatedBackend.from_snapshot(s, parse_config({}), compat=None)
    plain.check(MigrationRequest("web", "a", "b", 4 * GIB))


class Unchecked(SimulatedBackend):
    """A backend whose pre-check only looks at memory: what a backend without the
    compatibility check would do. Used to show the counting below can see a refusal."""

    def check(self, request: MigrationRequest) -> None:
        saved, self.compat = self.compat, None
        try:
            super().check(request)
        finally:
            self.compat = saved


def random_plan(s: ClusterSnapshot, n: int, seed: int) -> list[Move]:
    """``n`` seeded moves of distinct VMs to other hosts with room (compatible or not)."""
    rng = random.Random(seed)
    cap = {h.name: h.mem_capacity * 0.9 for h in s.hosts}
    used = {h.name: 0 for h in s.hosts}
    for v in s.vms:
        used[v.host] += v.mem
    vms = list(s.vms)
    rng.shuffle(vms)
    moves = []
    for v in vms:
        if len(moves) == n:
            break
        targets = [h.name for h in s.hosts if h.name != v.host and used[h.name] + v.mem
                   <= cap[h.name]]
        if not targets:
            continue
        t = rng.choice(targets)
        used[t] += v.mem
        used[v.host] -= v.mem
        moves.append(Move(v.name, v.host, t, "", v.mem))
    return moves


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_migration_is_started_that_the_backend_refuses(tmp_path, seed):
    """Target of issue 6: zero migrations started that the backend then refuses."""
    s = parse_snapshot(generate(12, 120, seed=seed, heterogeneous=True))
    moves = random_plan(s, 40, seed)
    incompatible = {m.vm for m in moves
                    if s.unmet_requirements(s.vms[s.vm_index[m.vm]],
                                            s.hosts[s.host_index[m.target]])}
    assert 5 <= len(incompatible) < len(moves)  # the plan mixes both kinds
    waves = make_waves(s, moves)
    c = parse_config({"simulated": {"seed": seed}})

    (tmp_path / "checked").mkdir()
    summary, backend = run_plan(s, waves, c, tmp_path / "checked")
    started = {vm_ for _, vm_, _, _, _ in backend.starts}
    assert backend.refusals == []  # refused starts: 0
    assert started.isdisjoint(incompatible)
    skipped = {e.vm for e in summary.entries if e.state is State.SKIPPED}
    assert skipped == incompatible
    for e in summary.entries:
        if e.vm in incompatible:
            assert e.reason.startswith(f"incompatible: destination {e.target} lacks ")
            assert e.reason.endswith(f" used by {e.vm}") and e.attempts == 0
        else:
            assert e.state is State.SUCCEEDED, (e.vm, e.state, e.reason)
    assert len(started) == len(moves) - len(incompatible)

    # The same plan through a backend that does not pre-check compatibility: the backend
    # refuses those moves only once the runner tries to start them.
    (tmp_path / "unchecked").mkdir()
    summary2, backend2 = run_plan(s, waves, c, tmp_path / "unchecked",
                                  backend=Unchecked.from_snapshot(s, c))
    assert {vm_ for vm_, _, _, _ in backend2.refusals} == incompatible
    refused = [e for e in summary2.entries if e.vm in incompatible]
    assert all(e.state is State.SKIPPED and e.reason.startswith("incompatible (at start): ")
               for e in refused)  # even then the plan goes on, nothing is retried
    assert sum(e.state is State.SUCCEEDED for e in summary2.entries) == \
        len(moves) - len(incompatible)


def test_a_refusal_at_start_is_not_retried(tmp_path):
    s = parse_snapshot(compat_cluster())
    c = parse_config({"retry": {"attempts": 3, "backoff_s": 1}})
    waves = make_waves(s, [Move("web", "a", "b", "", 4 * GIB), Move("app", "a", "b", "", 4 * GIB)])
    summary, backend = run_plan(s, waves, c, tmp_path, backend=Unchecked.from_snapshot(s, c))
    by_vm = {e.vm: e for e in summary.entries}
    assert by_vm["web"].state is State.SKIPPED and by_vm["web"].attempts == 1
    assert [r[0] for r in backend.refusals] == ["web"]
    assert by_vm["app"].state is State.SUCCEEDED


def test_balancer_execute_reports_incompatible_moves(tmp_path):
    d = compat_cluster()
    s = parse_snapshot(d)
    plan = {"migrations": [{"vm": "web", "from": "a", "to": "b", "mem_mb": 4 * GIB},
                           {"vm": "app", "from": "a", "to": "b", "mem_mb": 4 * GIB}]}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(add_waves(plan, s)))
    assert to_dict(s)["hosts"][1]["networks"] == ["prod"]  # the embedded snapshot keeps them
    out = subprocess.run([sys.executable, "-m", "balancer.cli", "execute", str(path),
                          "--dry-run", "--format", "json", "--quiet"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["counts"]["skipped"] == 1 and res["counts"]["succeeded"] == 1
    web = next(m for m in res["migrations"] if m["vm"] == "web")
    assert web["state"] == "skipped"
    assert web["reason"] == "incompatible: destination b lacks network dmz used by web"


# ----------------------------------------------------------------- the real backends' helpers

DOMAIN = """<domain type='qemu'><name>vm1</name>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <cpu mode='custom' match='exact'><model fallback='forbid'>Skylake-Server</model>
    <feature policy='require' name='avx512f'/></cpu>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><source file='/srv/vm1.img'/><target dev='vda'/></disk>
    <disk type='block' device='disk'><source dev='/dev/vg/vm1'/><target dev='vdb'/></disk>
    <disk type='volume' device='disk'><source pool='shared' volume='vm1-data'/></disk>
    <disk type='file' device='cdrom'><target dev='hdc'/></disk>
    <interface type='network'><source network='prod-vlan42'/></interface>
    <interface type='network'><source network='prod-vlan42'/></interface>
    <interface type='bridge'><source bridge='br0'/></interface>
    <interface type='direct'><source dev='eth1' mode='bridge'/></interface>
  </devices></domain>"""


def test_parse_domain_xml_finds_what_the_domain_needs():
    n = parse_domain_xml(DOMAIN)
    assert (n.name, n.virt_type, n.arch, n.machine, n.emulator) == \
        ("vm1", "qemu", "x86_64", "pc-i440fx-7.2", "/usr/bin/qemu-system-x86_64")
    assert n.networks == ("prod-vlan42",)
    assert n.host_interfaces == ("br0", "eth1")
    assert n.disk_paths == ("/srv/vm1.img", "/dev/vg/vm1")
    assert n.volumes == (("shared", "vm1-data"),)
    assert n.cpu_label == "CPU model Skylake-Server"
    assert n.cpu_xml is not None and "avx512f" in n.cpu_xml
    passthrough = parse_domain_xml(DOMAIN.replace("mode='custom' match='exact'",
                                                  "mode='host-passthrough'"))
    assert passthrough.cpu_xml is None  # nothing libvirt can compare


def test_helpers_reject_bad_input_and_format_reasons():
    from balancer.executor.base import BackendError

    with pytest.raises(BackendError, match="unreadable domain XML"):
        parse_domain_xml("<domain")
    with pytest.raises(BackendError, match="root element <network>"):
        parse_domain_xml("<network/>")
    assert refusal("vm1", "host-b", ["network prod-vlan42"]) == \
        "destination host-b lacks network prod-vlan42 used by vm1"
    assert is_local_uri("qemu:///system")
    assert is_local_uri("qemu+unix:///system?socket=/run/x/libvirt-sock")
    assert not is_local_uri("qemu+tcp://10.0.0.2/system")
    assert not is_local_uri("qemu+ssh://root@h2/system")


def test_qemu_lacks_compares_what_runs_with_what_the_destination_offers():
    src = QemuOffer(frozenset({"pc", "pc-i440fx-7.2"}),
                    {"qemu64-x86_64-cpu": (), "Skylake-Server-x86_64-cpu": ("pku",)},
                    {"qemu64-x86_64-cpu": "qemu64",
                     "Skylake-Server-x86_64-cpu": "Skylake-Server"}, "tcg")
    running = RunningGuest("pc-i440fx-7.2", "qemu64-x86_64-cpu")
    assert qemu_lacks(running, src, src) == []
    older = QemuOffer(frozenset({"pc", "pc-i440fx-6.2"}), {"qemu64-x86_64-cpu": ()},
                      {"qemu64-x86_64-cpu": "qemu64"}, "tcg")
    assert qemu_lacks(running, src, older) == ["machine type pc-i440fx-7.2"]
    sky = RunningGuest("pc-i440fx-7.2", "Skylake-Server-x86_64-cpu")
    assert qemu_lacks(sky, src, older) == ["machine type pc-i440fx-7.2",
                                           "CPU model Skylake-Server"]
    fewer = QemuOffer(src.machines, {"Skylake-Server-x86_64-cpu": ("pku", "avx512f")},
                      src.cpu_names, "tcg")
    assert qemu_lacks(sky, src, fewer) == ["CPU model Skylake-Server with avx512f"]
    no_accel = QemuOffer(src.machines, src.cpus, src.cpu_names, "tcg",
                         "invalid accelerator tcg")
    assert qemu_lacks(running, src, no_accel) == ["accelerator tcg (invalid accelerator tcg)"]
