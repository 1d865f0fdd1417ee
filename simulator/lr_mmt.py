"""``lr-mmt``: Beloglazov & Buyya's LR-MMT (local regression overload detection, minimum
migration time selection, power-aware best fit decreasing placement), as CloudSim 3.0.3's
``PowerVmAllocationPolicyMigrationLocalRegression`` runs it: the reference the ``power`` policy
is judged against, reimplemented so that it can be replayed on days CloudSim was not run on
(generated variants, other traces).

Description
    Each cycle (CloudSim's ``optimizeAllocation``):

    1. **Overloaded hosts (LR).** A host's utilisation history is the sum of its current VMs'
       observed demand over the last ``length`` (10) steps over its capacity. The least-squares
       line through it (CloudSim's "loess" weights are all positive, so its
       ``createWeigthedLinearRegression`` falls back to ordinary least squares) is extrapolated
       ``ceil(longest migration of its VMs / interval)`` steps past the last one; the host is
       overloaded when ``safety`` (1.2) x that prediction >= 1. Until a host has ``length`` steps
       of history the fallback applies: overloaded above ``fallback_util`` (0.7) of its CPU.
    2. **MMT selection.** From each overloaded host, the VM with the least memory (the quickest
       to migrate) is taken off, again until the host is no longer overloaded.
    3. **PABFD placement.** Those VMs, by decreasing current demand, each go to the host (any
       host but the overloaded ones, including hosts that are off) where the power drawn rises
       least: CloudSim's ``getPowerAfterAllocation - getPower`` (an empty host counts at its
       idle power, so waking one costs only its load curve), among hosts with the CPU free for
       the VM's current demand (and a core big enough for it) that would not be overloaded
       after taking it (the LR test with the VM's history added; an empty host is not tested).
    4. **Underloaded hosts.** Then, repeatedly, the least utilised host that is not overloaded,
       not off, not receiving VMs this cycle and not already tried is emptied, if all of its
       VMs can be placed by PABFD on hosts that are on (not overloaded, not tried); otherwise
       its VMs stay.
    Moves go to the simulator's planner and executor like any other policy's; hosts left with
    no VM draw nothing under ``empty_host_off`` (CloudSim switches them off).
Requirements
    The replay context (``simulator.cluster.ReplayContext``).
Limitations
    The simulator's executor runs the migrations within its limits (concurrent migrations per
    host and in total), where CloudSim starts them all at once; migration times, PDM and
    SLATAH are the simulator's. CPU only: memory is not checked, as in CloudSim's setup
    (``memory_binding = false``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from simulator.replay_policies import ON, Decision, _need, register


@dataclass(frozen=True)
class LrMmtArgs:
    safety: float = 1.2  # LR safety parameter (LR-MMT-1.2)
    length: int = 10  # steps of history the regression looks at
    fallback_util: float = 0.7  # static threshold while a host has less history
    migration_s: str = "ram-over-half-bandwidth"  # how long CloudSim thinks a migration takes
    bandwidth_mbps: float = 1000.0  # host bandwidth (CloudSim: 1 Gbit/s)
    pe_split: int = 2  # cores per host (a VM's demand must fit one core, as CloudSim's PE check)

    def __post_init__(self) -> None:
        _need(isinstance(self.safety, (int, float)) and math.isfinite(self.safety)
              and self.safety > 0, f"field 'safety' must be a number > 0, got {self.safety!r}")
        _need(isinstance(self.length, int) and not isinstance(self.length, bool)
              and self.length >= 3, f"field 'length' must be a whole number >= 3, "
              f"got {self.length!r}")
        _need(isinstance(self.fallback_util, (int, float)) and 0 < self.fallback_util <= 1,
              f"field 'fallback_util' must be in (0, 1], got {self.fallback_util!r}")
        _need(self.migration_s == "ram-over-half-bandwidth",
              f"field 'migration_s' must be 'ram-over-half-bandwidth', got {self.migration_s!r}")
        _need(isinstance(self.bandwidth_mbps, (int, float)) and self.bandwidth_mbps > 0,
              f"field 'bandwidth_mbps' must be > 0, got {self.bandwidth_mbps!r}")
        _need(isinstance(self.pe_split, int) and not isinstance(self.pe_split, bool)
              and self.pe_split >= 1, f"field 'pe_split' must be a whole number >= 1, "
              f"got {self.pe_split!r}")


def lr_coefficients(length: int, ahead: int) -> np.ndarray:
    """c such that c @ y is the least-squares line through y (x = 1..length) at
    x = length + ahead."""
    x = np.arange(1, length + 1, dtype=float)
    design = np.column_stack([np.ones(length), x])
    return np.array([1.0, length + ahead]) @ np.linalg.pinv(design)


def _watts(table: np.ndarray, util: np.ndarray) -> np.ndarray:
    """Per-host power at ``util`` (0..1, clipped) from each host's 11-point table (rows)."""
    u = np.clip(util, 0.0, 1.0) * 10.0
    i = np.minimum(np.floor(u).astype(int), 9)
    f = u - i
    rows = np.arange(len(table))
    return table[rows, i] * (1.0 - f) + table[rows, i + 1] * f


@register
class LrMmt:
    name: ClassVar[str] = "lr-mmt"
    Args = LrMmtArgs

    def __init__(self, args: LrMmtArgs | None = None) -> None:
        self.args = args or LrMmtArgs()
        self._coef: dict[int, np.ndarray] = {}
        self.overloaded_cycles = 0
        self.underload_tries = 0
        self.underload_emptied = 0
        self.moves_over = 0
        self.moves_under = 0

    def report(self) -> dict[str, Any]:
        return {"lr_overloaded_hosts": self.overloaded_cycles,
                "lr_underload_tries": self.underload_tries,
                "lr_underload_emptied": self.underload_emptied,
                "lr_moves_over": self.moves_over, "lr_moves_under": self.moves_under}

    def _c(self, ahead: int) -> np.ndarray:
        if ahead not in self._coef:
            self._coef[ahead] = lr_coefficients(self.args.length, ahead)
        return self._coef[ahead]

    def decide(self, ctx: Any) -> Decision:
        a = self.args
        n_h = ctx.n_hosts
        cap = np.asarray(ctx.host_cpu, dtype=float)
        table = np.asarray(ctx.host_power_table, dtype=float)
        pe = cap / a.pe_split
        where = np.asarray(ctx.vm_host).copy()  # current (or destination) host of each VM
        migrating = np.asarray(ctx.migrating, dtype=bool)
        hist = ctx.observed(a.length)  # (k, vms) millicores, oldest first
        have_lr = ctx.step >= a.length and len(hist) == a.length
        cur = hist[-1].astype(float)
        vm_mem = np.asarray(ctx.vm_mem, dtype=float)
        # CloudSim: RAM / (bw / 2), bw in Mbit/s -> seconds; intervals ahead = ceil(T / dt)
        mig_s = vm_mem * 8.0 / (a.bandwidth_mbps / 2.0)
        dt = float(ctx.interval_s)

        load = np.bincount(where, weights=cur, minlength=n_h)
        nvm = np.bincount(where, minlength=n_h)
        if have_lr:
            # per host: the VMs' history summed (k, hosts) and the LR prediction's pieces
            hh = np.stack([np.bincount(where, weights=hist[k], minlength=n_h)
                           for k in range(a.length)])  # (length, hosts) millicores
            maxmig = np.zeros(n_h)
            np.maximum.at(maxmig, where, mig_s)
            ahead = np.maximum(np.ceil(maxmig / dt), 1).astype(int)
            coefs = {k: self._c(k) for k in set(ahead.tolist())}
            pred = np.array([coefs[ahead[h]] @ hh[:, h] for h in range(n_h)])  # millicores
        else:
            hh = None
            maxmig = np.zeros(n_h)
            ahead = np.ones(n_h, dtype=int)
            pred = load.copy()

        def overloaded(h: int) -> bool:
            if nvm[h] == 0:
                return False
            if have_lr:
                return a.safety * pred[h] / cap[h] >= 1.0
            return load[h] / cap[h] > a.fallback_util

        def over_after(v: int) -> np.ndarray:
            """Per host: would it be overloaded with VM ``v`` added (vectorised)."""
            if not have_lr:
                return (load + cur[v]) / cap > a.fallback_util
            new_ahead = np.maximum(np.ceil(np.maximum(maxmig, mig_s[v]) / dt), 1).astype(int)
            p = np.empty(n_h)
            for k in set(new_ahead.tolist()):
                sel = new_ahead == k
                c = self._c(int(k))
                p[sel] = c @ hh[:, sel] + c @ hist[:, v]
            return a.safety * p / cap >= 1.0

        def add(v: int, h: int, sign: float = 1.0) -> None:
            load[h] += sign * cur[v]
            nvm[h] += int(sign)
            if have_lr:
                hh[:, h] += sign * hist[:, v]
                pred[h] = self._c(int(ahead[h])) @ hh[:, h]

        def host_add(v: int, h: int) -> tuple[int, float, int]:
            """Place ``v`` on ``h``; returns what ``undo`` needs."""
            saved = (h, float(maxmig[h]), int(ahead[h])) if have_lr else (h, 0.0, 0)
            if have_lr and mig_s[v] > maxmig[h]:
                maxmig[h] = mig_s[v]
                ahead[h] = max(int(math.ceil(maxmig[h] / dt)), 1)
            add(v, h)
            return saved

        def undo(v: int, saved: tuple[int, float, int]) -> None:
            h = saved[0]
            if have_lr:
                maxmig[h], ahead[h] = saved[1], saved[2]
            add(v, h, -1.0)

        def pabfd(v: int, allowed: np.ndarray) -> int | None:
            room = (cap - load >= cur[v]) & (pe >= cur[v]) & allowed
            if not room.any():
                return None
            ok = room & ~((load > 0) & over_after(v))
            if not ok.any():
                return None
            diff = _watts(table, (load + cur[v]) / cap) - _watts(table, load / cap)
            diff = np.where(ok, diff, np.inf)
            return int(np.argmin(diff))

        moves: dict[int, int] = {}
        over = [h for h in range(n_h) if ctx.power[h] == ON and overloaded(h)]
        self.overloaded_cycles += len(over)
        over_set = np.zeros(n_h, dtype=bool)
        over_set[over] = True
        # 2. MMT: least memory first, until the host is not overloaded
        to_move: list[int] = []
        for h in over:
            vms = sorted((int(v) for v in np.flatnonzero((where == h) & ~migrating)),
                         key=lambda v: (vm_mem[v], v))
            for v in vms:
                to_move.append(v)
                add(v, h, -1.0)
                if not overloaded(h):
                    break
        # 3. PABFD of those VMs on any host but the overloaded ones
        # CloudSim's host list holds every host; one that is off is empty and can be woken
        # (it draws nothing while empty here, as CloudSim switches empty hosts off)
        power = np.asarray(ctx.power)
        boots = np.asarray(ctx.host_boot_s, dtype=float)
        allowed = ~over_set & ~np.asarray(ctx.standby, dtype=bool) & (
            (power == ON) | (boots <= 0))
        receiving = np.zeros(n_h, dtype=bool)
        wake: set[int] = set()
        for v in sorted(to_move, key=lambda v: (-cur[v], v)):
            h = pabfd(v, allowed)
            if h is None:
                src = int(ctx.vm_host[v])
                add(v, src)  # stays where it is
                continue
            if ctx.power[h] != ON:
                wake.add(h)
            host_add(v, h)
            moves[v] = h
            self.moves_over += 1
            receiving[h] = True
        # 4. underloaded hosts, least utilised first, emptied all or nothing
        off = nvm == 0
        excl_under = over_set | off | receiving
        excl_place = over_set | off | np.asarray(ctx.standby, dtype=bool) | \
            (np.asarray(ctx.power) != ON)
        # hosts with a VM migrating in, or all VMs migrating out, are not candidates
        mig_in = np.zeros(n_h, dtype=bool)
        mig_in[where[migrating]] = True
        movable_n = np.bincount(where[~migrating], minlength=n_h)
        excl_under |= mig_in | (movable_n == 0)
        while True:
            util = np.where(excl_under | (load <= 0), np.inf, load / cap)
            h = int(np.argmin(util))
            if not np.isfinite(util[h]) or util[h] >= 1.0:
                break
            excl_under[h] = True
            excl_place[h] = True
            vms = [int(v) for v in np.flatnonzero((where == h) & ~migrating)]
            vms = [v for v in vms if v not in moves]
            if not vms:
                continue
            self.underload_tries += 1
            done: list[tuple[int, int, tuple[int, float, int]]] = []
            for v in sorted(vms, key=lambda v: (-cur[v], v)):
                t = pabfd(v, ~excl_place)
                if t is None:
                    break
                done.append((v, t, host_add(v, t)))
            if len(done) < len(vms):
                for v, _, saved in reversed(done):
                    undo(v, saved)
                continue
            self.underload_emptied += 1
            for v, t, _ in done:
                self.moves_under += 1
                moves[v] = t
                excl_under[t] = True
        return Decision(power_on=tuple(sorted(wake)), moves=tuple(sorted(moves.items())))


__all__ = ["LrMmt", "LrMmtArgs", "lr_coefficients"]
