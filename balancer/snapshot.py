"""Read and write the snapshot file format v1 (docs/snapshot-format.md).

Validation names the item and the field at fault in one line, e.g.
``vms[12] (vm-00013): field 'cpu_demand': 9.5 is above the VM's size (vcpus=8)``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from balancer.errors import SnapshotError, read_text
from balancer.model import VM, Automation, ClusterSnapshot, Host, HostState, Rule, RuleType

FORMAT_VERSION = 1


def _where(kind: str, i: int, item: Any) -> str:
    name = item.get("name") if isinstance(item, Mapping) else None
    ok = isinstance(name, str) and check_name(name) is None and len(name) <= 64
    return f"{kind}[{i}] ({name})" if ok else f"{kind}[{i}]"


# Physical ranges: anything outside is a typo or an attack, and would break arithmetic later
# (a capacity that rounds to 0 divides by zero; 1e308 overflows the solver's integers).
MAX_NAME = 253
MAX_HOST_CORES = 65536.0
MIN_HOST_CORES = 0.001  # one millicore, the model's unit
MAX_MEM_MB = float(64 * 1024 * 1024)  # 64 TiB
MAX_VCPUS = 4096.0


def _fmt(value: Any) -> str:
    """A short rendering of a bad value (a 400-digit integer is not echoed whole)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(where: str, item: Mapping[str, Any], key: str, *, positive: bool,
            required: bool = True, default: float | None = None,
            minimum: float | None = None, maximum: float | None = None) -> float:
    if key not in item:
        if required:
            raise SnapshotError(f"{where}: field '{key}' is missing")
        assert default is not None
        return default
    value = item[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SnapshotError(f"{where}: field '{key}' must be a number, got {_fmt(value)}")
    if isinstance(value, int) and abs(value) > 2**53:
        raise SnapshotError(f"{where}: field '{key}' is out of range, got {_fmt(value)}")
    if not math.isfinite(value):
        raise SnapshotError(f"{where}: field '{key}' must be finite, got {value}")
    if value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise SnapshotError(f"{where}: field '{key}' must be {bound}, got {value}")
    if minimum is not None and value < minimum:
        raise SnapshotError(f"{where}: field '{key}' must be at least {minimum:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise SnapshotError(f"{where}: field '{key}' must be at most {maximum:g}, got {value:g}")
    return float(value)


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# The same rule as a JSON-schema pattern (lone surrogates cannot be written in JSON Schema).
NAME_PATTERN = "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"


def check_name(value: Any) -> str | None:
    """Why ``value`` is not a usable name (None: it is).

    A name is 1..253 characters, not only blanks, without control characters (C0, DEL, C1)
    and without lone surrogates (they cannot be encoded, so they would break every later
    reply and the Prometheus exposition that shows the name).
    """
    if not isinstance(value, str) or not value.strip():
        return f"must be a non-empty string, got {_fmt(value)}"
    if len(value) > MAX_NAME:
        return f"must be at most {MAX_NAME} characters, got {len(value)}"
    bad = _UNPRINTABLE.search(value)
    if bad:
        return (f"must be printable text (no control characters or lone surrogates), "
                f"got {ascii(bad.group())} at character {bad.start()}")
    return None


def _string(where: str, item: Mapping[str, Any], key: str) -> str:
    value = item.get(key)
    if key not in item:
        raise SnapshotError(f"{where}: field '{key}' is missing")
    why = check_name(value)
    if why:
        raise SnapshotError(f"{where}: field '{key}' {why}")
    return value  # type: ignore[return-value]


def _enum(where: str, item: Mapping[str, Any], key: str, enum: type, default: Any) -> Any:
    if key not in item:
        return default
    value = item[key]
    allowed = [e.value for e in enum]
    if value not in allowed:
        raise SnapshotError(
            f"{where}: field '{key}' must be one of {', '.join(allowed)}, got {_fmt(value)}"
        )
    return enum(value)


def _list(where: str, item: Mapping[str, Any], key: str, *, required: bool = True) -> list[Any]:
    if key not in item:
        if required:
            raise SnapshotError(f"{where}: field '{key}' is missing")
        return []
    value = item[key]
    if not isinstance(value, list):
        raise SnapshotError(f"{where}: field '{key}' must be a list, got {type(value).__name__}")
    return value


def _names(where: str, item: Mapping[str, Any], key: str) -> frozenset[str]:
    """An optional list of non-empty strings (features, networks, datastores)."""
    values = _list(where, item, key, required=False)
    for v in values:
        if not isinstance(v, str) or not v.strip():
            raise SnapshotError(f"{where}: field '{key}' must hold non-empty strings, "
                                f"got {_fmt(v)}")
        why = check_name(v)
        if why:
            raise SnapshotError(f"{where}: field '{key}': each entry {why}")
    return frozenset(values)


def _optional_string(where: str, item: Mapping[str, Any], key: str) -> str | None:
    return _string(where, item, key) if key in item and item[key] is not None else None


def _labels(where: str, item: Mapping[str, Any], key: str) -> tuple[tuple[str, str], ...]:
    if key not in item:
        return ()
    value = item[key]
    if not isinstance(value, Mapping):
        raise SnapshotError(f"{where}: field '{key}' must be an object of strings")
    for k, v in value.items():
        why = check_name(k)
        if why:
            raise SnapshotError(f"{where}: field '{key}': a label name {why}")
        if not isinstance(v, str) or len(v) > MAX_NAME or _UNPRINTABLE.search(v):
            raise SnapshotError(f"{where}: field '{key}': label {ascii(k[:40])} must have a "
                                f"printable string value of at most {MAX_NAME} characters")
    return tuple(sorted(value.items()))


def _object(where: str, item: Any) -> Mapping[str, Any]:
    if not isinstance(item, Mapping):
        raise SnapshotError(f"{where}: must be an object, got {type(item).__name__}")
    return item


def _parse_host(i: int, raw: Any) -> Host:
    where = _where("hosts", i, raw)
    item = _object(where, raw)
    name = _string(where, item, "name")
    cpu = _number(where, item, "cpu_capacity", positive=True, minimum=MIN_HOST_CORES,
                  maximum=MAX_HOST_CORES)
    mem = _number(where, item, "mem_capacity_mb", positive=True, minimum=1, maximum=MAX_MEM_MB)
    state = _enum(where, item, "state", HostState, HostState.ACTIVE)
    return Host(name=name, cpu_capacity=round(cpu * 1000), mem_capacity=round(mem), state=state,
                cpu_model=_optional_string(where, item, "cpu_model"),
                cpu_features=_names(where, item, "cpu_features"),
                networks=_names(where, item, "networks"),
                datastores=_names(where, item, "datastores"),
                labels=_labels(where, item, "labels"))


def _parse_vm(i: int, raw: Any, hosts: set[str]) -> VM:
    where = _where("vms", i, raw)
    item = _object(where, raw)
    name = _string(where, item, "name")
    host = _string(where, item, "host")
    if host not in hosts:
        raise SnapshotError(f"{where}: field 'host': unknown host {_fmt(host)}")
    vcpus = _number(where, item, "vcpus", positive=True, maximum=MAX_VCPUS)
    if vcpus != int(vcpus):
        raise SnapshotError(f"{where}: field 'vcpus' must be a whole number, got {item['vcpus']}")
    mem = _number(where, item, "mem_mb", positive=True, minimum=1, maximum=MAX_MEM_MB)
    cpu_demand = _number(where, item, "cpu_demand", positive=False)
    mem_demand = _number(where, item, "mem_demand_mb", positive=False)
    if cpu_demand > vcpus:
        raise SnapshotError(
            f"{where}: field 'cpu_demand': {cpu_demand:g} is above the VM's size (vcpus={vcpus:g})"
        )
    if mem_demand > mem:
        raise SnapshotError(
            f"{where}: field 'mem_demand_mb': {mem_demand:g} is above the VM's size "
            f"(mem_mb={mem:g})"
        )
    automation = _enum(where, item, "automation", Automation, Automation.FULLY)
    local = item.get("local_storage", False)
    if not isinstance(local, bool):
        raise SnapshotError(f"{where}: field 'local_storage' must be true or false, "
                            f"got {_fmt(local)}")
    return VM(
        cpu_model=_optional_string(where, item, "cpu_model"),
        cpu_features=_names(where, item, "cpu_features"),
        networks=_names(where, item, "networks"),
        datastores=_names(where, item, "datastores"),
        local_storage=local,
        name=name,
        host=host,
        vcpus=int(vcpus),
        mem=round(mem),
        cpu_demand=round(cpu_demand * 1000),
        mem_demand=round(mem_demand),
        automation=automation,
    )


def _parse_rule(i: int, raw: Any, vms: set[str], host_list: list[Host]) -> Rule:
    hosts = {h.name for h in host_list}
    where = _where("rules", i, raw)
    item = _object(where, raw)
    name = _string(where, item, "name")
    rtype = _enum(where, item, "type", RuleType, None)
    if rtype is None:
        raise SnapshotError(f"{where}: field 'type' is missing")
    members = _list(where, item, "vms")
    for m in members:
        if not isinstance(m, str):
            raise SnapshotError(f"{where}: field 'vms' must hold VM names, got {_fmt(m)}")
        if m not in vms:
            raise SnapshotError(f"{where}: field 'vms': unknown VM {_fmt(m)}")
    if len(set(members)) != len(members):
        raise SnapshotError(f"{where}: field 'vms' names a VM twice")
    minimum = 1 if rtype is RuleType.VM_HOST else 2
    if len(members) < minimum:
        raise SnapshotError(f"{where}: field 'vms' needs at least {minimum} VM(s)")
    rule_hosts: list[Any] = []
    selector: tuple[tuple[str, str], ...] = ()
    if rtype is RuleType.VM_HOST:
        rule_hosts = list(_list(where, item, "hosts", required="host_labels" not in item))
        selector = _labels(where, item, "host_labels")
        if not rule_hosts and not selector:
            raise SnapshotError(f"{where}: field 'hosts' needs at least one host "
                                "(or give 'host_labels')")
        for h in rule_hosts:
            if not isinstance(h, str):
                raise SnapshotError(f"{where}: field 'hosts' must hold host names, got {_fmt(h)}")
            if h not in hosts:
                raise SnapshotError(f"{where}: field 'hosts': unknown host {_fmt(h)}")
        if selector:
            wanted = set(selector)
            matched = [h.name for h in host_list if wanted <= set(h.labels)]
            if not matched:
                text = ", ".join(f"{k}={v}" for k, v in selector)
                raise SnapshotError(f"{where}: field 'host_labels': no host has labels {text}")
            rule_hosts.extend(matched)
    elif ("hosts" in item and item["hosts"]) or "host_labels" in item:
        raise SnapshotError(f"{where}: fields 'hosts' and 'host_labels' only apply to "
                            "vm_host rules")
    mandatory = item.get("mandatory", True)
    if not isinstance(mandatory, bool):
        raise SnapshotError(f"{where}: field 'mandatory' must be true or false, "
                            f"got {_fmt(mandatory)}")
    return Rule(
        name=name,
        type=rtype,
        vms=tuple(sorted(members)),
        hosts=tuple(sorted(set(rule_hosts))),
        mandatory=mandatory,
        host_labels=selector,
    )


def _unique(kind: str, names: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise SnapshotError(f"{kind}[{i}] ({n}): field 'name': duplicate of {kind}[{seen[n]}]")
        seen[n] = i


def _check_contradictions(snapshot: ClusterSnapshot) -> None:
    """Mandatory rules that can never hold together are input errors, not solver work."""
    group = snapshot.affinity_groups()
    owner: dict[str, str] = {}
    for rule in snapshot.rules:
        if rule.type is RuleType.AFFINITY and rule.mandatory:
            for v in rule.vms:
                owner.setdefault(v, rule.name)
    for rule in snapshot.rules:
        if rule.type is RuleType.ANTI_AFFINITY and rule.mandatory:
            seen: dict[tuple[str, ...], str] = {}
            for v in rule.vms:
                if group[v] in seen:
                    raise SnapshotError(
                        f"rules ({rule.name}): field 'vms': {seen[group[v]]} and {v} must run "
                        f"apart here but together by affinity rule {owner.get(v, '?')}"
                    )
                seen[group[v]] = v
    allowed: dict[tuple[str, ...], set[str]] = {}
    culprit: dict[tuple[str, ...], list[str]] = {}
    for rule in snapshot.rules:
        if rule.type is RuleType.VM_HOST and rule.mandatory:
            for v in rule.vms:
                g = group[v]
                hosts = set(rule.hosts)
                allowed[g] = allowed[g] & hosts if g in allowed else hosts
                culprit.setdefault(g, []).append(rule.name)
                if not allowed[g]:
                    raise SnapshotError(
                        f"rules ({rule.name}): field 'hosts': no host satisfies all of the "
                        f"mandatory rules {', '.join(culprit[g])} for VM {v}"
                    )


def parse_snapshot(data: Any, *, mem_overcommit: float = 1.0) -> ClusterSnapshot:
    """Validate a decoded JSON document and build a ``ClusterSnapshot``."""
    doc = _object("snapshot", data)
    if "version" not in doc:
        raise SnapshotError("snapshot: field 'version' is missing (expected 1)")
    if doc["version"] != FORMAT_VERSION or isinstance(doc["version"], bool):
        raise SnapshotError(f"snapshot: field 'version' must be 1, got {_fmt(doc['version'])}")
    raw_hosts = _list("snapshot", doc, "hosts")
    raw_vms = _list("snapshot", doc, "vms")
    raw_rules = _list("snapshot", doc, "rules", required=False)

    hosts = [_parse_host(i, h) for i, h in enumerate(raw_hosts)]
    if not hosts:
        raise SnapshotError("snapshot: field 'hosts' is empty")
    _unique("hosts", [h.name for h in hosts])
    host_names = {h.name for h in hosts}
    vms = [_parse_vm(i, v, host_names) for i, v in enumerate(raw_vms)]
    _unique("vms", [v.name for v in vms])
    vm_names = {v.name for v in vms}
    rules = [_parse_rule(i, r, vm_names, hosts) for i, r in enumerate(raw_rules)]
    _unique("rules", [r.name for r in rules])

    active_mem = sum(h.mem_capacity for h in hosts if h.active) * mem_overcommit
    total_mem = sum(v.mem for v in vms)
    if total_mem > active_mem:
        raise SnapshotError(
            f"vms: field 'mem_mb': the VMs' configured memory ({total_mem} MiB) exceeds what all "
            f"active hosts can hold together ({active_mem:.0f} MiB)"
        )

    baseline = _names("snapshot", doc, "cpu_baseline") if "cpu_baseline" in doc else None
    snapshot = ClusterSnapshot(
        hosts=tuple(sorted(hosts, key=lambda h: h.name)),
        vms=tuple(sorted(vms, key=lambda v: v.name)),
        rules=tuple(sorted(rules, key=lambda r: r.name)),
        cpu_baseline=baseline,
    )
    _check_cpu(snapshot, hosts, vms)
    _check_contradictions(snapshot)
    return snapshot


def _check_cpu(snapshot: ClusterSnapshot, hosts: list[Host], vms: list[VM]) -> None:
    """CPU models must be known; with a cluster baseline, hosts must offer it and VMs fit it."""
    base = snapshot.cpu_baseline
    for i, vm in enumerate(vms):
        where = f"vms[{i}] ({vm.name})"
        if vm.cpu_model is not None and vm.cpu_model not in snapshot.model_features:
            raise SnapshotError(f"{where}: field 'cpu_model': no host has CPU model "
                                f"{vm.cpu_model!r}")
        if base is not None:
            need = vm.cpu_features | (snapshot.model_features.get(vm.cpu_model, frozenset())
                                      if vm.cpu_model else frozenset())
            outside = sorted(need - base)
            if outside:
                raise SnapshotError(f"{where}: field 'cpu_features': {outside[0]!r} is outside "
                                    "the cluster's cpu_baseline")
    if base is not None:
        for i, h in enumerate(hosts):
            missing = sorted(base - h.cpu_features)
            if h.active and missing:
                raise SnapshotError(f"hosts[{i}] ({h.name}): field 'cpu_features': lacks "
                                    f"{missing[0]!r} of the cluster's cpu_baseline")


def loads(text: str, *, source: str = "snapshot", mem_overcommit: float = 1.0) -> ClusterSnapshot:
    if not text.strip():
        raise SnapshotError(f"{source}: empty input (expected a snapshot v1 JSON document)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SnapshotError(
            f"{source}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    return parse_snapshot(data, mem_overcommit=mem_overcommit)


def load(path: str | Path, *, mem_overcommit: float = 1.0) -> ClusterSnapshot:
    text = read_text(path, SnapshotError)
    return loads(text, source=str(Path(path)), mem_overcommit=mem_overcommit)


def to_dict(snapshot: ClusterSnapshot) -> dict[str, Any]:
    """The snapshot as a v1 document (the inverse of ``parse_snapshot``)."""
    def num(x: float) -> float | int:
        return int(x) if float(x).is_integer() else x

    def compat(x: Host | VM) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if x.cpu_model is not None:
            out["cpu_model"] = x.cpu_model
        for key in ("cpu_features", "networks", "datastores"):
            if getattr(x, key):
                out[key] = sorted(getattr(x, key))
        return out

    doc: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "hosts": [
            {
                "name": h.name,
                "cpu_capacity": num(h.cpu_capacity / 1000),
                "mem_capacity_mb": h.mem_capacity,
                "state": h.state.value,
                **compat(h),
                **({"labels": dict(h.labels)} if h.labels else {}),
            }
            for h in snapshot.hosts
        ],
        "vms": [
            {
                "name": v.name,
                "host": v.host,
                "vcpus": v.vcpus,
                "mem_mb": v.mem,
                "cpu_demand": num(v.cpu_demand / 1000),
                "mem_demand_mb": v.mem_demand,
                "automation": v.automation.value,
                **compat(v),
                **({"local_storage": True} if v.local_storage else {}),
            }
            for v in snapshot.vms
        ],
        "rules": [
            {
                "name": r.name,
                "type": r.type.value,
                "vms": list(r.vms),
                **({"hosts": list(r.hosts)} if r.type is RuleType.VM_HOST else {}),
                "mandatory": r.mandatory,
            }
            for r in snapshot.rules
        ],
    }
    if snapshot.cpu_baseline is not None:
        doc["cpu_baseline"] = sorted(snapshot.cpu_baseline)
    return doc


def dumps(snapshot: ClusterSnapshot) -> str:
    return json.dumps(to_dict(snapshot), indent=1)
