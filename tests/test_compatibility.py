"""Compatibility (CPU, networks, datastores, local storage, label-selected hosts): each as a
feasible / infeasible pair, through the planner's real interface, checked by the verifier."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from balancer.errors import InfeasibleError, SnapshotError
from balancer.service import plan
from balancer.snapshot import parse_snapshot
from simulator.generate import generate

from conftest import checked_plan, det, doc, host, vm, where


def H(name: str, state: str = "active", **extra) -> dict:  # noqa: ANN003, N802
    return {**host(name, state=state), **extra}


def V(name: str, on: str, **extra) -> dict:  # noqa: ANN003, N802
    return {**vm(name, on), **extra}


def test_network_feasible_and_infeasible() -> None:
    hosts = [H("h1", "maintenance", networks=["prod"]), H("h2", networks=["prod"]),
             H("h3", networks=["other"])]
    s = parse_snapshot(doc(hosts, [V("web", "h1", networks=["prod"])]))
    r = checked_plan(s, det(threshold=1))
    assert where(r)["web"] == "h2"
    assert r.eligibility["web"] == ["needs network prod: present on 1 of 2 active hosts"]
    hosts[1]["networks"] = ["other"]
    with pytest.raises(InfeasibleError) as err:
        plan(parse_snapshot(doc(hosts, [V("web", "h1", networks=["prod"])])), det())
    assert "web" in str(err.value) and "network prod" in str(err.value)


def test_datastore_feasible_and_infeasible() -> None:
    hosts = [H("h1", "maintenance"), H("h2", datastores=["ds1"]), H("h3")]
    s = parse_snapshot(doc(hosts, [V("db", "h1", datastores=["ds1"])]))
    assert where(checked_plan(s, det(threshold=1)))["db"] == "h2"
    hosts[1]["state"] = "standby"
    with pytest.raises(InfeasibleError, match="datastore ds1"):
        plan(parse_snapshot(doc(hosts, [V("db", "h1", datastores=["ds1"])])), det())


def test_cpu_features_and_model_feasible_and_infeasible() -> None:
    old = {"cpu_model": "Haswell", "cpu_features": ["avx", "avx2"]}
    new = {"cpu_model": "Skylake", "cpu_features": ["avx", "avx2", "avx512f"]}
    hosts = [H("h1", "maintenance", **new), H("h2", **old), H("h3", **new)]
    s = parse_snapshot(doc(hosts, [V("a", "h1", cpu_features=["avx512f"]),
                                   V("b", "h1", cpu_model="Skylake"),
                                   V("c", "h1", cpu_model="Haswell")]))
    r = checked_plan(s, det(threshold=1))
    assert where(r)["a"] == "h3" and where(r)["b"] == "h3"
    assert where(r)["c"] in ("h2", "h3")  # a newer CPU has Haswell's features
    hosts[2] = H("h3", **old)
    with pytest.raises(InfeasibleError, match="cpu feature avx512f"):
        plan(parse_snapshot(doc(hosts, [V("a", "h1", cpu_features=["avx512f"])])), det())


def test_cluster_cpu_baseline_lets_vms_cross_generations() -> None:
    old = {"cpu_model": "Haswell", "cpu_features": ["avx", "avx2"]}
    new = {"cpu_model": "Skylake", "cpu_features": ["avx", "avx2", "avx512f"]}
    d = doc([H("h1", "maintenance", **new), H("h2", **old)], [V("a", "h1", cpu_model="Haswell")])
    d["cpu_baseline"] = ["avx", "avx2"]
    assert where(checked_plan(parse_snapshot(d), det(threshold=1)))["a"] == "h2"
    d["vms"][0]["cpu_features"] = ["avx512f"]
    with pytest.raises(SnapshotError, match="outside the cluster's cpu_baseline"):
        parse_snapshot(d)
    d["vms"][0].pop("cpu_features")
    d["cpu_baseline"] = ["avx", "avx2", "avx512f"]
    with pytest.raises(SnapshotError, match=r"hosts\[1\] \(h2\): field 'cpu_features': lacks"):
        parse_snapshot(d)


def test_local_storage_vm_is_never_moved() -> None:
    s = parse_snapshot(doc([H("h1", "maintenance"), H("h2")],
                           [V("local", "h1", local_storage=True), V("x", "h1")]))
    r = checked_plan(s, det(threshold=3))
    assert where(r) == {"local": "h1", "x": "h2"}
    assert any("local storage" in n for n in r.notes)


def test_vm_host_rule_by_labels_feasible_and_infeasible() -> None:
    hosts = [H("h1", labels={"rack": "r1"}), H("h2", labels={"rack": "r2"}),
             H("h3", labels={"rack": "r1", "gpu": "yes"})]
    rule = {"name": "rack1", "type": "vm_host", "vms": ["a"], "host_labels": {"rack": "r1"}}
    s = parse_snapshot(doc(hosts, [V("a", "h2")], [rule]))
    assert s.rules[0].hosts == ("h1", "h3")
    r = checked_plan(s, det(threshold=1))
    assert where(r)["a"] in ("h1", "h3") and "fixes rule rack1" in r.moves[0].reason
    with pytest.raises(SnapshotError, match="field 'host_labels': no host has labels rack=r9"):
        parse_snapshot(doc(hosts, [V("a", "h2")], [{**rule, "host_labels": {"rack": "r9"}}]))
    hosts[0]["state"] = hosts[2]["state"] = "maintenance"
    with pytest.raises(InfeasibleError):
        plan(parse_snapshot(doc(hosts, [V("a", "h2")], [rule])), det())


@pytest.mark.parametrize(("field", "value", "message"), [
    ("networks", "prod", "field 'networks' must be a list"),
    ("cpu_features", ["avx", 3], "field 'cpu_features' must hold non-empty strings"),
    ("local_storage", "yes", "field 'local_storage' must be true or false"),
    ("cpu_model", "Nehalem", "field 'cpu_model': no host has CPU model 'Nehalem'"),
])
def test_bad_compatibility_fields_are_named(field: str, value: object, message: str) -> None:
    with pytest.raises(SnapshotError, match=message):
        parse_snapshot(doc([H("h1")], [V("a", "h1", **{field: value})]))


def test_old_snapshots_stay_valid_and_unrestricted() -> None:
    s = parse_snapshot(doc([H("h1"), H("h2")], [V("a", "h1")]))
    assert checked_plan(s, det()).eligibility == {}


def test_heterogeneous_cluster_never_crosses_an_incompatible_boundary() -> None:
    d = generate(64, 800, 5, rules=True, heterogeneous=True)
    for h in d["hosts"][:3]:
        h["state"] = "maintenance"  # evacuations must find compatible hosts too
    s = parse_snapshot(d)
    r = checked_plan(s, det(threshold=5, max_iterations=60))  # verifier checks compatibility
    assert r.moves and r.after.imbalance < r.before.imbalance
    for m in r.moves:
        v = s.vms[s.vm_index[m.vm]]
        assert s.unmet_requirements(v, s.hosts[s.host_index[m.target]]) == []
    assert any("needs cpu" in w for why in r.eligibility.values() for w in why)


def test_reason_reaches_the_table() -> None:
    vlan = {"networks": ["prod-vlan42"]}
    d = doc([H("h1", **vlan), H("h2"), H("h3"), H("h4", **vlan)],
            [V("a", "h1", networks=["prod-vlan42"]), V("b", "h1")])
    p = subprocess.run([sys.executable, "-m", "balancer.cli", "plan", "-", "--format", "table"],
                       input=json.dumps(d), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "needs network prod-vlan42: present on 2 of 4 active hosts" in p.stdout
