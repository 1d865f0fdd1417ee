"""A time-stepped cluster simulator: hosts with a power model, VMs driven by a trace, migrations
that take time, and a replay policy called at a fixed interval.

Description
    Time advances one trace interval (``dt``, 300 s for the public traces) per step. At a cycle
    (every ``every`` steps) the policy sees what a real balancer would: the cluster and the demand
    observed up to the previous step (never the step about to happen), and answers with hosts to
    power on, hosts to put in standby (they are emptied and then switched off) and migrations.
    Then the step's demand is applied:

    * A VM's CPU demand is ``cpu_util x size`` (millicores); its memory in use is
      ``mem_util x configured memory`` (configured memory when the trace has no memory column).
    * A migration lasts ``T`` seconds: ``RAM / (bandwidth / 2)`` under the Beloglazov rule, or the
      pre-copy model of ``balancer.migration_model`` (idle guest). While it runs (share
      ``p = min(T_left, dt) / dt`` of the step) the VM keeps running on the source, its
      demand is reserved on the target (as CloudSim does), both hosts carry
      ``cpu_overhead x demand`` extra, and the VM loses ``degradation x demand`` (PDM). It lands
      on the target at the end of the step its copy finishes in.
    * A host draws ``P(min(load / capacity, 1))`` from its power model (linear idle-to-peak, or a
      table at 0, 10, ..., 100 % interpolated linearly). A powered-off host draws nothing; a host
      powering on draws idle power for ``boot_s`` and receives nothing until booted. With
      ``empty_host_off`` (CloudSim's accounting) a host that holds no VM draws nothing and is not
      active, whatever the policy did; within a step, a host whose last VMs migrate off it
      draws until the last of those migrations ends, and an empty host that receives one draws
      from when the first starts (CloudSim counts no energy for a host at 0 % CPU).
    * A host is overloaded in a step when its CPU load (demand plus migration load) exceeds its
      capacity.
Requirements
    A ``Trace`` (``simulator.traces``), a ``ClusterConfig`` and a replay policy
    (``simulator.replay_policies``). The engine is reached through ``balancer.service.plan``.
Limitations
    Aggregate CPU per host (no per-core packing); network contention between concurrent
    migrations is not modelled; a migration that has not finished when its VM's host is
    switched off cannot happen (standby hosts stay on until empty).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from balancer.errors import InputError
from balancer.executor.config import ExecutorConfig
from balancer.executor.journal import Journal, State
from balancer.executor.runner import Runner
from balancer.executor.simulated import SimulatedBackend
from balancer.migration_model import ModelParams
from balancer.migration_model import estimate as precopy_estimate
from balancer.model import (
    VM,
    Automation,
    ClusterSnapshot,
    Host,
    HostState,
    Move,
    Rule,
    RuleType,
)
from balancer.planner import PlannerLimits, make_waves
from simulator.metrics import StepLog, Summary, summarise
from simulator.traces import Trace

# ---------------------------------------------------------------- configuration


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise InputError(f"{where}: {msg}")


def build_dataclass(cls: type, data: dict[str, Any], where: str) -> Any:
    """``cls(**data)`` with field-named errors: unknown fields and wrong types are rejected."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a table of fields, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise InputError(f"{where}: field {key!r} is unknown "
                             f"(known: {', '.join(sorted(known))})")
    try:
        return cls(**data)
    except TypeError as exc:
        raise InputError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class PowerModel:
    """Watts at 0, 10, ..., 100 % CPU (11 points) or idle/peak (linear)."""

    idle_w: float = 0.0
    peak_w: float = 0.0
    table_w: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.table_w:
            t = tuple(float(x) for x in self.table_w)
            object.__setattr__(self, "table_w", t)
            _check(len(t) == 11, "power.table_w", f"needs 11 values (0..100 %), got {len(t)}")
            _check(all(math.isfinite(x) and x >= 0 for x in t), "power.table_w",
                   "values must be finite watts >= 0")
            _check(all(b >= a for a, b in zip(t, t[1:], strict=False)), "power.table_w",
                   "must not decrease with load")
        else:
            _check(math.isfinite(self.idle_w) and self.idle_w >= 0, "power.idle_w",
                   f"must be >= 0, got {self.idle_w}")
            _check(math.isfinite(self.peak_w) and self.peak_w >= self.idle_w, "power.peak_w",
                   f"must be >= idle_w, got {self.peak_w}")
            _check(self.peak_w > 0, "power.peak_w", "must be > 0 (or give table_w)")

    @property
    def idle(self) -> float:
        return self.table_w[0] if self.table_w else self.idle_w

    @property
    def peak(self) -> float:
        return self.table_w[-1] if self.table_w else self.peak_w

    def table(self) -> tuple[float, ...]:
        """Watts at 0, 10, ..., 100 % CPU (11 points)."""
        if self.table_w:
            return self.table_w
        return tuple(self.idle_w + (self.peak_w - self.idle_w) * i / 10 for i in range(11))

    def watts(self, util: np.ndarray) -> np.ndarray:
        u = np.clip(util, 0.0, 1.0)
        if self.table_w:
            return np.interp(u, np.linspace(0.0, 1.0, 11), np.asarray(self.table_w))
        return self.idle_w + (self.peak_w - self.idle_w) * u


@dataclass(frozen=True)
class HostType:
    name: str
    cores: float  # CPU capacity in cores (1 core = 1000 millicores)
    mem_mb: int
    power: PowerModel
    boot_s: float = 120.0

    def __post_init__(self) -> None:
        w = f"host type {self.name!r}"
        _check(math.isfinite(self.cores) and self.cores > 0, w, f"field 'cores' must be > 0, "
               f"got {self.cores}")
        _check(int(self.mem_mb) > 0, w, f"field 'mem_mb' must be > 0, got {self.mem_mb}")
        _check(math.isfinite(self.boot_s) and self.boot_s >= 0, w,
               f"field 'boot_s' must be >= 0, got {self.boot_s}")

    @property
    def millicores(self) -> int:
        return int(round(self.cores * 1000))


@dataclass(frozen=True)
class VmType:
    cores: float
    mem_mb: int


@dataclass(frozen=True)
class ClusterConfig:
    """Cluster and migration settings (configs/*.toml ``[cluster]``)."""

    host_types: tuple[HostType, ...]
    hosts: int = 16
    bandwidth_mbps: float = 10_000.0
    migration_time: str = "precopy"  # precopy | ram-over-half-bandwidth
    migration_degradation: float = 0.1
    migration_cpu_overhead: float = 0.1
    empty_host_off: bool = False
    memory_binding: bool = True
    mem_overcommit: float = 1.0
    initial_fill: float = 0.7
    # the executor's limits on concurrent migrations (balancer.executor LimitsConfig)
    migrations_per_host: int = 2  # incoming and outgoing, each
    migrations_concurrent: int = 16  # in the whole cluster
    # documented mapping for traces without sizes (PlanetLab): type = i // ceil(n / len(types))
    vm_types: tuple[VmType, ...] = (VmType(2.5, 870), VmType(2.0, 1740), VmType(1.0, 1740),
                                    VmType(0.5, 613))

    def __post_init__(self) -> None:
        _check(len(self.host_types) > 0, "cluster.host_types", "needs at least one host type")
        _check(isinstance(self.hosts, int) and self.hosts > 0, "cluster.hosts",
               f"must be a whole number > 0, got {self.hosts!r}")
        _check(math.isfinite(self.bandwidth_mbps) and self.bandwidth_mbps > 0,
               "cluster.bandwidth_mbps", f"must be > 0, got {self.bandwidth_mbps}")
        _check(self.migration_time in ("precopy", "ram-over-half-bandwidth"),
               "cluster.migration_time",
               f"must be 'precopy' or 'ram-over-half-bandwidth', got {self.migration_time!r}")
        _check(0 <= self.migration_degradation <= 1, "cluster.migration_degradation",
               f"must be in [0, 1], got {self.migration_degradation}")
        _check(0 <= self.migration_cpu_overhead <= 1, "cluster.migration_cpu_overhead",
               f"must be in [0, 1], got {self.migration_cpu_overhead}")
        _check(0.1 <= self.mem_overcommit <= 10, "cluster.mem_overcommit",
               f"must be in [0.1, 10], got {self.mem_overcommit}")
        _check(0 < self.initial_fill <= 1, "cluster.initial_fill",
               f"must be in (0, 1], got {self.initial_fill}")
        _check(len(self.vm_types) > 0, "cluster.vm_types", "needs at least one VM type")
        for name in ("migrations_per_host", "migrations_concurrent"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"cluster.{name}",
                   f"must be a whole number >= 1, got {v!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "cluster") -> ClusterConfig:
        data = dict(data)
        types = []
        for i, t in enumerate(data.pop("host_types", [])):
            w = f"{where}.host_types[{i}]"
            t = dict(t)
            power = t.pop("power", None)
            _check(isinstance(power, dict), w, "field 'power' is required (idle_w/peak_w or "
                   "table_w)")
            t["power"] = build_dataclass(PowerModel, dict(power), f"{w}.power")
            types.append(build_dataclass(HostType, t, w))
        vm_types = data.pop("vm_types", None)
        if vm_types is not None:
            vts = []
            for i, v in enumerate(vm_types):
                w = f"{where}.vm_types[{i}]"
                vt = build_dataclass(VmType, dict(v), w)
                _check(vt.cores > 0 and vt.mem_mb > 0, w, "cores and mem_mb must be > 0")
                vts.append(vt)
            data["vm_types"] = tuple(vts)
        data["host_types"] = tuple(types)
        return build_dataclass(cls, data, where)


DEFAULT_HOST_TYPES = (
    HostType("48c-384g", 48.0, 384 * 1024, PowerModel(idle_w=180.0, peak_w=450.0), 120.0),
    HostType("64c-512g", 64.0, 512 * 1024, PowerModel(idle_w=220.0, peak_w=560.0), 120.0),
    # for traces whose "VMs" are whole machines (Alibaba: 96 cores, 384 GiB normalised)
    HostType("128c-1024g", 128.0, 1024 * 1024, PowerModel(idle_w=300.0, peak_w=850.0), 120.0),
)
DEFAULT_HOST_TYPE = DEFAULT_HOST_TYPES[0]  # default cluster: the first type that holds the VMs


# ---------------------------------------------------------------- the VMs of a trace


@dataclass
class Workload:
    """VM sizes and per-step demand (millicores, MiB), from a trace."""

    names: tuple[str, ...]  # trace names, in trace order (VM i is ``vm-{i:05d}``)
    vcpus: np.ndarray  # cores
    mem_mb: np.ndarray  # configured memory
    cpu: np.ndarray  # (steps, vms) millicores, 0 where absent
    mem: np.ndarray  # (steps, vms) MiB in use
    interval_s: int


def workload_from_trace(trace: Trace, cfg: ClusterConfig) -> Workload:
    n = trace.n_vms
    if trace.vcpus is None:
        # documented mapping (CloudSim power package): contiguous blocks of the VM list
        k = len(cfg.vm_types)
        block = math.ceil(n / k)
        kinds = [min(i // block, k - 1) for i in range(n)]
        vcpus = np.array([cfg.vm_types[t].cores for t in kinds], dtype=float)
        mem_mb = np.array([cfg.vm_types[t].mem_mb for t in kinds], dtype=float)
    else:
        vcpus = np.asarray(trace.vcpus, dtype=float)
        mem_mb = np.asarray(trace.mem_mb, dtype=float)
    util = np.nan_to_num(trace.cpu_util, nan=0.0)
    cpu = np.rint(util * vcpus[None, :] * 1000.0)
    if trace.mem_util is None:
        mem = np.broadcast_to(mem_mb[None, :], util.shape).copy()
    else:
        mem = np.rint(np.nan_to_num(trace.mem_util, nan=0.0) * mem_mb[None, :])
    return Workload(names=trace.names, vcpus=vcpus, mem_mb=mem_mb, cpu=cpu, mem=mem,
                    interval_s=trace.interval_s)


# ---------------------------------------------------------------- what policies see


OFF, BOOTING, ON = 0, 1, 2


class ReplayContext:
    """The read-only view a replay policy gets each cycle, plus the engine to call.

    ``observed(k)`` is the demand of the last ``k`` observed steps (millicores, shape (k, vms));
    at step 0 it is the demand the initial placement was made with.
    """

    def __init__(self, sim: Simulator, step: int) -> None:
        self._sim = sim
        self.step = step
        self.seed = sim.seed
        self.interval_s = sim.work.interval_s
        hs = sim.host_types_of
        self.host_cpu = sim.host_cpu  # millicores
        self.host_mem = sim.host_mem  # MiB
        self.host_idle_w = np.array([h.power.idle for h in hs])
        self.host_peak_w = np.array([h.power.peak for h in hs])
        # watts at 0, 10, ..., 100 % CPU per host (the table, or idle..peak linear)
        self.host_power_table = [h.power.table() for h in hs]
        self.host_boot_s = sim.boot_s
        self.mem_overcommit = sim.cfg.mem_overcommit
        self.power = sim.power.copy()  # OFF / BOOTING / ON
        self.standby = sim.standby.copy()
        self.vm_host = sim.destination()  # where each VM is or is going
        self.migrating = sim.migrating_mask()
        # host-steps observed so far (steps before this one): overloaded, and active; what
        # a real balancer reads from its hosts' CPU saturation metrics
        self.overloaded_host_steps = sim.over_host_steps
        self.active_host_steps = sim.active_host_steps
        self.vm_mem = sim.work.mem_mb
        self.vm_cores = sim.work.vcpus  # configured size (cores) of each VM
        self.mem_binding = sim.cfg.memory_binding  # configured memory bounds placement
        self.mem_limit = sim.host_mem * sim.cfg.mem_overcommit
        self.n_hosts = len(self.host_cpu)
        self.n_vms = len(self.vm_mem)

    def observed(self, k: int) -> np.ndarray:
        w = self._sim.work
        end = max(self.step, 1)
        start = max(0, end - k)
        return w.cpu[start:end]

    def observed_mem(self) -> np.ndarray:
        w = self._sim.work
        return w.mem[max(self.step - 1, 0)]

    def host_load(self, cpu: np.ndarray) -> np.ndarray:
        return np.bincount(self.vm_host, weights=cpu, minlength=self.n_hosts)

    def vm_count(self) -> np.ndarray:
        return np.bincount(self.vm_host, minlength=self.n_hosts)

    def snapshot(self, hosts: list[int], cpu: np.ndarray, standby: set[int] | None = None,
                 keep_off: dict[int, list[int]] | None = None,
                 movable: set[int] | None = None) -> ClusterSnapshot:
        """Snapshot of ``hosts`` (every VM must be on one of them); migrating VMs are pinned at
        their target. Host names ``h-NNNN``, VM names ``vm-NNNNN`` (index order = name order).
        ``keep_off`` {host: [vms]} adds a mandatory VM-host rule per host that sends those VMs
        to any other active host of the snapshot (the engine must move them). With ``movable``,
        every other VM is marked manual (never moved this cycle)."""
        return self._sim.snapshot(hosts, cpu, standby or set(), keep_off or {}, movable)

    def plan(self, snapshot: ClusterSnapshot, **options: Any) -> list[tuple[int, int]]:
        """Run the engine's real cycle on ``snapshot``; returns (vm, target host) moves."""
        return self._sim.plan(snapshot, options)


# ---------------------------------------------------------------- the simulator


Planner = Callable[[ClusterSnapshot, dict[str, Any]], list[Any]]


@dataclass
class _Migration:
    vm: int
    src: int
    dst: int
    left_s: float  # until it ends, from the start of the current step
    start_s: float = 0.0  # until it starts (the runner's wave), from the start of the step


@dataclass
class RunResult:
    summary: Summary
    log: StepLog
    host_names: list[str]
    host_types: list[str]
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # the policy's own report


class Simulator:
    def __init__(self, work: Workload, cfg: ClusterConfig, policy: Any, *, every: int = 1,
                 seed: int = 0, planner: Planner | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        if every < 1:
            raise InputError("--interval: must be at least one trace step")
        self.work = work
        self.cfg = cfg
        self.policy = policy
        self.every = every
        self.seed = seed
        self.progress = progress
        if planner is None:
            from balancer.service import PlanOptions, plan

            def planner(snap: ClusterSnapshot, opts: dict[str, Any]) -> list[Any]:
                return plan(snap, PlanOptions(**opts)).moves
        self._planner = planner
        n_h = cfg.hosts
        self.host_types_of = [cfg.host_types[i % len(cfg.host_types)] for i in range(n_h)]
        self._type_ix = np.arange(n_h) % len(cfg.host_types)
        self.host_cpu = np.array([t.millicores for t in self.host_types_of], dtype=float)
        self.host_mem = np.array([t.mem_mb for t in self.host_types_of], dtype=float)
        self.boot_s = np.array([t.boot_s for t in self.host_types_of], dtype=float)
        self.power = np.full(n_h, ON, dtype=np.int64)
        self.boot_left = np.zeros(n_h)
        self.standby = np.zeros(n_h, dtype=bool)
        self.migrations: dict[int, _Migration] = {}
        self.plan_calls = 0
        self._step = 0
        self.plan_seconds = 0.0
        self.notes: list[str] = []
        self.failed_moves = 0  # moves the executor did not carry out
        self.over_host_steps = 0  # overloaded host-steps so far (policies may read them)
        self.active_host_steps = 0
        self.waves = 0
        self._exec: tuple[ExecutorConfig, PlannerLimits, ModelParams | None] | None = None
        n_v = len(work.names)
        self.host_names = [f"h-{i:04d}" for i in range(n_h)]
        self.vm_names = [f"vm-{j:05d}" for j in range(n_v)]
        self._vm_ix = {n: j for j, n in enumerate(self.vm_names)}
        self._host_ix = {n: i for i, n in enumerate(self.host_names)}
        self.vm_host = self.initial_placement()

    # -- placement -------------------------------------------------------------------------

    def snap_mem_capacity(self) -> np.ndarray:
        if self.cfg.memory_binding:
            return self.host_mem
        # like-for-like with CloudSim: RAM does not bound placement after creation
        big = max(float(self.work.mem_mb.sum()), float(self.host_mem.max())) + 1.0
        return np.full(len(self.host_mem), big)

    def initial_placement(self) -> np.ndarray:
        """First-fit decreasing of the step-0 demand onto hosts, most efficient host first,
        each filled to ``initial_fill`` of its CPU (and within memory when memory binds)."""
        w, cfg = self.work, self.cfg
        eff = self.host_cpu / np.array([t.power.peak for t in self.host_types_of])
        order_h = sorted(range(len(self.host_cpu)), key=lambda i: (-eff[i], i))
        cpu0 = w.cpu[0]
        order_v = sorted(range(len(cpu0)), key=lambda j: (-cpu0[j], -w.mem_mb[j], j))
        mem_cap = self.host_mem * cfg.mem_overcommit if cfg.memory_binding else \
            np.full(len(self.host_mem), np.inf)
        cpu_used = np.zeros(len(self.host_cpu))
        mem_used = np.zeros(len(self.host_cpu))
        place = np.full(len(cpu0), -1, dtype=np.int64)
        for j in order_v:
            for h in order_h:
                if (cpu_used[h] + cpu0[j] <= cfg.initial_fill * self.host_cpu[h]
                        and mem_used[h] + w.mem_mb[j] <= mem_cap[h]):
                    break
            else:  # nothing within the fill target: the host with the most free CPU that fits
                fits = [h for h in order_h if mem_used[h] + w.mem_mb[j] <= mem_cap[h]]
                if not fits:
                    raise InputError(
                        f"cluster: {cfg.hosts} hosts cannot hold the configured memory of "
                        f"{len(cpu0)} VMs ({w.mem_mb.sum() / 1024:.0f} GiB); add hosts "
                        "(--hosts) or raise cluster.mem_overcommit")
                h = max(fits, key=lambda i: (self.host_cpu[i] - cpu_used[i], -i))
            place[j] = h
            cpu_used[h] += cpu0[j]
            mem_used[h] += w.mem_mb[j]
        return place

    def destination(self) -> np.ndarray:
        d = self.vm_host.copy()
        for m in self.migrations.values():
            d[m.vm] = m.dst
        return d

    def migrating_mask(self) -> np.ndarray:
        mask = np.zeros(len(self.vm_host), dtype=bool)
        for v in self.migrations:
            mask[v] = True
        return mask

    def snapshot(self, hosts: list[int], cpu: np.ndarray, standby: set[int],
                 keep_off: dict[int, list[int]] | None = None,
                 movable: set[int] | None = None) -> ClusterSnapshot:
        dest = self.destination()
        mem_cap = self.snap_mem_capacity()
        hset = set(hosts)
        hs = []
        for i in sorted(hset):
            state = HostState.STANDBY if i in standby else HostState.ACTIVE
            hs.append(Host(self.host_names[i], int(self.host_cpu[i]), int(mem_cap[i]), state))
        mem_use = self.work.mem[max(self._step - 1, 0)]
        vms = []
        binding = self.cfg.memory_binding
        for j in range(len(dest)):
            h = int(dest[j])
            if h not in hset:
                continue
            mem = int(self.work.mem_mb[j])
            vms.append(VM(
                name=self.vm_names[j], host=self.host_names[h],
                vcpus=max(1, math.ceil(self.work.vcpus[j])), mem=mem,
                cpu_demand=int(cpu[j]),
                mem_demand=min(mem, int(mem_use[j])) if binding else 0,
                automation=Automation.MANUAL if (j in self.migrations or (
                    movable is not None and j not in movable)) else Automation.FULLY))
        rules = []
        receivers = [h.name for h in hs if h.state is HostState.ACTIVE]
        for h, vs in sorted((keep_off or {}).items()):
            allowed = tuple(n for n in receivers if n != self.host_names[h])
            names = tuple(self.vm_names[v] for v in sorted(vs) if v not in self.migrations)
            if names and allowed:
                rules.append(Rule(f"shed-{self.host_names[h]}", RuleType.VM_HOST, names,
                                  allowed, True))
        return ClusterSnapshot(hosts=tuple(hs), vms=tuple(vms), rules=tuple(rules))

    def plan(self, snap: ClusterSnapshot, options: dict[str, Any]) -> list[tuple[int, int]]:
        t0 = time.monotonic()
        opts = dict(options)
        opts.setdefault("seed", self.seed)
        if not self.cfg.memory_binding:
            opts["mem_overcommit"] = 1.0
        else:
            opts.setdefault("mem_overcommit", self.cfg.mem_overcommit)
        moves = self._planner(snap, opts)
        self.plan_calls += 1
        self.plan_seconds += time.monotonic() - t0
        return [(self._vm_ix[m.vm], self._host_ix[m.target]) for m in moves]

    # -- migrations -------------------------------------------------------------------------

    def migration_seconds(self, vm: int) -> float:
        """How long one migration of ``vm`` takes alone (the model the executor is given)."""
        bw, params = self._link()
        return float(precopy_estimate(float(self.work.mem_mb[vm]), bw, params=params).seconds)

    def _link(self) -> tuple[float, ModelParams | None]:
        """Bandwidth and model handed to the planner and the simulated backend: the CloudSim
        rule RAM / (bandwidth / 2) is the pre-copy model with no setup cost, full efficiency
        and half the bandwidth (an idle guest sends its memory once)."""
        bw = self.cfg.bandwidth_mbps
        if self.cfg.migration_time == "ram-over-half-bandwidth":
            return bw / 2.0, ModelParams(setup_s=0.0, efficiency=1.0)
        return bw, None

    def _executor(self) -> tuple[ExecutorConfig, PlannerLimits, ModelParams | None]:
        if self._exec is None:
            bw, params = self._link()
            per, conc = self.cfg.migrations_per_host, self.cfg.migrations_concurrent
            limits = PlannerLimits(max_incoming_per_host=per, max_outgoing_per_host=per,
                                   max_concurrent=conc, bandwidth_mbps=bw)
            cfg = ExecutorConfig.model_validate({
                "limits": {"max_incoming_per_host": per, "max_outgoing_per_host": per,
                           "max_concurrent": conc},
                "migration": {"bandwidth_mbps": bw, "poll_interval_s": 1.0,
                              "inventory_refresh_s": 0.0},
                "journal": {"path": ":memory:", "synchronous": "normal"},
                "simulated": {"seed": self.seed}})
            self._exec = (cfg, limits, params)
        return self._exec

    def execute(self, moves: list[tuple[int, int]]) -> list[_Migration]:
        """Carry out one cycle's moves on the production path: ``balancer.planner.make_waves``
        orders them into waves within the executor's limits, and the executor's ``Runner`` runs
        the waves through a ``SimulatedBackend`` holding the cluster as it is now (simulated
        clock from the start of this step). Returns the migrations that succeeded, with when
        each starts and ends (seconds from the start of the step)."""
        cfg, limits, params = self._executor()
        hosts = sorted({int(self.vm_host[v]) for v, _ in moves} | {h for _, h in moves})
        dest = self.destination()
        present = set(hosts)
        mem_cap = self.snap_mem_capacity()
        snap_hosts = tuple(
            Host(self.host_names[i], int(self.host_cpu[i]), int(mem_cap[i] * (
                1.0 if not self.cfg.memory_binding else self.cfg.mem_overcommit)),
                HostState.STANDBY if self.standby[i] else HostState.ACTIVE)
            for i in hosts)
        vms = []
        for j in np.flatnonzero(np.isin(dest, hosts) | np.isin(self.vm_host, hosts)):
            j = int(j)
            h = int(self.vm_host[j]) if j not in self.migrations else int(dest[j])
            if h not in present:
                continue
            mem = int(self.work.mem_mb[j])
            vms.append(VM(self.vm_names[j], self.host_names[h], max(1, math.ceil(
                self.work.vcpus[j])), mem, 0, 0))
        snap = ClusterSnapshot(hosts=snap_hosts, vms=tuple(vms), rules=())
        plan = [Move(self.vm_names[v], self.host_names[int(self.vm_host[v])],
                     self.host_names[h], "replay", int(self.work.mem_mb[v])) for v, h in moves]
        waves = make_waves(snap, plan, limits, params=params)
        backend = SimulatedBackend.from_snapshot(snap, cfg, params=params)
        journal = Journal(":memory:", synchronous="normal")
        try:
            runner = Runner(backend, journal, cfg, {h.name: h.mem_capacity for h in snap_hosts})
            result = runner.run(waves)
        finally:
            journal.close()
        # when each copy really ran (the backend's record; the runner sees the end at its
        # next poll, up to poll_interval_s later)
        ran = {m.vm: (m.start, m.end) for m in backend.migrations.values()
               if m.outcome == "completed"}
        backend.close()
        out = []
        for e in result.entries:
            if e.state is not State.SUCCEEDED or e.vm not in ran:
                self.failed_moves += 1
                continue
            v = self._vm_ix[e.vm]
            start, end = ran[e.vm]
            out.append(_Migration(v, self._host_ix[e.source], self._host_ix[e.target],
                                  left_s=float(end), start_s=float(start)))
        self.waves += len(waves.grouped())
        return out

    # -- one replay -------------------------------------------------------------------------

    def _apply(self, d: Any, stats: dict[str, float]) -> None:
        n_h = len(self.host_cpu)
        for h in d.power_on:
            if not 0 <= h < n_h:
                raise ValueError(f"policy powered on unknown host {h}")
            self.standby[h] = False
            if self.power[h] == OFF:
                if self.boot_s[h] > 0:
                    self.power[h] = BOOTING
                    self.boot_left[h] = self.boot_s[h]
                else:
                    self.power[h] = ON
        for h in d.wake:
            self.standby[h] = False
        for h in d.standby:
            if self.power[h] == ON:
                self.standby[h] = True
        todo = []
        for v, h in d.moves:
            if v in self.migrations:
                continue  # already moving: the engine saw it pinned
            if self.power[h] != ON or self.standby[h]:
                raise ValueError(f"policy moved {self.vm_names[v]} to {self.host_names[h]}, "
                                 "which cannot receive")
            if int(self.vm_host[v]) != h:
                todo.append((int(v), int(h)))
        for m in self.execute(todo) if todo else []:
            self.migrations[m.vm] = m
            stats["migrations"] += 1
            stats["moved_gb"] += float(self.work.mem_mb[m.vm]) / 1024.0

    def run(self, name: str) -> RunResult:
        w, cfg = self.work, self.cfg
        steps, n_v = w.cpu.shape
        n_h = len(self.host_cpu)
        dt = float(w.interval_s)
        log = StepLog(interval_s=w.interval_s)
        t_start = time.monotonic()
        deg, ovh = cfg.migration_degradation, cfg.migration_cpu_overhead
        mem_cap = self.host_mem
        for t in range(steps):
            self._step = t
            stats = {"migrations": 0.0, "moved_gb": 0.0}
            plan_before = self.plan_seconds
            if t % self.every == 0:
                decision = self.policy.decide(ReplayContext(self, t))
                self._apply(decision, stats)
            cpu = w.cpu[t]
            load = np.bincount(self.vm_host, weights=cpu, minlength=n_h)
            memu = np.bincount(self.vm_host, weights=w.mem[t], minlength=n_h)
            lost = 0.0
            incoming = np.zeros(n_h, dtype=bool)
            done = []
            leaving = np.zeros(n_h)  # VMs whose migration off the host ends in this step
            left_at = np.zeros(n_h)  # ... the last of those ends (s into the step)
            in_from = np.full(n_h, dt)  # the first migration into the host starts
            for m in self.migrations.values():
                if m.left_s <= dt + 1e-9:
                    leaving[m.src] += 1
                    left_at[m.src] = max(left_at[m.src], m.left_s)
                in_from[m.dst] = min(in_from[m.dst], m.start_s)
                p = max(0.0, min(m.left_s, dt) - m.start_s) / dt  # share of the step it runs
                dv = cpu[m.vm]
                load[m.dst] += dv * p * (1.0 + ovh)
                load[m.src] += dv * p * ovh
                memu[m.dst] += w.mem[t][m.vm] * p
                lost += deg * dv * p
                incoming[m.dst] = True
                m.left_s -= dt
                m.start_s = max(0.0, m.start_s - dt)
                if m.left_s <= 1e-9:
                    done.append(m.vm)
            # accounting for this step
            n_on = np.bincount(self.vm_host, minlength=n_h)
            holds = n_on > 0
            powered = self.power != OFF
            share = np.ones(n_h)  # of the step a host draws power
            if cfg.empty_host_off:
                drawing = powered & (holds | incoming | (self.power == BOOTING))
                # CloudSim's accounting: a host draws until its last VM has left (the end of
                # the last migration off it) and from the first migration into it
                emptied = holds & (n_on <= leaving) & (self.power == ON)
                share[emptied] = left_at[emptied] / dt
                fills = incoming & (self.power == ON)
                share[fills & ~holds] = 0.0
                share[fills] = np.maximum(share[fills], 1.0 - in_from[fills] / dt)
            else:
                drawing = powered
            active = drawing & (self.power == ON)
            util = load / self.host_cpu
            watts = np.zeros(n_h)
            for k, ht in enumerate(cfg.host_types):
                sel = (self._type_ix == k) & drawing
                if sel.any():
                    u = np.where(self.power[sel] == BOOTING, 0.0, util[sel])
                    watts[sel] = ht.power.watts(u) * share[sel]
            over = active & (load > self.host_cpu + 1e-9)
            self.over_host_steps += int(over.sum())
            self.active_host_steps += int(active.sum())
            unmet = np.maximum(load - self.host_cpu, 0.0)[active].sum()
            au = util[active]
            amu = (memu / mem_cap)[active]
            imbalance = float(np.std(au) + (np.std(amu) if cfg.memory_binding else 0.0)) \
                if au.size else 0.0
            row = np.where(active, util, np.nan).astype(np.float32)
            log.host_util.append(row)
            log.add(step=t, time_s=t * dt, active_hosts=int(active.sum()),
                    overloaded_hosts=int(over.sum()), power_w=float(watts.sum()),
                    cpu_demand_cores=float(cpu.sum()) / 1000.0, cpu_lost_cores=lost / 1000.0,
                    cpu_unmet_cores=float(unmet) / 1000.0, migrations=stats["migrations"],
                    moved_gb=stats["moved_gb"], imbalance=imbalance,
                    cpu_util_mean=float(au.mean()) if au.size else 0.0,
                    cpu_util_max=float(au.max()) if au.size else 0.0,
                    plan_seconds=self.plan_seconds - plan_before)
            # end of step: land migrations, finish boots, switch off emptied standby hosts
            for v in done:
                m = self.migrations.pop(v)
                self.vm_host[v] = m.dst
            booting = self.power == BOOTING
            self.boot_left[booting] -= dt
            self.power[booting & (self.boot_left <= 0)] = ON
            holds = np.bincount(self.destination(), minlength=n_h) > 0
            off_now = self.standby & ~holds
            self.power[off_now] = OFF
            self.standby[off_now] = False
            if self.progress:
                self.progress(1)
        seconds = time.monotonic() - t_start
        summary = summarise(name, log, seconds, self.plan_calls)
        extra: dict[str, Any] = {"waves": self.waves, "failed_moves": self.failed_moves}
        report = getattr(self.policy, "report", None)
        if callable(report):
            extra.update(report())
        return RunResult(summary=summary, log=log, host_names=self.host_names,
                         host_types=[h.name for h in self.host_types_of], notes=self.notes,
                         extra=extra)
