"""Snapshot v1: valid documents load; every kind of bad input names the item and the field."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest

from balancer.errors import SnapshotError
from balancer.snapshot import dumps, loads, parse_snapshot

from conftest import doc, host, vm

BASE = doc([host("h1"), host("h2")], [vm("v1", "h1"), vm("v2", "h2")],
           [{"name": "r1", "type": "anti_affinity", "vms": ["v1", "v2"]}])


def test_valid_document_round_trips() -> None:
    s = parse_snapshot(BASE)
    assert [h.name for h in s.hosts] == ["h1", "h2"]
    assert s.vms[0].cpu_demand == 1000 and s.vms[0].mem == 4096
    assert parse_snapshot(json.loads(dumps(s))) == s


def test_extra_optional_fields_are_accepted() -> None:
    d = copy.deepcopy(BASE)
    d["hosts"][0]["rack"] = "r1"
    d["vms"][0]["owner"] = "team-a"
    d["generator"] = "other-tool"
    parse_snapshot(d)


def test_single_overloaded_host_is_valid_input() -> None:
    d = doc([host("h1", mem=8192), host("h2")], [vm(f"v{i}", "h1", mem=4096) for i in range(4)])
    parse_snapshot(d)  # h1 holds 16 GiB on 8 GiB: the engine's job, not an input error


def _mut(path: list, value: object) -> dict:
    d = copy.deepcopy(BASE)
    target = d
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return d


BAD = [
    ("version", _mut(["version"], 2), "field 'version'"),
    ("missing hosts", _mut(["hosts"], KeyError), "field 'hosts' is missing"),
    ("duplicate host", _mut(["hosts", 1, "name"], "h1"), "hosts[1] (h1): field 'name': duplicate"),
    ("duplicate vm", _mut(["vms", 1, "name"], "v1"), "vms[1] (v1): field 'name': duplicate"),
    ("unknown host", _mut(["vms", 0, "host"], "h9"), "vms[0] (v1): field 'host': unknown host"),
    ("negative cpu", _mut(["hosts", 0, "cpu_capacity"], -4), "hosts[0] (h1): field 'cpu_capacity'"),
    ("nan demand", _mut(["vms", 0, "cpu_demand"], math.nan), "vms[0] (v1): field 'cpu_demand'"),
    ("inf memory", _mut(["vms", 0, "mem_mb"], math.inf), "vms[0] (v1): field 'mem_mb'"),
    ("string number", _mut(["vms", 0, "vcpus"], "4"), "field 'vcpus' must be a number"),
    ("bool number", _mut(["vms", 0, "vcpus"], True), "field 'vcpus' must be a number"),
    ("cpu above size", _mut(["vms", 0, "cpu_demand"], 5), "above the VM's size (vcpus=4)"),
    ("mem above size", _mut(["vms", 0, "mem_demand_mb"], 5000),
     "above the VM's size (mem_mb=4096)"),
    ("bad state", _mut(["hosts", 0, "state"], "off"), "field 'state' must be one of"),
    ("bad automation", _mut(["vms", 0, "automation"], "auto"), "field 'automation'"),
    ("rule unknown vm", _mut(["rules", 0, "vms"], ["v1", "v9"]),
     "rules[0] (r1): field 'vms': unknown VM"),
    ("rule type", _mut(["rules", 0, "type"], "spread"), "rules[0] (r1): field 'type'"),
]


@pytest.mark.parametrize(("label", "document", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_item_and_field(label: str, document: dict, message: str) -> None:
    with pytest.raises(SnapshotError) as err:
        parse_snapshot(document)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_vm_host_rule_with_unknown_host() -> None:
    d = doc([host("h1")], [vm("v1", "h1")],
            [{"name": "lic", "type": "vm_host", "vms": ["v1"], "hosts": ["h7"]}])
    msg = r"rules\[0\] \(lic\): field 'hosts': unknown host 'h7'"
    with pytest.raises(SnapshotError, match=msg):
        parse_snapshot(d)


def test_affinity_pair_inside_anti_affinity_set_is_a_contradiction() -> None:
    d = doc([host("h1"), host("h2")], [vm("a", "h1"), vm("b", "h1"), vm("c", "h2")],
            [{"name": "together", "type": "affinity", "vms": ["a", "b"]},
             {"name": "apart", "type": "anti_affinity", "vms": ["a", "b", "c"]}])
    with pytest.raises(SnapshotError, match=r"apart.*together"):
        parse_snapshot(d)


def test_transitive_affinity_contradiction() -> None:
    d = doc([host("h1"), host("h2")], [vm("a", "h1"), vm("b", "h1"), vm("c", "h1")],
            [{"name": "ab", "type": "affinity", "vms": ["a", "b"]},
             {"name": "bc", "type": "affinity", "vms": ["b", "c"]},
             {"name": "apart", "type": "anti_affinity", "vms": ["a", "c"]}])
    with pytest.raises(SnapshotError, match="apart"):
        parse_snapshot(d)


def test_disjoint_mandatory_vm_host_rules_contradict() -> None:
    d = doc([host("h1"), host("h2")], [vm("a", "h1")],
            [{"name": "r1", "type": "vm_host", "vms": ["a"], "hosts": ["h1"]},
             {"name": "r2", "type": "vm_host", "vms": ["a"], "hosts": ["h2"]}])
    with pytest.raises(SnapshotError, match="no host satisfies"):
        parse_snapshot(d)


def test_should_rules_never_contradict() -> None:
    d = doc([host("h1"), host("h2")], [vm("a", "h1"), vm("b", "h1")],
            [{"name": "ab", "type": "affinity", "vms": ["a", "b"], "mandatory": False},
             {"name": "apart", "type": "anti_affinity", "vms": ["a", "b"]}])
    parse_snapshot(d)


def test_memory_beyond_all_active_hosts_is_rejected() -> None:
    d = doc([host("h1", mem=8192), host("h2", mem=8192, state="maintenance")],
            [vm("a", "h1", mem=6144), vm("b", "h2", mem=6144)])
    with pytest.raises(SnapshotError, match="exceeds what all active hosts can hold"):
        parse_snapshot(d)


def test_invalid_json_is_one_line() -> None:
    with pytest.raises(SnapshotError, match=r"not valid JSON: .* line 1 column"):
        loads("{\"version\": 1,,}")


def test_cli_bad_snapshot_exits_2_with_one_line(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_mut(["vms", 0, "cpu_demand"], -1)))
    proc = subprocess.run([sys.executable, "-m", "balancer.cli", "plan", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "vms[0] (v1): field 'cpu_demand'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_missing_file_and_bad_flag_exit_2(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "balancer.cli", "plan", str(tmp_path / "no.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "balancer.cli", "plan", "--demo",
                           "--threshold", "9"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--threshold" in proc.stderr
