"""Migration planner: a target placement (a list of moves) -> ordered, limited, safe waves.

Description
    A placement is not a plan. The planner orders the moves so that no host ever holds more
    configured memory than it has, counting a VM on both hosts while it migrates (the
    destination reserves the VM's memory when the migration starts; the source frees it only
    when the migration has completed). It is an event-driven list scheduler over estimated
    durations: at time ``t`` it walks the pending moves in priority order (evacuations first,
    then longest first, then by VM name) and starts every move whose destination has room for
    the VM's configured memory at that moment and whose hosts are below their limits on
    concurrent incoming and outgoing migrations, up to the cluster-wide limit; then it jumps
    to the next completion. The moves started at one event time form one *wave*.

    When nothing runs and no pending move fits, the remaining moves wait on each other in a
    cycle (full hosts swapping VMs). The planner breaks it by *parking*: it moves one VM of the
    cycle to a third host with room (allowed by the VM's mandatory VM-host rules, not holding a
    member of its mandatory anti-affinity groups), which frees room on the cycle; the VM
    continues from the parking host to its target once the park has completed. It prefers the
    VM whose departure lets another blocked move start, then the smallest one. When no VM of
    the cycle can be parked anywhere, the plan is reported as unplannable naming the hosts of
    the cycle (``UnplannableError``, an ``InfeasibleError``).

    Each move carries an estimated duration from the pre-copy migration-time model
    (``balancer.migration_model.estimate``: configured memory, link bandwidth, dirty rate,
    downtime limit, working set = the VM's memory demand), and the plan reports its estimated
    makespan.
Requirements
    The snapshot the moves start from (hosts' memory capacities, the VMs' hosts and sizes) and
    a final placement that fits every receiving host (as the engine's verifier guarantees).
Limitations
    Only memory is checked mid-way (CPU demand is allowed to peak while VMs move); affinity
    groups are split while their members move one by one. Concurrent migrations are assumed
    not to share a link (each gets ``bandwidth_mbps``); set the bandwidth to the link rate
    divided by the per-host limit when they do. List scheduling is a heuristic: the makespan
    is not minimal, and a cycle that could be broken by parking two VMs at once is reported
    unplannable. Each VM is parked at most once.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from balancer.errors import InfeasibleError, InputError
from balancer.migration_model import ModelParams, estimate
from balancer.model import ClusterSnapshot, HostState, Move, RuleType

PLAN_WAVES_VERSION = 1


class UnplannableError(InfeasibleError):
    """The moves cannot be ordered safely; ``culprits`` names the hosts (or VM) involved."""


@dataclass(frozen=True)
class PlannerLimits:
    max_incoming_per_host: int = 2
    max_outgoing_per_host: int = 2
    max_concurrent: int = 16
    mem_overcommit: float = 1.0
    bandwidth_mbps: float = 10000.0
    dirty_rate_mbps: float = 0.0
    downtime_ms: int = 300

    def __post_init__(self) -> None:
        for name in ("max_incoming_per_host", "max_outgoing_per_host", "max_concurrent"):
            if getattr(self, name) < 1:
                raise InputError(f"planner limits: field '{name}' must be >= 1")
        if self.mem_overcommit <= 0 or self.bandwidth_mbps <= 0 or self.dirty_rate_mbps < 0:
            raise InputError("planner limits: mem_overcommit and bandwidth_mbps must be > 0, "
                             "dirty_rate_mbps >= 0")


@dataclass(frozen=True)
class PlannedMigration:
    id: int  # position in the plan (execution order)
    wave: int
    vm: str
    source: str
    target: str
    mem_mb: int
    est_seconds: float
    start_s: float
    end_s: float
    kind: str = "move"  # move | park (to a third host) | unpark (from it to the target)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "vm": self.vm, "from": self.source, "to": self.target,
                "mem_mb": self.mem_mb, "est_seconds": round(self.est_seconds, 3),
                "start_s": round(self.start_s, 3), "end_s": round(self.end_s, 3),
                "kind": self.kind, "reason": self.reason}


@dataclass
class Waves:
    migrations: list[PlannedMigration]  # in execution order (wave, then priority)
    makespan_s: float
    limits: PlannerLimits = field(default_factory=PlannerLimits)
    parked: list[str] = field(default_factory=list)

    def grouped(self) -> list[list[PlannedMigration]]:
        out: list[list[PlannedMigration]] = []
        for m in self.migrations:
            if not out or out[-1][0].wave != m.wave:
                out.append([])
            out[-1].append(m)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "waves": [{"wave": g[0].wave, "start_s": round(g[0].start_s, 3),
                       "migrations": [m.to_dict() for m in g]} for g in self.grouped()],
            "makespan_s": round(self.makespan_s, 3),
            "planner": {"version": PLAN_WAVES_VERSION, "limits": asdict(self.limits),
                        "parked": list(self.parked)},
        }


@dataclass
class _Task:
    vm: str
    source: str
    target: str  # where this task moves the VM
    final: str  # where the VM must end (differs from target for a park)
    mem: int
    est: float
    kind: str
    reason: str
    prio: tuple[Any, ...] = ()
    wave: int = -1
    start: float = 0.0


def _estimate(mem: int, mem_demand: int, lim: PlannerLimits, params: ModelParams | None,
              vm: str) -> float:
    est = estimate(mem, lim.bandwidth_mbps, dirty_rate_mbps=lim.dirty_rate_mbps,
                   working_set_mb=mem_demand or None, downtime_ms=lim.downtime_ms, params=params)
    if not est.converges:
        raise UnplannableError(
            f"VM {vm}: a live migration would never converge at {lim.bandwidth_mbps:g} Mbit/s "
            f"with a dirty rate of {lim.dirty_rate_mbps:g} Mbit/s", culprits=[vm])
    return est.seconds


def make_waves(snapshot: ClusterSnapshot, moves: Iterable[Move],
               limits: PlannerLimits | None = None, *,
               params: ModelParams | None = None) -> Waves:
    """Order ``moves`` (from ``snapshot``'s placement) into waves; see the module docstring."""
    lim = limits or PlannerLimits()
    hosts = {h.name: h for h in snapshot.hosts}
    vms = {v.name: v for v in snapshot.vms}
    cap = {h.name: h.mem_capacity * lim.mem_overcommit for h in snapshot.hosts}
    used = dict.fromkeys(hosts, 0)
    where = {}
    for v in snapshot.vms:
        used[v.host] += v.mem
        where[v.name] = v.host
    tasks: list[_Task] = []
    seen: set[str] = set()
    for i, m in enumerate(moves):
        tag = f"migrations[{i}] ({m.vm})"
        vm = vms.get(m.vm)
        if vm is None:
            raise InputError(f"{tag}: field 'vm': unknown VM {m.vm!r}")
        if m.vm in seen:
            raise InputError(f"{tag}: field 'vm': the VM is moved twice")
        seen.add(m.vm)
        if m.source != vm.host:
            raise InputError(f"{tag}: field 'from': the plan says {m.source} but the snapshot "
                             f"has the VM on {vm.host}")
        dest = hosts.get(m.target)
        if dest is None:
            raise InputError(f"{tag}: field 'to': unknown host {m.target!r}")
        if dest.state is not HostState.ACTIVE:
            raise InputError(f"{tag}: field 'to': host {m.target} is {dest.state.value}")
        if m.target == m.source:
            raise InputError(f"{tag}: field 'to': same host as 'from'")
        est = _estimate(vm.mem, vm.mem_demand, lim, params, vm.name)
        evac = hosts[m.source].state is not HostState.ACTIVE
        tasks.append(_Task(vm.name, m.source, m.target, m.target, vm.mem, est, "move", m.reason,
                           prio=(0 if evac else 1, -est, vm.name)))
    final = dict(used)
    for t in tasks:
        final[t.source] -= t.mem
        final[t.target] += t.mem
    for t in tasks:
        if final[t.target] > cap[t.target]:
            raise UnplannableError(
                f"host {t.target}: would hold {final[t.target]} MiB of configured memory after "
                f"the plan, above its {cap[t.target]:.0f} MiB", culprits=[t.target])

    rules_vmhost: dict[str, list[set[str]]] = {}
    rules_anti: dict[str, list[tuple[str, ...]]] = {}
    for r in snapshot.rules:
        if not r.mandatory:
            continue
        for v in r.vms:
            if r.type is RuleType.VM_HOST:
                rules_vmhost.setdefault(v, []).append(set(r.hosts))
            elif r.type is RuleType.ANTI_AFFINITY:
                rules_anti.setdefault(v, []).append(r.vms)

    def may_park(vm: str, host: str) -> bool:
        if hosts[host].state is not HostState.ACTIVE:
            return False
        if any(host not in allowed for allowed in rules_vmhost.get(vm, ())):
            return False
        return not any(where[o] == host for grp in rules_anti.get(vm, ()) for o in grp
                       if o != vm)

    pending = sorted(tasks, key=lambda t: t.prio)
    inflight: list[tuple[float, int, _Task]] = []
    n_in = dict.fromkeys(hosts, 0)
    n_out = dict.fromkeys(hosts, 0)
    total = 0
    now = 0.0
    wave = -1
    order: list[_Task] = []
    parked: list[str] = []
    counter = 0
    while pending or inflight:
        started = False
        if total < lim.max_concurrent:
            keep: list[_Task] = []
            for i, t in enumerate(pending):
                if total >= lim.max_concurrent:
                    keep.extend(pending[i:])
                    break
                if (n_out[t.source] >= lim.max_outgoing_per_host
                        or n_in[t.target] >= lim.max_incoming_per_host
                        or used[t.target] + t.mem > cap[t.target]):
                    keep.append(t)
                    continue
                if not started:
                    wave += 1
                    started = True
                t.wave, t.start = wave, now
                used[t.target] += t.mem
                n_out[t.source] += 1
                n_in[t.target] += 1
                total += 1
                counter += 1
                heapq.heappush(inflight, (now + t.est, counter, t))
                order.append(t)
            pending = keep
        if inflight:
            end, _, t = heapq.heappop(inflight)
            done = [t]
            while inflight and inflight[0][0] <= end:
                done.append(heapq.heappop(inflight)[2])
            now = end
            for t in done:
                used[t.source] -= t.mem
                where[t.vm] = t.target
                n_out[t.source] -= 1
                n_in[t.target] -= 1
                total -= 1
                if t.kind == "park":
                    nxt = _Task(t.vm, t.target, t.final, t.final, t.mem, t.est, "unpark",
                                t.reason, prio=(0, -t.est, t.vm))
                    pending.append(nxt)
                    pending.sort(key=lambda x: x.prio)
        elif pending:
            _break_cycle(pending, used, cap, hosts, where, parked, may_park)
    makespan = now
    migrations = [
        PlannedMigration(id=i, wave=t.wave, vm=t.vm, source=t.source, target=t.target,
                         mem_mb=t.mem, est_seconds=t.est, start_s=t.start,
                         end_s=t.start + t.est, kind=t.kind, reason=t.reason)
        for i, t in enumerate(order)
    ]
    return Waves(migrations=migrations, makespan_s=makespan, limits=lim, parked=parked)


def _break_cycle(pending: list[_Task], used: dict[str, int], cap: dict[str, float],
                 hosts: Mapping[str, Any], where: dict[str, str], parked: list[str],
                 may_park: Any) -> None:
    """Nothing runs and nothing fits: park one VM of the cycle on a third host, or give up."""
    best: tuple[tuple[Any, ...], _Task, str] | None = None
    for t in pending:
        if t.kind != "move" or t.vm in parked:
            continue
        frees = any(o.target == t.source and used[t.source] - t.mem + o.mem <= cap[t.source]
                    for o in pending if o is not t)
        spots = [(cap[h] - used[h], h) for h in hosts
                 if h not in (t.source, t.target) and used[h] + t.mem <= cap[h]
                 and may_park(t.vm, h)]
        if not spots:
            continue
        room, spot = max(spots, key=lambda s: (s[0], [-ord(c) for c in s[1]]))
        key = (0 if frees else 1, t.mem, t.vm)
        if best is None or key < best[0]:
            best = (key, t, spot)
    if best is None:
        cycle = _find_cycle(pending)
        raise UnplannableError(
            f"hosts {', '.join(cycle)} wait on each other for memory (a swap of full hosts) and "
            f"no third host has room to park any of their VMs "
            f"({', '.join(sorted(t.vm for t in pending)[:5])}"
            f"{', ...' if len(pending) > 5 else ''})", culprits=cycle)
    _, t, spot = best
    parked.append(t.vm)
    t.target = spot
    t.kind = "park"
    t.prio = (0, -t.est, t.vm)
    pending.sort(key=lambda x: x.prio)


def _find_cycle(pending: list[_Task]) -> list[str]:
    out_edges: dict[str, list[str]] = {}
    for t in pending:
        out_edges.setdefault(t.source, []).append(t.target)
    start = sorted(out_edges)[0]
    path: list[str] = []
    pos: dict[str, int] = {}
    h: str | None = start
    while h is not None and h not in pos:
        pos[h] = len(path)
        path.append(h)
        nxt = sorted(out_edges.get(h, []))
        h = nxt[0] if nxt else None
    if h is None:
        return sorted({t.source for t in pending} | {t.target for t in pending})
    return path[pos[h]:]


def moves_from_plan(doc: Mapping[str, Any]) -> list[Move]:
    """The ``migrations`` of a ``balancer plan`` JSON document as ``Move`` values."""
    raw = doc.get("migrations")
    if not isinstance(raw, list):
        raise InputError("plan: field 'migrations' must be a list")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, Mapping):
            raise InputError(f"plan: migrations[{i}]: must be an object")
        for key in ("vm", "from", "to"):
            if not isinstance(m.get(key), str) or not m[key]:
                raise InputError(f"plan: migrations[{i}]: field '{key}' must be a non-empty "
                                 f"string, got {m.get(key)!r}")
        mem = m.get("mem_mb", 0)
        if isinstance(mem, bool) or not isinstance(mem, int | float) or mem < 0:
            raise InputError(f"plan: migrations[{i}] ({m['vm']}): field 'mem_mb' must be a "
                             f"number >= 0, got {mem!r}")
        out.append(Move(vm=m["vm"], source=m["from"], target=m["to"],
                        reason=str(m.get("reason", "")), mem=int(mem)))
    return out


def add_waves(plan_dict: Mapping[str, Any], snapshot: ClusterSnapshot,
              limits: PlannerLimits | None = None) -> dict[str, Any]:
    """``plan_dict`` (the JSON of ``balancer plan``) with waves, makespan and the snapshot.

    The snapshot is embedded (key ``snapshot``, format v1) so that ``balancer execute`` has the
    start placement and the hosts' capacities it needs to re-check room.
    """
    from balancer.snapshot import to_dict

    waves = make_waves(snapshot, moves_from_plan(plan_dict), limits)
    out = dict(plan_dict)
    out.update(waves.to_dict())
    out["snapshot"] = to_dict(snapshot)
    return out


def _num(where: str, m: Mapping[str, Any], key: str) -> float:
    value = m.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value < 0:
        raise InputError(f"{where}: field '{key}' must be a number >= 0, got {value!r}")
    return float(value)


def waves_from_plan(doc: Mapping[str, Any], snapshot: ClusterSnapshot) -> Waves:
    """Read back the ``waves`` of a plan document, validated against ``snapshot``."""
    raw = doc.get("waves")
    if not isinstance(raw, list):
        raise InputError("plan: field 'waves' must be a list")
    migrations: list[PlannedMigration] = []
    vm_at = {v.name: v.host for v in snapshot.vms}
    for w, wave in enumerate(raw):
        if not isinstance(wave, Mapping) or not isinstance(wave.get("migrations"), list):
            raise InputError(f"plan: waves[{w}]: field 'migrations' must be a list")
        for j, m in enumerate(wave["migrations"]):
            where = f"plan: waves[{w}].migrations[{j}]"
            if not isinstance(m, Mapping):
                raise InputError(f"{where}: must be an object")
            for key in ("vm", "from", "to"):
                if not isinstance(m.get(key), str):
                    raise InputError(f"{where}: field '{key}' must be a string, got "
                                     f"{m.get(key)!r}")
            if m["vm"] not in vm_at:
                raise InputError(f"{where}: field 'vm': unknown VM {m['vm']!r}")
            for key in ("from", "to"):
                if m[key] not in snapshot.host_index:
                    raise InputError(f"{where}: field '{key}': unknown host {m[key]!r}")
            kind = m.get("kind", "move")
            if kind not in ("move", "park", "unpark"):
                raise InputError(f"{where}: field 'kind' must be move, park or unpark, "
                                 f"got {kind!r}")
            vm = snapshot.vms[snapshot.vm_index[m["vm"]]]
            migrations.append(PlannedMigration(
                id=len(migrations), wave=w, vm=m["vm"], source=m["from"], target=m["to"],
                mem_mb=vm.mem, est_seconds=_num(where, m, "est_seconds"),
                start_s=_num(where, m, "start_s") if "start_s" in m else 0.0,
                end_s=_num(where, m, "end_s") if "end_s" in m else 0.0,
                kind=kind, reason=str(m.get("reason", ""))))
    # each VM's legs must chain: the first leaves from the snapshot host, each next one from
    # where the previous one went
    for m in migrations:
        if vm_at[m.vm] != m.source:
            raise InputError(f"plan: migration {m.id} ({m.vm}): field 'from': {m.source}, but "
                             f"the VM is on {vm_at[m.vm]} at that point of the plan")
        vm_at[m.vm] = m.target
    makespan = doc.get("makespan_s", max((m.end_s for m in migrations), default=0.0))
    return Waves(migrations=migrations, makespan_s=float(makespan))


def plan_fingerprint(waves: Waves) -> str:
    """A stable id for a plan's migrations (the journal keys its entries by it)."""
    import hashlib

    body = json.dumps([[m.vm, m.source, m.target, m.wave] for m in waves.migrations])
    return hashlib.sha256(body.encode()).hexdigest()[:16]
