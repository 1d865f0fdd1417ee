"""The service's inventory: one replace(), edits through the snapshot's own methods (nothing
lost: cpu baseline, rules, labels), kept in the store, followed by other processes; and the
rule check the cycle's anti-flapping uses (``verify.broken_rules``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from balancer.errors import InputError
from balancer.inventory import Inventory
from balancer.model import VM, HostState
from balancer.snapshot import parse_snapshot
from balancer.store import Store
from balancer.verify import broken_rules

from conftest import doc, host, vm


def cluster() -> dict:
    d = doc([host("h1", mem=16384), host("h2", mem=16384), host("h3", mem=8192)],
            [vm("a", "h1", mem=4096), vm("b", "h1", mem=4096), vm("c", "h2", mem=12288)],
            [{"name": "ab-apart", "type": "anti_affinity", "vms": ["a", "b"]}])
    d["cpu_baseline"] = ["sse4_2"]
    for h in d["hosts"]:
        h["cpu_features"] = ["sse4_2", "avx2"]
    return d


def test_edits_keep_everything_else_and_reach_other_processes(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    inv = Inventory(store, snapshot=parse_snapshot(cluster()))
    seen = []
    inv.listeners.append(seen.append)
    s = inv.set_host_state("h3", HostState.MAINTENANCE)
    assert s.hosts[s.host_index["h3"]].state is HostState.MAINTENANCE
    assert s.cpu_baseline == frozenset({"sse4_2"}) and [r.name for r in s.rules] == ["ab-apart"]
    inv.move_vm("a", "h2")
    assert inv.snapshot.vms[inv.snapshot.vm_index["a"]].host == "h2"
    inv.add_vm(VM(name="d", host="h2", vcpus=2, mem=1024, cpu_demand=500, mem_demand=512))
    assert [v.name for v in inv.snapshot.vms] == ["a", "b", "c", "d"]
    assert len(seen) == 3
    # another process (a follower) sees each change
    other = Inventory(Store(tmp_path / "s.db"))
    assert other.snapshot is not None and other.snapshot.vm_index.keys() == {"a", "b", "c", "d"}
    assert not other.reload()
    inv.move_vm("d", "h1")
    assert other.reload() and other.snapshot.vms[other.snapshot.vm_index["d"]].host == "h1"
    # the backend's view: a VM gone, one new, one moved; rules naming a gone VM go too
    inv.follow([("a", "h1", 4, 4096), ("c", "h2", 4, 12288), ("d", "h1", 2, 1024),
                ("e", "h2", 1, 512)])
    s = inv.snapshot
    assert sorted(v.name for v in s.vms) == ["a", "c", "d", "e"]
    assert s.rules == () and s.vms[s.vm_index["a"]].host == "h1"
    other.store.close()
    store.close()


def test_maintenance_that_leaves_too_little_memory_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    inv = Inventory(store, snapshot=parse_snapshot(cluster()))
    inv.set_host_state("h3", HostState.MAINTENANCE)
    with pytest.raises(InputError, match="host h2: cannot enter maintenance: the other "
                                         "active hosts lack 4096 MiB"):
        inv.set_host_state("h2", HostState.MAINTENANCE)
    assert inv.snapshot.hosts[inv.snapshot.host_index["h2"]].state is HostState.ACTIVE
    store.close()


def test_broken_rules_names_the_rule_and_its_vms() -> None:
    s = parse_snapshot(cluster())
    assert broken_rules(s) == {"ab-apart": ("a", "b")}
    assert broken_rules(s.with_vm_on("a", "h2")) == {}
