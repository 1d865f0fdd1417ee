"""Consolidate: power management like VMware DPM, on top of the engine's real cycle.

Description
    Each cycle, with each VM's demand estimated as the peak of its last ``window`` observed
    steps (D = total estimate, C = CPU capacity of the hosts that are on or booting):

    1. Power on, before hosts are needed: if ``D > high_util x C`` (or a host is hot and
       ``D > target_util x C``), wake standby hosts still holding VMs (no boot), then switch on
       the most power-efficient hosts that are off (capacity per peak watt; ties by index),
       until ``D <= target_util x C``.
    2. Power off, with hysteresis: if ``D < low_util x C``, put in standby up to
       ``max_power_off`` hosts per cycle whose removal keeps ``D <= target_util x C``, least
       efficient first, then those holding the least memory to move; never a host switched on
       less than ``min_on_cycles`` cycles ago. Empty hosts not needed are switched off at once.
       With memory binding, configured memory must also stay under ``mem_target`` of the memory
       of the hosts on. DPM does the same with its target utilisation range (63 % +- 18 %).
    3. Call the engine only when something needs doing (as DRS does): a standby host to empty,
       or a *hot* host (estimated load above ``hot_above`` of its capacity). The engine
       (``balancer.service.plan`` through the context; CP-SAT LNS stopped by ``max_iterations``
       and ``max_dtime``, so replays are deterministic) sees the hot and standby hosts plus the
       coolest hosts, enough of them to take the evacuated VMs and ``relief_hosts`` per hot
       host; with ``only_hot`` it may move only the VMs of hot and standby hosts (the others are
       marked manual for the cycle). It evacuates the standby hosts (mandatory moves) and moves
       VMs off hot hosts where the migration ``threshold`` says the balance gained pays for the
       memory moved; receiving hosts stay under ``1 - cpu_headroom``.
    4. Before an evacuation is asked for, a best-fit-decreasing check makes sure the VMs fit in
       the receivers' headroom (CPU, and memory when it binds); if not, the standby is
       cancelled, so the engine is never handed an infeasible evacuation.
    ``shed_hot`` (off by default) instead forces hot hosts to shed chosen VMs through mandatory
    VM-host rules; it is slower on the current engine (see docs/replay.md).
Requirements
    A context exposing host power states and capacities, the observed demand and the engine.
Limitations
    Reactive plus headroom, not predictive: a burst larger than the headroom within one
    interval overloads a host until the next cycle. Host efficiency is read from peak power.
    Follows VMware DPM (Distributed Power Management) and Beloglazov & Buyya (2012) on the
    trade-off between energy and SLA violations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from balancer.errors import InfeasibleError
from simulator.replay_policies import ON, Context, Decision, _need, estimate, register

OFF = 0


@dataclass(frozen=True)
class ConsolidateArgs:
    target_util: float = 0.7  # keep estimated demand / capacity of the hosts on at most this
    high_util: float = 0.8  # power on above this
    low_util: float = 0.55  # power off below this
    cpu_headroom: float = 0.15  # receiving hosts stay under 1 - cpu_headroom (estimated demand)
    relief_hosts: int = 3  # the engine sees hot/evacuated hosts + this many cool hosts per hot one
    shed_hot: bool = False  # hot hosts must shed VMs (mandatory VM-host rules; slow, see docs)
    only_hot: bool = True  # the engine may move only VMs of hot, evacuated or shedding hosts
    hot_above: float = 0.9  # a host whose estimated load exceeds this share is hot: plan
    max_balance_moves: int | None = None  # per cycle, on top of the evacuation moves
    window: int = 3  # demand estimate: peak of the last `window` observed steps
    mem_target: float = 0.9  # memory binding: configured memory / memory of hosts on, at most
    max_power_off: int = 2  # hosts put in standby per cycle
    min_on_cycles: int = 6  # a host switched on stays on at least this many cycles
    threshold: int = 2  # engine migration threshold inside the relief subset
    rebalance_std: float = 0.0  # also plan when host CPU util std exceeds this (0: never)
    max_iterations: int = 5
    max_dtime: float = 1.0  # CP-SAT deterministic time per cycle (deterministic stop)
    time_limit: float = 60.0
    solver: str = "cpsat"

    def __post_init__(self) -> None:
        _need(isinstance(self.max_dtime, (int, float)) and math.isfinite(self.max_dtime)
              and self.max_dtime > 0, f"field 'max_dtime' must be > 0, got {self.max_dtime!r}")
        for name in ("target_util", "high_util", "low_util", "hot_above", "mem_target"):
            v = getattr(self, name)
            _need(isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= 1,
                  f"field '{name}' must be in (0, 1], got {v!r}")
        _need(self.low_util < self.target_util <= self.high_util,
              f"fields 'low_util' < 'target_util' <= 'high_util' must hold, got "
              f"{self.low_util} / {self.target_util} / {self.high_util}")
        _need(isinstance(self.cpu_headroom, (int, float)) and 0 <= self.cpu_headroom < 1,
              f"field 'cpu_headroom' must be in [0, 1), got {self.cpu_headroom!r}")
        for name in ("window", "max_iterations"):
            v = getattr(self, name)
            _need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                  f"field '{name}' must be a whole number >= 1, got {v!r}")
        _need(isinstance(self.only_hot, bool),
              f"field 'only_hot' must be true or false, got {self.only_hot!r}")
        _need(isinstance(self.shed_hot, bool),
              f"field 'shed_hot' must be true or false, got {self.shed_hot!r}")
        _need(self.max_balance_moves is None or (isinstance(self.max_balance_moves, int)
                                                 and self.max_balance_moves >= 0),
              f"field 'max_balance_moves' must be a whole number >= 0, "
              f"got {self.max_balance_moves!r}")
        for name in ("max_power_off", "min_on_cycles", "relief_hosts"):
            v = getattr(self, name)
            _need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                  f"field '{name}' must be a whole number >= 0, got {v!r}")
        _need(self.threshold in (1, 2, 3, 4, 5) and not isinstance(self.threshold, bool),
              f"field 'threshold' must be 1..5, got {self.threshold!r}")
        _need(isinstance(self.rebalance_std, (int, float)) and self.rebalance_std >= 0,
              f"field 'rebalance_std' must be >= 0, got {self.rebalance_std!r}")
        _need(isinstance(self.time_limit, (int, float)) and self.time_limit > 0,
              f"field 'time_limit' must be > 0, got {self.time_limit!r}")
        _need(self.solver in ("cpsat", "greedy"),
              f"field 'solver' must be 'cpsat' or 'greedy', got {self.solver!r}")


def fits(moving: list[int], est: np.ndarray, room: dict[int, float],
         mem: np.ndarray | None = None, mem_room: dict[int, float] | None = None) -> bool:
    """Best-fit decreasing of ``moving`` VMs into the free CPU ``room`` of receiving hosts (and
    the free configured memory ``mem_room`` when memory binds).

    A cheap sufficient check run before asking the engine for mandatory moves, so the engine is
    never handed an evacuation that cannot fit (its infeasibility proof is costly).
    """
    free = dict(room)
    mfree = dict(mem_room) if mem_room is not None else None
    for v in sorted(moving, key=lambda x: (-est[x], x)):
        best = None
        for h, f in free.items():
            if f < est[v]:
                continue
            if mfree is not None and mem is not None and mfree.get(h, 0.0) < mem[v]:
                continue
            if best is None or f < free[best]:
                best = h
        if best is None:
            return False
        free[best] -= float(est[v])
        if mfree is not None and mem is not None:
            mfree[best] -= float(mem[v])
    return True


def shed_choice(vms: list[int], est: np.ndarray, mem: np.ndarray, excess: float) -> list[int]:
    """VMs to move off a host to remove ``excess`` estimated demand, moving little memory.

    Repeatedly takes, among the VMs whose demand covers what is left, the one with the least
    memory (the quickest to migrate, as Beloglazov's MMT selection); when none covers it, the VM
    with the most demand per MiB. Ties by index, so the choice is deterministic.
    """
    left = excess
    pool = sorted(vms)
    chosen: list[int] = []
    while left > 0 and pool:
        cover = [v for v in pool if est[v] >= left]
        if cover:
            v = min(cover, key=lambda x: (mem[x], -est[x], x))
        else:
            v = max(pool, key=lambda x: (est[x] / max(mem[x], 1.0), -x))
            if est[v] <= 0:
                break
        chosen.append(v)
        pool.remove(v)
        left -= float(est[v])
    return chosen


@register
class Consolidate:
    name: ClassVar[str] = "consolidate"
    Args = ConsolidateArgs

    def __init__(self, args: ConsolidateArgs | None = None) -> None:
        self.args = args or ConsolidateArgs()
        self._on_since: dict[int, int] = {}
        self._cycle = 0

    def _options(self) -> dict[str, Any]:
        a = self.args
        return {"threshold": a.threshold, "cpu_headroom": a.cpu_headroom,
                "max_iterations": a.max_iterations, "max_dtime": a.max_dtime,
                "time_limit": a.time_limit, "solver": a.solver}

    def decide(self, ctx: Context) -> Decision:
        a = self.args
        self._cycle += 1
        cyc = self._cycle
        n_h = ctx.n_hosts
        est = estimate(ctx, a.window)
        cap = np.asarray(ctx.host_cpu, dtype=float)
        vm_mem = np.asarray(ctx.vm_mem, dtype=float)
        load = ctx.host_load(est)
        count = np.bincount(ctx.vm_host, minlength=n_h)
        mem = np.bincount(ctx.vm_host, weights=vm_mem, minlength=n_h)
        eff = cap / np.maximum(np.asarray(ctx.host_peak_w, dtype=float), 1e-9)
        power = ctx.power
        standby = np.asarray(ctx.standby, dtype=bool).copy()
        total = float(est.sum())
        mem_bind = bool(getattr(ctx, "mem_binding", False))
        mem_lim = np.asarray(getattr(ctx, "mem_limit", np.zeros(n_h)), dtype=float)
        total_mem = float(vm_mem.sum()) if mem_bind else 0.0
        power_on: list[int] = []
        wake: list[int] = []
        new_standby: list[int] = []
        # Hosts that count as capacity: on or booting, not in standby. Empty hosts that are on
        # are kept only while they are needed; the rest go to standby (off at once: empty).
        live = [h for h in range(n_h) if power[h] != OFF and not standby[h] and count[h] > 0]
        cap_live = float(cap[live].sum())
        mem_live = float(mem_lim[live].sum())

        def short(c: float, m: float, util: float) -> bool:  # too little capacity switched on
            return total > util * c or (mem_bind and total_mem > a.mem_target * m)
        empty = sorted((h for h in range(n_h) if power[h] != OFF and not standby[h]
                        and count[h] == 0), key=lambda h: (-eff[h], h))
        for h in empty:
            if short(cap_live, mem_live, a.target_util) or (power[h] != ON) or \
                    cyc - self._on_since.get(h, -10**9) < a.min_on_cycles:
                live.append(h)
                cap_live += float(cap[h])
                mem_live += float(mem_lim[h])
            else:
                new_standby.append(h)
        hot = [h for h in live if power[h] == ON and load[h] > a.hot_above * cap[h]]
        if short(cap_live, mem_live, a.high_util) or (hot and total > a.target_util * cap_live):
            # wake standby hosts still holding VMs (no boot), then switch on the most
            # efficient hosts that are off, until the target holds again
            for h in sorted(np.flatnonzero(standby & (count > 0)).tolist(),
                            key=lambda h: (-eff[h], h)):
                if not short(cap_live, mem_live, a.target_util):
                    break
                wake.append(h)
                standby[h] = False
                cap_live += float(cap[h])
                mem_live += float(mem_lim[h])
                live.append(h)
            for h in sorted((h for h in range(n_h) if power[h] == OFF or h in new_standby),
                            key=lambda h: (-eff[h], h)):
                if not short(cap_live, mem_live, a.target_util):
                    break
                if h in new_standby:
                    new_standby.remove(h)
                else:
                    power_on.append(h)
                    self._on_since[h] = cyc
                cap_live += float(cap[h])
                mem_live += float(mem_lim[h])
                live.append(h)
        elif total < a.low_util * cap_live:
            cands = [h for h in live if power[h] == ON and count[h] > 0
                     and cyc - self._on_since.get(h, -10**9) >= a.min_on_cycles]
            cands.sort(key=lambda h: (eff[h], mem[h], load[h], h))
            n_off = 0
            for h in cands:
                if n_off >= a.max_power_off:
                    break
                if not short(cap_live - float(cap[h]), mem_live - float(mem_lim[h]),
                             a.target_util):
                    new_standby.append(h)
                    standby[h] = True
                    cap_live -= float(cap[h])
                    mem_live -= float(mem_lim[h])
                    live.remove(h)
                    n_off += 1
        # what the engine sees: hosts on (booting ones cannot receive yet)
        evacuate = {h for h in range(n_h) if standby[h] and count[h] > 0}
        on_hosts = sorted({h for h in live if power[h] == ON} | evacuate)
        receivers = [h for h in on_hosts if h not in evacuate]
        shed: dict[int, list[int]] = {}
        for h in receivers if a.shed_hot else []:
            if load[h] > a.hot_above * cap[h]:
                vms = [int(v) for v in np.flatnonzero(ctx.vm_host == h) if not ctx.migrating[v]]
                target = (1.0 - a.cpu_headroom) * cap[h]
                chosen = shed_choice(vms, est, vm_mem, float(load[h] - target))
                if chosen:
                    shed[h] = chosen
        room = {h: (1.0 - a.cpu_headroom) * cap[h] - load[h] for h in receivers}
        mroom = {h: mem_lim[h] - mem[h] for h in receivers} if mem_bind else None
        evac_vms = [int(v) for v in np.flatnonzero(np.isin(ctx.vm_host, list(evacuate)))
                    if not ctx.migrating[v]]
        if evacuate and not fits(evac_vms, est, room, vm_mem, mroom):
            # cannot empty them all: keep the freshest standby hosts on
            for h in [x for x in new_standby if x in evacuate]:
                new_standby.remove(h)
                evacuate.discard(h)
            wake.extend(sorted(evacuate))
            evacuate = set()
            evac_vms = []
            on_hosts = sorted({h for h in live if power[h] == ON} | set(wake))
            receivers = on_hosts
            room = {h: (1.0 - a.cpu_headroom) * cap[h] - load[h] for h in receivers}
            shed = {}
        if shed and not fits(evac_vms + [v for vs in shed.values() for v in vs], est,
                             {h: r for h, r in room.items() if h not in shed}, vm_mem,
                             None if mroom is None else
                             {h: r for h, r in mroom.items() if h not in shed}):
            shed = {}
        need = bool(evacuate) or bool(shed) or any(load[h] > a.hot_above * cap[h]
                                                    for h in receivers)
        if not need and a.rebalance_std > 0 and receivers:
            u = load[receivers] / cap[receivers]
            need = float(np.std(u)) > a.rebalance_std
        moves: list[tuple[int, int]] = []
        if need and len(receivers) > 0:
            n_forced = len(evac_vms) + sum(len(v) for v in shed.values())
            hot_r = [h for h in receivers if load[h] > a.hot_above * cap[h]]
            subset = self._subset(a, receivers, hot_r, evacuate, evac_vms, est, load, cap,
                                  vm_mem, mem, mem_lim if mem_bind else None)
            moves = self._plan(ctx, subset, est, evacuate, shed, new_standby, wake, n_forced)
        return Decision(power_on=tuple(power_on), standby=tuple(new_standby), wake=tuple(wake),
                        moves=tuple(moves))

    @staticmethod
    def _subset(a: ConsolidateArgs, receivers: list[int], hot: list[int], evacuate: set[int],
                evac_vms: list[int], est: np.ndarray, load: np.ndarray, cap: np.ndarray,
                vm_mem: np.ndarray, mem: np.ndarray, mem_lim: np.ndarray | None) -> list[int]:
        """The hosts the engine sees: hot and evacuated hosts plus the coolest receivers, enough
        of them to take the evacuated VMs and ``relief_hosts`` per hot host. Planning on this
        subset keeps the engine from reshuffling the whole cluster (every move costs).
        With ``relief_hosts = 0`` the engine sees every host."""
        if a.relief_hosts == 0:
            return sorted(set(receivers) | evacuate)
        cool = sorted((h for h in receivers if h not in set(hot)),
                      key=lambda h: (load[h] / cap[h], h))
        k = min(len(cool), a.relief_hosts * len(hot))
        limit = 1.0 - a.cpu_headroom
        while k < len(cool):
            room = {h: limit * cap[h] - load[h] for h in cool[:k]}
            mroom = None if mem_lim is None else {h: mem_lim[h] - mem[h] for h in cool[:k]}
            if evac_vms == [] or fits(evac_vms, est, room, vm_mem, mroom):
                break
            k += 1
        return sorted(set(hot) | evacuate | set(cool[:k]))

    def _plan(self, ctx: Context, hosts: list[int], est: np.ndarray, evacuate: set[int],
              shed: dict[int, list[int]], new_standby: list[int], wake: list[int],
              n_forced: int = 0) -> list[tuple[int, int]]:
        opts = self._options()
        if self.args.max_balance_moves is not None:
            opts["max_migrations"] = n_forced + self.args.max_balance_moves
        a = self.args
        est_load = ctx.host_load(est)
        hot = [h for h in hosts if h not in evacuate
               and est_load[h] > a.hot_above * ctx.host_cpu[h]]
        moving = {int(v) for v in np.flatnonzero(np.isin(ctx.vm_host, list(evacuate) + hot))}
        shed_vms = {v for vs in shed.values() for v in vs}
        only = a.only_hot
        try:
            return ctx.plan(ctx.snapshot(hosts, est, evacuate, shed,
                                         (moving | shed_vms) if only else None), **opts)
        except InfeasibleError:
            pass
        try:  # the shedding does not fit: evacuate only
            return ctx.plan(ctx.snapshot(hosts, est, evacuate, None, moving if only else None),
                            **opts)
        except InfeasibleError:
            pass
        # the evacuation does not fit either: cancel the standby and keep the hosts on
        fresh = [h for h in new_standby if h in evacuate]
        for h in fresh:
            new_standby.remove(h)
        wake.extend(sorted(evacuate - set(fresh)))
        return []
