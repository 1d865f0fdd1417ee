"""The engine's objective, evaluated without a solver.

The balance term of ``Problem`` is a sum of squared utilisation deviations. CP-SAT works on
integers and linear constraints, so each host's squared deviation is replaced by the maximum of
tangent lines of ``SCALE * d^2`` (a convex piecewise-linear under-approximation, exact at the
breakpoints). The same integer tangents are used here and in the CP-SAT model, so an objective
computed here equals the one CP-SAT reports for the same placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from balancer.model import ClusterSnapshot
from balancer.model.problem import SCALE, Problem

# Tangent points, in utilisation. Dense near zero (fine balancing), geometric further out
# (overloads). Mirrored for negative deviations.
BREAKPOINTS = (
    0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1,
    0.12, 0.16, 0.2, 0.25, 0.32, 0.4, 0.5, 0.64, 0.8, 1.0, 1.28, 1.6, 2.0,
)


@dataclass(frozen=True)
class Tangents:
    """Per host and dimension: penalty(e) = max(0, max_k slope[h, k] * e - icpt[k]).

    ``e`` is the host's demand minus its target demand, in load units (millicores or MiB).
    """

    slope: np.ndarray  # (hosts, 2K) int64
    icpt: np.ndarray  # (2K,) int64


def tangents_for(capacity: np.ndarray) -> Tangents:
    pts = np.array([p for b in BREAKPOINTS for p in (b, -b)], dtype=float)
    slope = np.rint(2.0 * pts[None, :] * SCALE / capacity[:, None].astype(float)).astype(np.int64)
    icpt = np.rint(pts * pts * SCALE).astype(np.int64)
    return Tangents(slope=slope, icpt=icpt)


class Evaluator:
    """Fast objective and load bookkeeping for a problem (numpy; no solver)."""

    def __init__(self, problem: Problem) -> None:
        self.problem = p = problem
        snap: ClusterSnapshot = p.snapshot
        n_h = len(snap.hosts)
        self.cpu_cap = np.array([h.cpu_capacity for h in snap.hosts], dtype=np.int64)
        self.mem_cap = np.array([h.mem_capacity for h in snap.hosts], dtype=np.int64)
        self.vm_cpu = np.array([v.cpu_demand for v in snap.vms], dtype=np.int64)
        self.vm_memd = np.array([v.mem_demand for v in snap.vms], dtype=np.int64)
        self.vm_mem = np.array([v.mem for v in snap.vms], dtype=np.int64)
        self.start = np.array(p.start, dtype=np.int64)
        self.move_cost = np.array(p.move_cost, dtype=np.int64)
        # unit aggregates
        unit_of = np.array(p.unit_of, dtype=np.int64)
        n_u = len(p.units)
        self.u_cpu = np.bincount(unit_of, weights=self.vm_cpu, minlength=n_u).astype(np.int64)
        self.u_memd = np.bincount(unit_of, weights=self.vm_memd, minlength=n_u).astype(np.int64)
        self.u_mem = np.bincount(unit_of, weights=self.vm_mem, minlength=n_u).astype(np.int64)
        self.balanced_mask = np.zeros(n_h, dtype=bool)
        self.balanced_mask[list(p.balanced)] = True
        # Demand that ends on balanced hosts: everything but pinned units on other hosts.
        stuck = [u for u, unit in enumerate(p.units)
                 if unit.pinned and not self.balanced_mask[unit.candidates[0]]]
        stuck_cpu = int(self.u_cpu[stuck].sum()) if stuck else 0
        stuck_mem = int(self.u_memd[stuck].sum()) if stuck else 0
        total_cpu = int(self.vm_cpu.sum()) - stuck_cpu
        total_mem = int(self.vm_memd.sum()) - stuck_mem
        bal = self.balanced_mask
        cap_cpu = int(self.cpu_cap[bal].sum()) or 1
        cap_mem = int(self.mem_cap[bal].sum()) or 1
        self.target_cpu = np.rint(total_cpu * self.cpu_cap / cap_cpu).astype(np.int64)
        self.target_mem = np.rint(total_mem * self.mem_cap / cap_mem).astype(np.int64)
        self.vm_unit = unit_of
        # unit_home[u]: the host all of u's members started on (-1 if they started apart)
        self.unit_home = np.full(len(p.units), -1, dtype=np.int64)
        for u, unit in enumerate(p.units):
            homes = {p.start[v] for v in unit.members}
            if len(homes) == 1:
                self.unit_home[u] = homes.pop()
        self.u_move_cost = np.bincount(unit_of, weights=self.move_cost,
                                       minlength=len(p.units)).astype(np.int64)
        self.unit_pinned = np.array([unit.pinned for unit in p.units], dtype=bool)
        # cand_mask[u, h]: host h is one of unit u's candidates
        self.cand_mask = np.zeros((len(p.units), n_h), dtype=bool)
        # units share their candidate tuples (policies.base): one assignment per distinct set
        rows_of: dict[int, list[int]] = {}
        cands_of: dict[int, tuple[int, ...]] = {}
        for u, unit in enumerate(p.units):
            rows_of.setdefault(id(unit.candidates), []).append(u)
            cands_of[id(unit.candidates)] = unit.candidates
        for key, rows in rows_of.items():
            cols = np.asarray(cands_of[key], dtype=np.intp)
            self.cand_mask[np.asarray(rows, dtype=np.intp)[:, None], cols[None, :]] = True
        # unit -> indices of the mandatory anti-affinity groups it belongs to
        self.apart_of: dict[int, list[int]] = {}
        for gi, g in enumerate(p.apart):
            if g.weight is None:
                for u in g.units:
                    self.apart_of.setdefault(u, []).append(gi)
        # soft rules per unit (indices into p.apart / p.together / p.prefer)
        self.soft_of: dict[int, list[tuple[str, int]]] = {}
        for kind, groups in (("apart", p.apart), ("together", p.together)):
            for gi, g in enumerate(groups):
                if g.weight is not None:
                    for u in g.units:
                        self.soft_of.setdefault(u, []).append((kind, gi))
        for pi, pref in enumerate(p.prefer):
            for u in pref.units:
                self.soft_of.setdefault(u, []).append(("prefer", pi))
        self.tan_cpu = tangents_for(self.cpu_cap)
        self.tan_mem = tangents_for(self.mem_cap)

    # --- per-host pieces -------------------------------------------------------------------
    def loads(self, unit_hosts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CPU demand, memory demand and configured memory per host."""
        n_h = len(self.cpu_cap)
        cpu = np.bincount(unit_hosts, weights=self.u_cpu, minlength=n_h).astype(np.int64)
        memd = np.bincount(unit_hosts, weights=self.u_memd, minlength=n_h).astype(np.int64)
        mem = np.bincount(unit_hosts, weights=self.u_mem, minlength=n_h).astype(np.int64)
        return cpu, memd, mem

    @staticmethod
    def _penalty(t: Tangents, e: np.ndarray) -> np.ndarray:
        vals = t.slope * e[:, None] - t.icpt[None, :]
        return np.maximum(vals.max(axis=1), 0)

    @staticmethod
    def _penalty_rows(t: Tangents, hosts: np.ndarray, e: np.ndarray) -> np.ndarray:
        """Penalty of deviation ``e[i]`` on host ``hosts[i]``."""
        vals = t.slope[hosts] * e[:, None] - t.icpt[None, :]
        return np.maximum(vals.max(axis=1), 0)

    def host_balance(self, cpu: np.ndarray, memd: np.ndarray) -> np.ndarray:
        w_cpu, w_mem = self.problem.balance_weights
        pen = (w_cpu * self._penalty(self.tan_cpu, cpu - self.target_cpu)
               + w_mem * self._penalty(self.tan_mem, memd - self.target_mem))
        return np.where(self.balanced_mask, pen, 0)

    # --- whole objective --------------------------------------------------------------------
    def move_cost_of(self, unit_hosts: np.ndarray) -> int:
        vm_hosts = unit_hosts[self.vm_unit]
        return int(self.move_cost[vm_hosts != self.start].sum())

    def soft_penalty(self, unit_hosts: np.ndarray) -> int:
        p = self.problem
        total = 0
        for g in p.apart:
            if g.weight is None:
                continue
            hosts = unit_hosts[list(g.units)]
            total += g.weight * (len(hosts) - len(set(hosts.tolist())))
        for g in p.together:
            if g.weight is None:
                continue
            hosts = unit_hosts[list(g.units)]
            total += g.weight * (len(set(hosts.tolist())) - 1)
        for pref in p.prefer:
            for u in pref.units:
                if int(unit_hosts[u]) not in pref.hosts:
                    total += pref.weight
        return total

    def objective(self, unit_hosts: np.ndarray) -> int:
        cpu, memd, _ = self.loads(unit_hosts)
        return (int(self.host_balance(cpu, memd).sum()) + self.move_cost_of(unit_hosts)
                + self.soft_penalty(unit_hosts))

    def moved(self, unit_hosts: np.ndarray) -> tuple[int, int]:
        """Migrations and configured MiB moved."""
        vm_hosts = unit_hosts[self.vm_unit]
        mask = vm_hosts != self.start
        return int(mask.sum()), int(self.vm_mem[mask].sum())
