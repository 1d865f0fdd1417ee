"""``power``: consolidation as optimisation, on forecast demand (the CP-SAT power mode).

Description
    Each cycle:

    1. **Forecast.** Each VM's demand over the next cycle is forecast from its history
       (``balancer.forecast``: ``ewm`` mean + k x std by default, or ``reactive`` = peak of the
       last ``window`` steps, or a ``quantile``). The error of every forecast is scored when the
       step it was made for has been observed (WAPE, under-forecast share; in the summary).
       With ``z`` > 0 a host's margin is ``z`` x the square root of its VMs' summed variances:
       each VM's ewm variance, at least its variance over the last ``long_history`` steps
       (a VM that spiked earlier in the day keeps its risk through a calm hour), shrunk
       towards a prior proportional to its size.
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

from balancer.forecast import ForecastOptions, ForecastTracker, ewm_last, forecast_peak
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
    k: float = 1.0  # ewm: margin per VM in standard deviations (leave-one-day-out choice)
    z: float = 0.0  # margin per host: z x sqrt(sum of its VMs' ewm variances)
    hot_util: float = 0.0  # relieve hosts above this (0: target_util)
    var_of: str = "level"  # the VM variance: of its level (ewm), or of its step-to-step change
    prior_std: float = 0.0  # prior std of a VM's demand, share of its size (with z)
    prior_steps: float = 12.0  # weight of the prior, in steps of history
    # long memory of volatility: a VM's variance is at least its variance over the last
    # `long_history` observed steps (0: off), so a VM that spiked earlier in the day is not
    # packed as steady after a calm hour
    long_history: int = 0
    # cpsat: the model picks the hosts to empty among this many (0: max_switch)
    choose_from: int = 0
    level_moves: int = 0  # moves per cycle that level the hosts' forecast load (with margin)
    level_band: float = 0.05  # level only hosts more than this above the mean utilisation
    q: float = 0.95  # quantile
    history: int = 36  # steps of history the forecast looks at
    last_floor: bool = True  # the forecast is never below the last observed value
    max_dtime: float = 0.1  # CP-SAT deterministic time per cycle (deterministic stop)
    time_limit: float = 30.0  # safety net only
    solver: str = "cpsat"  # cpsat (power mode) | greedy (the rule alone, the baseline)
    # online calibration of the margin: with slatah_target > 0, z is scaled each cycle by
    # (overloaded share of active host time so far / slatah_target) ** z_gain, within
    # [z_min, z_max]; the share so far starts from z_prior host-steps at the target
    slatah_target: float = 0.0
    z_gain: float = 1.0
    z_min: float = 0.5
    z_max: float = 4.0
    z_prior: float = 600.0
    z_every: int = 12  # cycles between updates of z (a margin that moves every cycle churns)
    # error budget (with slatah_target and slatah_window > 0): the overloaded share is accounted
    # per window of `slatah_window` cycles (e.g. a day); each update sets z to the window's
    # mean z so far + z_slope x ln(share so far / share the rest of the window may use), so a
    # window that ran hot spends less of what is left, a calm one more (z_gain is not used)
    slatah_window: int = 0
    z_slope: float = 0.8  # z per e-fold of overloaded share (the local slope of the trade-off)

    def __post_init__(self) -> None:
        for name in ("target_util", "high_util", "low_util"):
            v = getattr(self, name)
            _need(isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= 1,
                  f"field '{name}' must be in (0, 1], got {v!r}")
        _need(self.low_util < self.target_util <= self.high_util,
              f"fields 'low_util' < 'target_util' <= 'high_util' must hold, got "
              f"{self.low_util} / {self.target_util} / {self.high_util}")
        _need(isinstance(self.z, (int, float)) and math.isfinite(self.z) and self.z >= 0,
              f"field 'z' must be a number >= 0, got {self.z!r}")
        _need(isinstance(self.hot_util, (int, float)) and (
            self.hot_util == 0 or self.target_util <= self.hot_util <= 1),
            f"field 'hot_util' must be 0 or in [target_util, 1], got {self.hot_util!r}")
        for name in ("max_switch", "receivers", "min_on_cycles", "level_moves",
                     "choose_from", "z_every", "long_history", "slatah_window"):
            v = getattr(self, name)
            _need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                  f"field '{name}' must be a whole number >= 0, got {v!r}")
        for name in ("migration_w", "over_w_per_core", "max_dtime", "time_limit", "prior_std",
                     "prior_steps", "level_band", "z_gain", "z_prior", "z_slope"):
            v = getattr(self, name)
            _need(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
                  f"field '{name}' must be a number >= 0, got {v!r}")
        _need(isinstance(self.slatah_target, (int, float)) and 0 <= self.slatah_target < 1,
              f"field 'slatah_target' must be in [0, 1), got {self.slatah_target!r}")
        _need(not self.slatah_target or self.z > 0,
              f"field 'z' must be > 0 when 'slatah_target' is set, got {self.z!r}")
        _need(isinstance(self.z_min, (int, float)) and isinstance(self.z_max, (int, float))
              and 0 < self.z_min <= self.z_max, f"fields 'z_min' <= 'z_max' must be > 0, got "
              f"{self.z_min!r} / {self.z_max!r}")
        _need(self.var_of in ("level", "change"),
              f"field 'var_of' must be 'level' or 'change', got {self.var_of!r}")
        _need(self.solver in ("cpsat", "greedy"),
              f"field 'solver' must be 'cpsat' or 'greedy', got {self.solver!r}")
        self.forecast_options()  # validates forecast fields

    def forecast_options(self) -> ForecastOptions:
        from balancer.errors import InputError

        try:
            return ForecastOptions(method=self.forecast, window=self.window, span=self.span,
                                   k=self.k, q=self.q, history=self.history,
                                   last_floor=self.last_floor)
        except InputError as exc:
            raise InputError(str(exc).replace("forecast: ", "")) from None


class Bins:
    """Receiving hosts for first-fit decreasing: a VM fits a host when the host's forecast load
    plus ``z`` x the square root of its summed VM variances stays within its target (with
    ``z = 0``, when the forecast load fits the room left)."""

    def __init__(self, z: float = 0.0) -> None:
        self.z = z
        self.target: dict[int, float] = {}
        self.load: dict[int, float] = {}
        self.var: dict[int, float] = {}
        self.mroom: dict[int, float] | None = None

    def add(self, h: int, target: float, load: float = 0.0, var: float = 0.0) -> None:
        self.target[h], self.load[h], self.var[h] = target, load, var

    def room(self, h: int) -> float:
        return self.target[h] - self.load[h] - self.z * math.sqrt(max(self.var[h], 0.0))

    def __contains__(self, h: int) -> bool:
        return h in self.target

    def hosts(self) -> list[int]:
        return list(self.target)


def _ffd(vms: list[int], est: np.ndarray, bins: Bins, var: np.ndarray,
         mem: np.ndarray | None = None) -> dict[int, int] | None:
    """First-fit decreasing of ``vms`` into ``bins`` (most room first); None if one does not
    fit. Updates ``bins`` only on success."""
    load, vv = dict(bins.load), dict(bins.var)
    mr = dict(bins.mroom) if bins.mroom is not None else None
    out: dict[int, int] = {}
    z = bins.z
    order = sorted(bins.target, key=lambda h: (-bins.room(h), h))
    for v in sorted(vms, key=lambda v: (-est[v], v)):
        for h in order:
            if z:
                fits = load[h] + est[v] + z * math.sqrt(max(vv[h] + var[v], 0.0)) \
                    <= bins.target[h]
            else:
                fits = est[v] <= bins.target[h] - load[h]
            if fits:
                if mr is not None and mem is not None and mem[v] > mr[h]:
                    continue
                load[h] += est[v]
                vv[h] += var[v]
                if mr is not None and mem is not None:
                    mr[h] -= mem[v]
                out[v] = h
                break
        else:
            return None
    bins.load.update(load)
    bins.var.update(vv)
    if mr is not None:
        bins.mroom = mr
    return out


def vm_variance(hist: np.ndarray, a: PowerArgs, size: np.ndarray,
                long: np.ndarray | None = None) -> np.ndarray:
    """Each VM's demand variance (millicores squared) for the margin per host: the ewm variance
    of its level over ``hist`` (steps x VMs; or of its step changes, ``var_of``), at least its
    variance over ``long`` (the last ``long_history`` observed steps: a VM that spiked earlier
    in the day keeps that risk through a calm hour), shrunk towards ``(prior_std x size in
    cores x 1000)^2`` with the weight of ``prior_steps`` steps of history."""
    h = np.asarray(hist, dtype=float)
    if a.var_of == "level" or len(h) < 2:
        var = ewm_last(h, a.span)[1] ** 2
    else:  # half the ewm mean square of the step changes (= the level's for white noise)
        d = np.diff(h, axis=0)
        w = (1.0 - 2.0 / (a.span + 1.0)) ** np.arange(len(d) - 1, -1, -1, dtype=float)
        var = (w / w.sum()) @ (d * d) / 2.0
    if long is not None and len(long) >= 2:
        var = np.maximum(var, np.asarray(long, dtype=float).var(axis=0))
    if a.prior_std and a.prior_steps:
        # shrink towards a prior proportional to the VM's size: a VM seen steady for a short
        # while still gets room, and the first cycles are not trusted blindly
        prior = (a.prior_std * 1000.0 * np.asarray(size, dtype=float)) ** 2
        n = float(len(h))
        var = (n * var + a.prior_steps * prior) / (n + a.prior_steps)
    return var


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
        self.differs = 0  # cycles where the model's answer is not the rule's
        self.differs_hosts = 0  # ... with other hosts put in standby
        self.solve_status: dict[str, int] = {}
        self._tables: list[HostPower] | None = None
        self.z_now = self.args.z
        self._z_sum = 0.0  # for the report: mean z over cycles
        self._win = (0.0, 0.0, 0.0, 0)  # window start: overloaded, active host-steps; z sum, n

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.tracker.report())
        out["forecast"] = self.args.forecast
        out["power_solves"] = self.solves
        out["power_differs"] = self.differs
        out["power_differs_hosts"] = self.differs_hosts
        out["power_status"] = dict(sorted(self.solve_status.items()))
        out["z_mean"] = round(self._z_sum / max(self._cycle, 1), 4)
        out["z_last"] = round(self.z_now, 4)
        return out

    def decide(self, ctx: Any) -> Decision:
        a = self.args
        self._cycle += 1
        cyc = self._cycle
        self.z_now = self._margin(ctx)
        self._z_sum += self.z_now
        o0, a0, zs, zn = self._win
        self._win = (o0, a0, zs + self.z_now, zn + 1)
        n_h = ctx.n_hosts
        look = max(self.fopts.lookback, a.history) if self.z_now else self.fopts.lookback
        hist = ctx.observed(look)
        if self._pending is not None and ctx.step > self._pending[0]:
            step, f = self._pending
            actual = ctx.observed(ctx.step - step)
            self.tracker.score(np.broadcast_to(f, actual.shape), actual)
        est = forecast_peak(hist, self.fopts)
        self._pending = (ctx.step, est)
        # per-host margin: z x sqrt(sum of the VMs' variances) (VMs do not all peak together)
        var = np.zeros(len(est))
        if self.z_now:
            size = np.asarray(getattr(ctx, "vm_cores", np.ones(len(est))), dtype=float)
            long = ctx.observed(a.long_history) if a.long_history else None
            var = vm_variance(hist[-a.history:], a, size, long)
        if self._tables is None:
            self._tables = [HostPower(tuple(t)) for t in ctx.host_power_table]
        cap = np.asarray(ctx.host_cpu, dtype=float)
        power = ctx.power
        standby = np.asarray(ctx.standby, dtype=bool)
        load_mu = ctx.host_load(est)
        load_var = ctx.host_load(var) if self.z_now else np.zeros(n_h)
        # forecast load with margin
        load = load_mu + self.z_now * np.sqrt(np.maximum(load_var, 0.0))
        hot_util = a.hot_util or a.target_util
        count = ctx.vm_count()
        vm_mem = np.asarray(ctx.vm_mem, dtype=float)
        mem_bind = bool(ctx.mem_binding)
        mem_lim = np.asarray(ctx.mem_limit, dtype=float)
        mem_use = np.bincount(ctx.vm_host, weights=vm_mem, minlength=n_h)
        eff = cap / np.maximum(np.asarray(ctx.host_peak_w, dtype=float), 1e-9)
        boots = np.asarray(ctx.host_boot_s, dtype=float)
        on = [h for h in range(n_h) if power[h] != OFF and not standby[h]]
        total = float(load[on].sum())
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
        hot = [h for h in on if power[h] == ON and load[h] > hot_util * cap[h]]
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
        alt: list[int] = []  # further candidates the model may empty instead (cpsat)
        if total < a.low_util * cap_on and not wake:
            cands = [h for h in on if power[h] == ON and count[h] > 0
                     and cyc - self._on_since.get(h, -10**9) >= a.min_on_cycles]
            cands.sort(key=lambda h: (load[h] / cap[h] + 0.05 * (eff[h] / eff.max()), h))
            c = cap_on
            n_alt = max(a.choose_from, a.max_switch) - a.max_switch \
                if a.solver == "cpsat" else 0
            for h in cands:
                if len(empty_c) >= a.max_switch:
                    if len(alt) >= n_alt:
                        break
                    if total <= a.target_util * (cap_on - cap[h]):
                        alt.append(h)
                    continue
                if total <= a.target_util * (c - cap[h]):
                    empty_c.append(h)
                    c -= float(cap[h])
        if not hot and not empty_c and not wake:
            moves = self._level(ctx, on, {}, set(), est, var, load_mu, load_var, cap, vm_mem,
                                mem_lim, mem_use)
            return Decision(power_on=tuple(power_on), standby=tuple(new_standby),
                            moves=tuple(sorted(moves.items())))
        # receivers: the coolest hosts on, not hot, not to be emptied
        busy = set(hot) | set(empty_c) | set(alt)
        cool = sorted((h for h in on if power[h] == ON and h not in busy),
                      key=lambda h: (load[h] / cap[h], -eff[h], h))
        k = min(len(cool), a.receivers * max(1, len(busy)))
        # the greedy rule: hint and baseline
        room = Bins(self.z_now)
        for h in cool[:k]:
            room.add(h, a.target_util * cap[h], load_mu[h], load_var[h])
        for h in wake:
            room.add(h, a.target_util * cap[h])
        if mem_bind:
            room.mroom = {h: mem_lim[h] - mem_use[h] for h in room.hosts()}
        movable = [int(v) for v in range(len(est)) if not ctx.migrating[v]]
        place: dict[int, int] = {}
        for h in hot:
            vms = sorted((v for v in movable if ctx.vm_host[v] == h), key=lambda v: (est[v], v))
            mu, vr = float(load_mu[h]), float(load_var[h])
            shed = []
            sv = math.sqrt(max(vr, 0.0))
            # largest first: what a VM adds to the host's load with margin
            for v in sorted(vms, key=lambda v: (
                    -(est[v] + self.z_now * (sv - math.sqrt(max(vr - var[v], 0.0)))), v)):
                if mu + self.z_now * math.sqrt(max(vr, 0.0)) <= a.target_util * cap[h]:
                    break
                shed.append(v)
                mu -= est[v]
                vr -= var[v]
            got = _ffd(shed, est, room, var, vm_mem)
            if got:
                place.update(got)
        emptied: list[int] = []
        for h in empty_c:
            vms = [v for v in movable if ctx.vm_host[v] == h]
            if len(vms) < count[h]:
                continue  # a VM of it is migrating
            got = _ffd(vms, est, room, var, vm_mem)
            if got is not None:
                place.update(got)
                emptied.append(h)
        level = self._level(ctx, on, place, set(empty_c) | set(alt), est, var, load_mu, load_var,
                            cap, vm_mem, mem_lim, mem_use)
        place.update(level)
        greedy = Decision(power_on=tuple(power_on + wake),
                          standby=tuple(new_standby + emptied), moves=tuple(sorted(place.items())))
        if a.solver == "greedy" or not (empty_c or wake):
            # relieving hot hosts alone is the rule's job; the model decides power states
            return greedy
        if mem_bind and not wake and not emptied:
            # memory binds: if no candidate's VMs fit in the receivers' free memory even taken
            # together, no host can be emptied and the model is not asked (it would say so)
            frees = [max(mem_lim[h] - mem_use[h], 0.0) for h in cool[:k]]
            free_mem, most = sum(frees), max(frees, default=0.0)

            def stuck(h: int) -> bool:  # its VMs cannot all leave, whatever the packing
                return mem_use[h] > free_mem or any(
                    vm_mem[v] > most for v in np.flatnonzero(ctx.vm_host == h))

            if all(stuck(h) for h in set(empty_c) | set(alt)):
                return greedy
        # the model decides which of the candidate hosts to empty (and which to wake), over
        # those hosts and the receivers the rule did not already fill with VMs of hot hosts
        # (moves relieving hot hosts and levelling moves stay the rule's; their hosts are not
        # in the model's scope)
        cand = set(empty_c) | set(alt)
        hot_moves = {v: h for v, h in place.items() if int(ctx.vm_host[v]) not in cand}
        used = set(hot_moves.values()) | {int(ctx.vm_host[v]) for v in level}
        cp_scope = sorted(cand | set(wake) | {h for h in cool[:k] if h not in used})
        movable_vms = {int(v) for v in movable if int(ctx.vm_host[v]) in cand}
        hint = {v: h for v, h in place.items() if v in movable_vms}
        d = self._solve(ctx, cp_scope, est, var, hint, emptied, wake, power_on, new_standby,
                        movable_vms)
        if d is None:  # no answer within the deterministic time: the rule's
            return greedy
        woken = tuple(sorted(h for h in used if ctx.power[h] == OFF and h not in d.power_on))
        out = Decision(power_on=d.power_on + woken, standby=d.standby,
                       moves=tuple(sorted({**dict(d.moves), **hot_moves}.items())))
        if set(out.standby) != set(greedy.standby) or set(out.moves) != set(greedy.moves):
            self.differs += 1
            if set(out.standby) != set(greedy.standby):
                self.differs_hosts += 1
        return out

    def _margin(self, ctx: Any) -> float:
        """z for this cycle: the configured one, or (``slatah_target``) scaled by how the
        overloaded share of active host time so far compares with the target (more margin on a
        day that runs hot, less on a calm one), so the day's SLATAH heads for the target
        whatever the day; with ``slatah_window``, from the window's error budget."""
        a = self.args
        if not a.slatah_target:
            return a.z
        over = float(getattr(ctx, "overloaded_host_steps", 0))
        act = float(getattr(ctx, "active_host_steps", 0))
        pos = (self._cycle - 1) % a.slatah_window if a.slatah_window else self._cycle - 1
        if a.slatah_window and pos == 0:  # a new window: the budget starts afresh
            self._win = (over, act, 0.0, 0)
            return a.z
        if a.z_every > 1 and pos % a.z_every:
            return self.z_now
        if a.slatah_window:
            return self._budget_margin(over, act, pos)
        rate = (over + a.slatah_target * a.z_prior) / (act + a.z_prior)
        return float(min(max(a.z * (rate / a.slatah_target) ** a.z_gain, a.z_min), a.z_max))

    def _budget_margin(self, over: float, act: float, pos: int) -> float:
        """z from the window's error budget: the overloaded share so far (with a prior of
        ``z_prior`` host-steps at the target) was had at the window's mean z so far; the share
        the rest of the window may use is what keeps the whole window at the target, with the
        host-steps still to come projected from those so far. A log-linear local model of the
        trade-off (``z_slope`` z per e-fold of share) turns the ratio of the two into z."""
        a = self.args
        o0, a0, zs, zn = self._win
        o, h = over - o0, act - a0
        z_bar = zs / zn if zn else a.z
        target = a.slatah_target
        rate = max((o + target * a.z_prior) / max(h + a.z_prior, 1.0), 0.1 * target)
        rest = max(h, 1.0) / pos * (a.slatah_window - pos)  # host-steps still to come
        budget = target * (h + rest) - o  # overloaded host-steps the rest may have
        allowed = max(budget, 0.1 * target * rest) / rest
        z = z_bar + a.z_slope * math.log(rate / allowed)
        return float(min(max(z, a.z_min), a.z_max))

    def _level(self, ctx: Any, on: list[int], place: dict[int, int], leaving: set[int],
               est: np.ndarray, var: np.ndarray, load_mu: np.ndarray, load_var: np.ndarray,
               cap: np.ndarray, vm_mem: np.ndarray, mem_lim: np.ndarray,
               mem_use: np.ndarray) -> dict[int, int]:
        """Up to ``level_moves`` moves from the host whose forecast load with margin is the
        highest share of its CPU to the lowest, while the highest is more than ``level_band``
        above the mean: the hosts on share the risk, so fewer hosts carry the same load."""
        a = self.args
        if not a.level_moves:
            return {}
        hosts = [h for h in on if ctx.power[h] == ON and not ctx.standby[h] and h not in leaving]
        if len(hosts) < 2:
            return {}
        mu = {h: float(load_mu[h]) for h in hosts}
        vr = {h: float(load_var[h]) for h in hosts}
        mem = {h: float(mem_use[h]) for h in hosts}
        where = {}
        for v, h in place.items():  # the rule's moves
            src = int(ctx.vm_host[v])
            for hh, sign in ((src, -1.0), (h, 1.0)):
                if hh in mu:
                    mu[hh] += sign * est[v]
                    vr[hh] += sign * var[v]
                    mem[hh] += sign * vm_mem[v]
        moved = set(place)
        by_host: dict[int, list[int]] = {h: [] for h in hosts}
        for v in range(len(est)):
            h = int(ctx.vm_host[v])
            if h in by_host and v not in moved and not ctx.migrating[v]:
                by_host[h].append(v)

        def util(h: int, dm: float = 0.0, dv: float = 0.0) -> float:
            return (mu[h] + dm + self.z_now * math.sqrt(max(vr[h] + dv, 0.0))) / cap[h]

        mem_bind = bool(ctx.mem_binding)
        mean = sum(util(h) for h in hosts) / len(hosts)
        for _ in range(a.level_moves):
            src = max(hosts, key=lambda h: (util(h), -h))
            dst = min(hosts, key=lambda h: (util(h), h))
            top = util(src)
            if top - mean <= a.level_band or src == dst:
                break
            best = None
            for v in by_host[src]:
                if mem_bind and mem[dst] + vm_mem[v] > mem_lim[dst]:
                    continue
                after_src, after_dst = util(src, -est[v], -var[v]), util(dst, est[v], var[v])
                worst = max(after_src, after_dst)
                if worst >= top - 1e-9:
                    continue
                key = (worst, vm_mem[v], v)  # least risk left, then the quickest to move
                if best is None or key < best[0]:
                    best = (key, v)
            if best is None:
                break
            v = best[1]
            mu[src] -= est[v]
            vr[src] -= var[v]
            mem[src] -= vm_mem[v]
            mu[dst] += est[v]
            vr[dst] += var[v]
            mem[dst] += vm_mem[v]
            by_host[src].remove(v)
            where[v] = dst
        return where

    def _solve(self, ctx: Any, scope: list[int], est: np.ndarray, var: np.ndarray,
               place: dict[int, int],
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
        # the rule's target, unless it is outside the scope (it also takes a hot host's VMs)
        hint_vm = [ix.get(place.get(g, -1), ix[int(ctx.vm_host[g])]) for g in vm_global]
        hint_units = [hint_vm[u.members[0]] for u in problem.units]
        opts = PowerOptions(target_util=a.target_util, migration_w=a.migration_w,
                            over_w_per_core=a.over_w_per_core, max_switch=a.max_switch,
                            max_dtime=a.max_dtime, time_limit=a.time_limit, seed=ctx.seed)
        res = solve(problem, [self._tables[h] for h in scope], was_on, opts,
                    hint_on=hint_on, hint_hosts=hint_units,
                    vm_var=[float(var[g]) for g in vm_global] if self.z_now else None, z=self.z_now)
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


__all__ = ["PowerArgs", "PowerPolicy", "vm_variance"]
