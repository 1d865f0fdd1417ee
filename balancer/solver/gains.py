"""Each move's own effect, and the final pass that keeps only balancing moves that pay.

A plan's *balancing* moves are those nothing forces: no evacuation, no rule to fix, no
should-rule followed, no room to make for a forced move. The *own gain* of such a move is how
much the imbalance reported to people (CPU std + memory std of active-host utilisation, as in
``balancer.model.util_stats``) would rise if that move alone were undone and the rest of the
plan kept. ``drop_unpaid`` undoes, until none is left, every balancing move whose own gain is
not positive, as long as undoing it keeps every hard constraint (capacity, mandatory rules,
budgets) and every should-rule that holds. A move that cannot be undone because another move
needs the room it frees is not a balancing move: it makes room, and says so.

Everything here is numpy over the moved units, so the pass costs little even at fleet scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from balancer.model.problem import Problem
from balancer.solver.greedy import State
from balancer.solver.objective import Evaluator

MIN_OWN_GAIN = 1e-9  # a gain at or below this is "not positive" (float noise)


@dataclass
class Imbalance:
    """CPU std + memory std of demand utilisation over active hosts, with fast what-ifs."""

    active: np.ndarray  # bool per host
    inv_cpu: np.ndarray  # 1 / capacity, 0 on inactive hosts
    inv_mem: np.ndarray
    n: int

    @classmethod
    def of(cls, problem: Problem, ev: Evaluator) -> Imbalance:
        active = np.array([h.active for h in problem.snapshot.hosts], dtype=bool)
        inv_cpu = np.where(active, 1.0 / np.maximum(ev.cpu_cap, 1), 0.0)
        inv_mem = np.where(active, 1.0 / np.maximum(ev.mem_cap, 1), 0.0)
        return cls(active=active, inv_cpu=inv_cpu, inv_mem=inv_mem, n=int(active.sum()))

    def value(self, cpu: np.ndarray, memd: np.ndarray) -> float:
        if self.n == 0:
            return 0.0
        x = (cpu * self.inv_cpu)[self.active]
        y = (memd * self.inv_mem)[self.active]
        return float(np.std(x) + np.std(y))

    def shift(self, cpu: np.ndarray, memd: np.ndarray, src: np.ndarray, dst: np.ndarray,
              d_cpu: np.ndarray, d_mem: np.ndarray) -> np.ndarray:
        """Imbalance after moving load ``d_*[i]`` from host ``src[i]`` to ``dst[i]``, each
        move alone (vectorised; ``src != dst``)."""
        if self.n == 0:
            return np.zeros(len(src))
        out = np.zeros(len(src))
        for load, inv, d in ((cpu, self.inv_cpu, d_cpu), (memd, self.inv_mem, d_mem)):
            x = load * inv
            s1 = x.sum()
            s2 = (x * x).sum()
            xs, xd = x[src], x[dst]
            ns = xs - d * inv[src]
            nd = xd + d * inv[dst]
            n1 = s1 - xs + ns - xd + nd
            n2 = s2 - xs * xs + ns * ns - xd * xd + nd * nd
            out += np.sqrt(np.maximum(n2 / self.n - (n1 / self.n) ** 2, 0.0))
        return out


def forced_units(problem: Problem, ev: Evaluator, unit_hosts: np.ndarray) -> set[int]:
    """Moved units whose move something other than balance asks for."""
    forced = set(problem.mandatory_reason)
    for pref in problem.prefer:
        for u in pref.units:
            home = int(ev.unit_home[u])
            if home >= 0 and home not in pref.hosts and int(unit_hosts[u]) in pref.hosts:
                forced.add(u)
    return forced


def moved_units(ev: Evaluator, unit_hosts: np.ndarray) -> np.ndarray:
    """Units away from the host all their members started on (split units excluded)."""
    home = ev.unit_home
    return np.nonzero((home >= 0) & (unit_hosts != home) & ~ev.unit_pinned)[0]


def own_gains(problem: Problem, ev: Evaluator, unit_hosts: np.ndarray, units: np.ndarray,
              imb: Imbalance | None = None) -> np.ndarray:
    """For each unit in ``units`` (moved, with a home): imbalance if it alone went back home,
    minus the plan's imbalance. Positive: the move helps."""
    imb = imb or Imbalance.of(problem, ev)
    cpu, memd, _ = ev.loads(unit_hosts)
    cpu = cpu.astype(float)
    memd = memd.astype(float)
    base = imb.value(cpu, memd)
    if len(units) == 0:
        return np.zeros(0)
    after = imb.shift(cpu, memd, unit_hosts[units], ev.unit_home[units],
                      ev.u_cpu[units].astype(float), ev.u_memd[units].astype(float))
    return after - base


def drop_unpaid(problem: Problem, ev: Evaluator, unit_hosts: np.ndarray,
                ) -> tuple[np.ndarray, int, dict[int, str]]:
    """Undo balancing moves whose own gain is not positive, worst first, until none is left.

    Returns (placement, moves undone, {unit: why it stays though its own gain is not
    positive}); a unit in the last map is reported as making room, not as balancing.
    """
    if problem.only_mandatory:
        return unit_hosts, 0, {}
    imb = Imbalance.of(problem, ev)
    st = State(problem, ev, unit_hosts)
    forced = forced_units(problem, ev, unit_hosts)
    blocked: dict[int, str] = {}
    undone = 0
    while True:
        units = np.array([u for u in moved_units(ev, st.hosts).tolist()
                          if u not in forced and u not in blocked], dtype=np.int64)
        if units.size == 0:
            break
        gains = own_gains(problem, ev, st.hosts, units, imb)
        bad = np.nonzero(gains <= MIN_OWN_GAIN)[0]
        if bad.size == 0:
            break
        bad = bad[np.lexsort((units[bad], gains[bad]))]  # worst first, ties by unit
        touched: set[int] = set()
        for i in bad.tolist():
            u = int(units[i])
            a, b = int(st.hosts[u]), int(ev.unit_home[u])
            if a in touched or b in touched:
                continue  # gains of moves on these hosts changed; next round
            if st.can_move(u, b):
                st.apply(u, b)
                undone += 1
                touched.update((a, b))
            else:
                blocked[u] = _why_blocked(problem, ev, st, u, b)
        # each round undoes a move or blocks one, so the loop ends
    return st.hosts, undone, blocked


def _why_blocked(problem: Problem, ev: Evaluator, st: State, u: int, home: int) -> str:
    """Why unit ``u`` cannot go back to ``home``: which moves use the room it freed."""
    snap = problem.snapshot
    vm_hosts = st.hosts[ev.vm_unit]
    arrivals = [snap.vms[v].name for v in np.nonzero((vm_hosts == home)
                                                     & (ev.start != home))[0].tolist()]
    if arrivals:
        shown = ", ".join(arrivals[:3]) + (f" and {len(arrivals) - 3} more"
                                           if len(arrivals) > 3 else "")
        return f"makes room on {snap.hosts[home].name} for {shown}"
    return f"keeps a rule that moving it back to {snap.hosts[home].name} would break"
