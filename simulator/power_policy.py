"""``power``: consolidation as optimisation, on forecast demand (the CP-SAT power mode).

Description
    Each cycle:

    1. **Forecast.** Each VM's demand over the next cycle is forecast from its history
       (``balancer.forecast``: ``ewm`` mean + k x std by default, or ``reactive`` = peak of the
       last ``window`` steps, or a ``quantile``). The error of every forecast is scored when the
       step it was made for has been observed (WAPE, under-forecast share; in the summary).
    2. **Greedy rule (hint and baseline).** With D the total forecast and C the CPU of the hosts
       on: hosts that are hot (forecast load above ``target_util``), hosts to switch on when
       D > ``high_util`` x C (most power-efficient first), and up to ``max_switch`` of the least
       loaded hosts to try to empty when D < ``low_util`` x C, with first-fit-decreasing of their
       VMs into the coolest hosts (within ``target_util``). Nothing to do: no solve.
    3. **Power mode of the model.** When the rule proposes to switch hosts (to empty some, or to
       wake some), on the neighbourhood (hot hosts, hosts to empty, enough cool receivers,
       hosts that may be woken), ``balancer.solver.power.solve`` decides which hosts
       stay on and where the VMs of hot and emptied hosts go: least power (idle watts + the
       SPECpower curve, piecewise-linear) plus ``migration_w`` per migration, forecast load
       above ``target_util`` priced, at most ``max_switch`` hosts switched. The greedy answer is
       its hint and its fallback. Cycles that only relieve hot hosts keep the rule's moves.
    4. Hosts the model switches off are put in standby (emptied by the moves, then off); hosts
       it switches on are powered on. Moves go to the simulator, which runs them through the
       planner and the executor like any other policy's.
Requirements
    The replay context (``simulator.cluster.ReplayContext``), ``policies.build_problem`` and
    ``balancer.solver.power``.
Limitations
    A neighbourhood per cycle, not the whole cluster: a host outside it is neither emptied nor
    woken that cycle. Hosts with a boot time are switched on by the rule one cycle ahead (the
    model only wakes hosts that boot instantly). Memory is a hard limit, not a forecast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from balancer.forecast import ForecastOptions, ForecastTracker, forecast_peak
from balancer.solver.power import HostPower, PowerOptions, solve
from simulator.replay_policies import ON, Decision, _need, register

OFF = 0


@dataclass(frozen=True)
class PowerArgs:
    target_util: float = 0.85  # forecast load a host on should carry (share of its CPU)
    high_util: float = 0.9  # switch hosts on when D > high_util x C (C: CPU of hosts on)
    low_util: float = 0.75  # try to empty hosts when D < low_util x C
    max_switch: int = 3  # hosts switched on or off per cycle
    migration_w: float = 10.0  # watts a migration must save to be worth making
    over_w_per_core: float = 400.0  # price of forecast load above target_util, W per core
    receivers: int = 4  # cool hosts the model may fill, per host to relieve
    min_on_cycles: int = 3  # a host switched on stays on at least this many cycles
    forecast: str = "ewm"  # reactive | ewm | quantile
    window: int = 2  # reactive: peak of the last `window` steps
    span: int = 12  # ewm span (steps)
    k: float = 1.0  # ewm: margin in standard deviations (leave-one-day-out choice)
    q: float = 0.95  # quantile
    history: int = 36  # steps of history the forecast looks at
    max_dtime: float = 0.1  # CP-SAT deterministic time per cycle (deterministic stop)
    time_limit: float = 30.0  # safety net only
    solver: str = "cpsat"  # cpsat (power mode) | greedy (the rule alone, the baseline)

    def __post_init__(self) -> None:
        for name in ("target_util", "high_util", "low_util"):
            v = getattr(self, name)
            _need(isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= 1,
                  f"field '{name}' must be in (0, 1], got {v!r}")
        _need(self.low_util < self.target_util <= self.high_util,
              f"fields 'low_util' < 'target_util' <= 'high_util' must hold, got "
              f"{self.low_util} / {self.target_util} / {self.high_util}")
        for name in ("max_switch", "receivers", "min_on_cycles"):
            v = getattr(self, name)
            _need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                  f"field '{name}' must be a whole number >= 0, got {v!r}")
        for name in ("migration_w", "over_w_per_core", "max_dtime", "time_limit"):
            v = getattr(self, name)
            _need(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
                  f"field '{name}' must be a number >= 0, got {v!r}")
        _need(self.solver in ("cpsat", "greedy"),
              f"field 'solver' must be 'cpsat' or 'greedy', got {self.solver!r}")
        self.forecast_options()  # validates forecast fields

    def forecast_options(self) -> ForecastOptions:
        from balancer.errors import InputError

        try:
            return ForecastOptions(method=self.forecast, window=self.window, span=self.span,
                                   k=self.k, q=self.q, history=self.history)
        except InputError as exc:
            raise InputError(str(exc).replace("forecast: ", "")) from None


def _ffd(vms: list[int], est: np.ndarray, room: dict[int, float],
         mem: np.ndarray | None = None, mroom: dict[int, float] | None = None
         ) -> dict[int, int] | None:
    """First-fit decreasing of ``vms`` into ``room`` (most room first); None if one does not
    fit. Updates ``room``/``mroom`` in place only on success."""
    r = dict(room)
    mr = dict(mroom) if mroom is not None else None
    out: dict[int, int] = {}
    order = sorted(r, key=lambda h: (-r[h], h))
    for v in sorted(vms, key=lambda v: (-est[v], v)):
        for h in order:
            if est[v] <= r[h] and (mr is None or mem is None or mem[v] <= mr[h]):
                r[h] -= est[v]
                if mr is not None and mem is not None:
                    mr[h] -= mem[v]
                out[v] = h
                break
        else:
            return None
    room.update(r)
    if mroom is not None and mr is not None:
        mroom.update(mr)
    return out


@register
class PowerPolicy:
    name: ClassVar[str] = "power"
    Args = PowerArgs

    def __init__(self, args: PowerArgs | None = None) -> None:
        self.args = args or PowerArgs()
        self.fopts = self.args.forecast_options()
        self.tracker = ForecastTracker()
        self._pending: tuple[int, np.ndarray] | None = None  # (step, forecast for it)
        self._on_since: dict[int, int] = {}
        self._cycle = 0
        self.solves = 0
        self.solve_status: dict[str, int] = {}
        self._tables: list[HostPower] | None = None

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.tracker.report())
        out["forecast"] = self.args.forecast
        out["power_solves"] = self.solves
        out["power_status"] = dict(sorted(self.solve_status.items()))
        return out

    def decide(self, ctx: Any) -> Decision:
        a = self.args
        self._cycle += 1
        cyc = self._cycle
        n_h = ctx.n_hosts
        hist = ctx.observed(self.fopts.lookback)
        if self._pending is not None and ctx.step > self._pending[0]:
            step, f = self._pending
            actual = ctx.observed(ctx.step - step)
            self.tracker.score(np.broadcast_to(f, actual.shape), actual)
        est = forecast_peak(hist, self.fopts)
        self._pending = (ctx.step, est)
        if self._tables is None:
            self._tables = [HostPower(tuple(t)) for t in ctx.host_power_table]
        cap = np.asarray(ctx.host_cpu, dtype=float)
        power = ctx.power
        standby = np.asarray(ctx.standby, dtype=bool)
        load = ctx.host_load(est)
        count = ctx.vm_count()
        vm_mem = np.asarray(ctx.vm_mem, dtype=float)
        mem_bind = bool(ctx.mem_binding)
        mem_lim = np.asarray(ctx.mem_limit, dtype=float)
        mem_use = np.bincount(ctx.vm_host, weights=vm_mem, minlength=n_h)
        eff = cap / np.maximum(np.asarray(ctx.host_peak_w, dtype=float), 1e-9)
        boots = np.asarray(ctx.host_boot_s, dtype=float)
        on = [h for h in range(n_h) if power[h] != OFF and not standby[h]]
        total = float(est.sum())
        cap_on = float(cap[on].sum())
        power_on: list[int] = []
        new_standby: list[int] = []
        # empty hosts that are on and not needed: off at once (nothing to move)
        for h in sorted((h for h in on if count[h] == 0 and power[h] == ON),
                        key=lambda h: (eff[h], h)):
            if cyc - self._on_since.get(h, -10**9) < a.min_on_cycles:
                continue
            if total <= a.target_util * (cap_on - cap[h]):
                new_standby.append(h)
                cap_on -= float(cap[h])
        on = [h for h in on if h not in new_standby]
        hot = [h for h in on if power[h] == ON and load[h] > a.target_util * cap[h]]
        wake: list[int] = []
        if total > a.high_util * cap_on or (hot and total > a.target_util * cap_on):
            for h in sorted((h for h in range(n_h) if power[h] == OFF),
                            key=lambda h: (-eff[h], h)):
                if total <= a.target_util * cap_on:
                    break
                if boots[h] > 0:
                    power_on.append(h)  # boots: the rule switches it on a cycle ahead
                    self._on_since[h] = cyc
                else:
                    wake.append(h)
                cap_on += float(cap[h])
        empty_c: list[int] = []
        if total < a.low_util * cap_on and not wake:
            cands = [h for h in on if power[h] == ON and count[h] > 0
                     and cyc - self._on_since.get(h, -10**9) >= a.min_on_cycles]
            cands.sort(key=lambda h: (load[h] / cap[h] + 0.05 * (eff[h] / eff.max()), h))
            c = cap_on
            for h in cands:
                if len(empty_c) >= a.max_switch:
                    break
                if total <= a.target_util * (c - cap[h]):
                    empty_c.append(h)
                    c -= float(cap[h])
        if not hot and not empty_c and not wake:
            return Decision(power_on=tuple(power_on), standby=tuple(new_standby))
        # receivers: the coolest hosts on, not hot, not to be emptied
        busy = set(hot) | set(empty_c)
        cool = sorted((h for h in on if power[h] == ON and h not in busy),
                      key=lambda h: (load[h] / cap[h], -eff[h], h))
        k = min(len(cool), a.receivers * max(1, len(busy)))
        # the greedy rule: hint and baseline
        room = {h: a.target_util * cap[h] - load[h] for h in cool[:k]}
        room.update({h: a.target_util * cap[h] for h in wake})
        mroom = ({h: mem_lim[h] - mem_use[h] for h in room} if mem_bind else None)
        movable = [int(v) for v in range(len(est)) if not ctx.migrating[v]]
        place: dict[int, int] = {}
        for h in hot:
            vms = sorted((v for v in movable if ctx.vm_host[v] == h), key=lambda v: (est[v], v))
            excess = load[h] - a.target_util * cap[h]
            shed = []
            for v in sorted(vms, key=lambda v: (-est[v], v)):
                if excess <= 0:
                    break
                shed.append(v)
                excess -= est[v]
            got = _ffd(shed, est, room, vm_mem, mroom)
            if got:
                place.update(got)
        emptied: list[int] = []
        for h in empty_c:
            vms = [v for v in movable if ctx.vm_host[v] == h]
            if len(vms) < count[h]:
                continue  # a VM of it is migrating
            got = _ffd(vms, est, room, vm_mem, mroom)
            if got is not None:
                place.update(got)
                emptied.append(h)
        greedy = Decision(power_on=tuple(power_on + wake),
                          standby=tuple(new_standby + emptied), moves=tuple(sorted(place.items())))
        if a.solver == "greedy" or not (empty_c or wake):
            # relieving hot hosts alone is the rule's job; the model decides power states
            return greedy
        # the model decides which of the candidate hosts to empty (and which to wake), over
        # those hosts and the receivers the rule did not already fill with VMs of hot hosts
        hot_moves = {v: h for v, h in place.items() if int(ctx.vm_host[v]) in set(hot)}
        used = set(hot_moves.values())
        cp_scope = sorted(set(empty_c) | set(wake) | {h for h in cool[:k] if h not in used})
        movable_vms = {int(v) for v in movable if int(ctx.vm_host[v]) in set(empty_c)}
        hint = {v: h for v, h in place.items() if v in movable_vms}
        d = self._solve(ctx, cp_scope, est, hint, emptied, wake, power_on, new_standby,
                        movable_vms)
        if d is None:  # no answer within the deterministic time: the rule's
            return greedy
        woken = tuple(sorted(h for h in used if ctx.power[h] == OFF and h not in d.power_on))
        return Decision(power_on=d.power_on + woken, standby=d.standby,
                        moves=tuple(sorted({**dict(d.moves), **hot_moves}.items())))

    def _solve(self, ctx: Any, scope: list[int], est: np.ndarray, place: dict[int, int],
               emptied: list[int], wake: list[int], power_on: list[int],
               new_standby: list[int], movable: set[int]) -> Decision | None:
        from policies import build_problem

        a = self.args
        snap = ctx.snapshot(scope, est, None, None, movable)
        mem_over = ctx.mem_overcommit if ctx.mem_binding else 1.0
        problem = build_problem(snap, {"capacity": {"cpu_headroom": 0.0,
                                                    "mem_overcommit": mem_over}})
        ix = {h: i for i, h in enumerate(scope)}  # global host -> problem host
        vm_global = [int(v.name[3:]) for v in snap.vms]
        was_on = [ctx.power[h] == ON and not ctx.standby[h] for h in scope]
        hint_on = [was_on[i] and scope[i] not in emptied for i in range(len(scope))]
        for h in wake:
            hint_on[ix[h]] = True
        hint_vm = [ix[place.get(g, int(ctx.vm_host[g]))] for g in vm_global]
        hint_units = [hint_vm[u.members[0]] for u in problem.units]
        opts = PowerOptions(target_util=a.target_util, migration_w=a.migration_w,
                            over_w_per_core=a.over_w_per_core, max_switch=a.max_switch,
                            max_dtime=a.max_dtime, time_limit=a.time_limit, seed=ctx.seed)
        res = solve(problem, [self._tables[h] for h in scope], was_on, opts,
                    hint_on=hint_on, hint_hosts=hint_units)
        self.solves += 1
        self.solve_status[res.status] = self.solve_status.get(res.status, 0) + 1
        if res.status == "unchanged":
            return None
        moves = []
        for j in res.moved_vms:
            u = problem.unit_of[j]
            moves.append((vm_global[j], scope[res.unit_hosts[u]]))
        on_now = [scope[i] for i in range(len(scope)) if res.on[i] and not was_on[i]]
        off_now = [scope[i] for i in range(len(scope)) if was_on[i] and not res.on[i]]
        for h in on_now:
            self._on_since[h] = self._cycle
        return Decision(power_on=tuple(power_on + on_now), standby=tuple(new_standby + off_now),
                        moves=tuple(sorted(moves)))


__all__ = ["PowerArgs", "PowerPolicy"]
