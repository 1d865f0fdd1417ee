"""The greedy DRS-style baseline: the yardstick, and a hint and fallback for CP-SAT.

Description (defined so that anyone can re-implement it)
    1. Mandatory moves first: each unit that must move (its host is being evacuated, or it
       breaks a mandatory rule) goes, in unit order, to the allowed host with the lowest load
       that can take it.
    2. Host load = mean of CPU and memory demand utilisation. Repeatedly apply the single
       migration that most lowers the (population) standard deviation of host load over the
       active hosts, taking VMs from the hottest quarter of hosts (by load, at least one host)
       to the coolest half (at least one host), under capacity and rules, until the best gain is
       below 1e-4 or the budget (migration count, memory moved) is spent. Ties break on the
       lowest VM index, then the lowest host index.
Requirements
    A ``Problem`` (policies applied).
Limitations
    Myopic: one move at a time, on a single combined load, never undoes a move; it does not see
    the migration cost beyond the budget. It never makes a move that breaks a should-rule
    that holds (as DRS's balancing respects "should" rules), and does not fix broken ones.
    Units of several VMs (mandatory affinity groups) are moved only when mandatory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np

from balancer.model.problem import Problem
from balancer.solver.objective import Evaluator

MIN_GAIN = 1e-4


class State:
    """A unit placement with incremental loads and the checks every move must pass."""

    def __init__(self, problem: Problem, ev: Evaluator, unit_hosts: np.ndarray) -> None:
        self.p = problem
        self.ev = ev
        self.hosts = unit_hosts.copy()
        self.cpu, self.memd, self.mem = ev.loads(self.hosts)
        self.vm_unit = ev.vm_unit
        # received[h]: number of VMs on h that did not start there
        vm_hosts = self.hosts[self.vm_unit]
        moved = vm_hosts != ev.start
        self.received = np.bincount(vm_hosts[moved], minlength=len(ev.cpu_cap))
        self.migrations = int(moved.sum())
        self.moved_mem = int(ev.vm_mem[moved].sum())
        self.apart_of = ev.apart_of
        self.cand_mask = ev.cand_mask

    def move_delta(self, u: int, dest: int) -> tuple[int, int, int]:
        """(received VMs added at dest, migrations added, MiB moved added) if u goes to dest."""
        members = self.p.units[u].members
        cur = int(self.hosts[u])
        start = self.ev.start
        d_recv = d_mig = d_mem = 0
        for v in members:
            was = cur != start[v]
            now = dest != start[v]
            d_mig += int(now) - int(was)
            d_mem += (int(now) - int(was)) * int(self.ev.vm_mem[v])
            d_recv += int(now)
        return d_recv, d_mig, d_mem

    def can_move(self, u: int, dest: int) -> bool:
        p = self.p
        if dest == self.hosts[u] or not self.cand_mask[u, dest]:
            return False
        d_recv, d_mig, d_mem = self.move_delta(u, dest)
        if (p.max_migrations is not None and d_mig > 0
                and self.migrations + d_mig > p.max_migrations):
            return False
        if p.max_moved_mem is not None and d_mem > 0 and self.moved_mem + d_mem > p.max_moved_mem:
            return False
        if self.received[dest] + d_recv > 0:
            if self.mem[dest] + self.ev.u_mem[u] > p.mem_limit[dest]:
                return False
            if self.cpu[dest] + self.ev.u_cpu[u] > p.cpu_limit[dest]:
                return False
        for gi in self.apart_of.get(u, ()):
            for other in p.apart[gi].units:
                if other != u and self.hosts[other] == dest:
                    return False
        return not self.breaks_soft(u, dest)

    def breaks_soft(self, u: int, dest: int) -> bool:
        """Moving ``u`` to ``dest`` would break a should-rule that holds now."""
        p = self.p
        cur = int(self.hosts[u])
        for kind, i in self.ev.soft_of.get(u, ()):
            if kind == "prefer":
                hosts = p.prefer[i].hosts
                if cur in hosts and dest not in hosts:
                    return True
            else:
                others = {int(self.hosts[o]) for o in p.apart[i].units if o != u} \
                    if kind == "apart" else \
                    {int(self.hosts[o]) for o in p.together[i].units if o != u}
                if kind == "apart" and dest in others:
                    return True
                if kind == "together" and cur in others and dest not in others:
                    return True
        return False

    def apply(self, u: int, dest: int) -> None:
        ev = self.ev
        src = int(self.hosts[u])
        start = ev.start
        for v in self.p.units[u].members:
            if src != start[v]:
                self.received[src] -= 1
                self.migrations -= 1
                self.moved_mem -= int(ev.vm_mem[v])
            if dest != start[v]:
                self.received[dest] += 1
                self.migrations += 1
                self.moved_mem += int(ev.vm_mem[v])
        self.cpu[src] -= ev.u_cpu[u]
        self.memd[src] -= ev.u_memd[u]
        self.mem[src] -= ev.u_mem[u]
        self.cpu[dest] += ev.u_cpu[u]
        self.memd[dest] += ev.u_memd[u]
        self.mem[dest] += ev.u_mem[u]
        self.hosts[u] = dest

    def violates_mandatory(self, u: int) -> bool:
        """The unit sits where it may not stay (evacuation, vm_host, anti-affinity clash)."""
        h = int(self.hosts[u])
        if not self.cand_mask[u, h]:
            return True
        return any(other != u and self.hosts[other] == h
                   for gi in self.apart_of.get(u, ()) for other in self.p.apart[gi].units)

    def load(self) -> np.ndarray:
        ev = self.ev
        return (self.cpu / ev.cpu_cap + self.memd / ev.mem_cap) / 2.0


def initial_unit_hosts(problem: Problem) -> np.ndarray:
    """Each unit on the start host of its first member."""
    return np.array([problem.start[u.members[0]] for u in problem.units], dtype=np.int64)


def repair(state: State) -> list[int]:
    """Move every unit that breaks a mandatory constraint to its least-loaded feasible host.

    Returns the units that could not be placed.
    """
    stuck = []
    for u, unit in enumerate(state.p.units):
        if unit.pinned or not state.violates_mandatory(u):
            continue
        load = state.load()
        for dest in sorted(unit.candidates, key=lambda h: (load[h], h)):
            if state.can_move(u, dest):
                state.apply(u, dest)
                break
        else:
            stuck.append(u)
    return stuck


def _best_valid(state: State, gain: np.ndarray, cand: np.ndarray, cool: np.ndarray,
                ) -> tuple[int, int] | None:
    """The highest-gain (unit, host) pair that passes every check, if its gain is enough."""
    flat = gain.ravel()
    top = min(flat.size, 64)
    while True:
        idx = np.argpartition(-flat, top - 1)[:top] if top < flat.size else np.arange(flat.size)
        idx = idx[np.lexsort((idx, -flat[idx]))]  # by gain, ties by lowest index
        for i in idx:
            if flat[i] < MIN_GAIN:
                return None
            r, c = divmod(int(i), len(cool))
            u, dest = int(cand[r]), int(cool[c])
            if state.can_move(u, dest):
                return u, dest
        if top >= flat.size:
            return None
        top = min(flat.size, top * 8)


def greedy(problem: Problem, ev: Evaluator | None = None,
           start: np.ndarray | None = None, deadline: float | None = None,
           max_cells: int | None = None, should_stop: Callable[[], bool] | None = None,
           ) -> np.ndarray:
    """Run the baseline; returns the unit placement (host per unit).

    The engine bounds its hint's cost with ``max_cells`` (deterministic: the number of
    (VM, host) pairs scored over all steps) and ``should_stop`` (checked between steps);
    ``deadline`` (a ``time.monotonic()`` value) does the same by wall time. Stopped early, it
    returns the moves made so far, each of which kept the placement valid.
    """
    placed = initial_unit_hosts(problem) if start is None else start
    for step in greedy_steps(problem, ev or Evaluator(problem), placed, max_cells):
        placed = step
        if deadline is not None and time.monotonic() > deadline:
            break
        if should_stop is not None and should_stop():
            break
    return placed


def greedy_steps(problem: Problem, ev: Evaluator, start: np.ndarray,
                 max_cells: int | None = None) -> Iterator[np.ndarray]:
    """The greedy baseline one step at a time: yields the placement after the mandatory moves,
    then after every balancing move (the same array, updated in place). ``max_cells`` stops
    it once that many (VM, host) pairs have been scored."""
    state = State(problem, ev, start)
    repair(state)
    yield state.hosts
    bal = np.array(problem.balanced, dtype=np.int64)
    n = len(bal)
    if n < 2 or problem.balance_weights == (0, 0):
        return
    movable = np.array([u for u, unit in enumerate(problem.units)
                        if not unit.pinned and len(unit.members) == 1], dtype=np.int64)
    if movable.size == 0:
        return
    n_hot = max(1, n // 4)
    n_cool = max(1, n // 2)
    mem_limit = np.array(problem.mem_limit)
    cpu_limit = np.array(problem.cpu_limit)
    cells = 0
    while problem.max_migrations is None or state.migrations < problem.max_migrations:
        if max_cells is not None and cells >= max_cells:
            return
        load_all = state.load()
        load = load_all[bal]
        order = np.lexsort((bal, load))  # ascending load, ties by host index
        cool = bal[order[:n_cool]]
        hot = bal[order[::-1][:n_hot]]
        s1 = load.sum()
        s2 = (load * load).sum()
        std0 = np.sqrt(max(s2 / n - (s1 / n) ** 2, 0.0))
        cand = movable[np.isin(state.hosts[movable], hot)]
        if cand.size == 0:
            return
        cells += cand.size * cool.size
        src = state.hosts[cand]
        a_src = (ev.u_cpu[cand] / ev.cpu_cap[src] + ev.u_memd[cand] / ev.mem_cap[src]) / 2.0
        a_dst = (ev.u_cpu[cand][:, None] / ev.cpu_cap[cool][None, :]
                 + ev.u_memd[cand][:, None] / ev.mem_cap[cool][None, :]) / 2.0
        l_s = load_all[src][:, None]
        l_d = load_all[cool][None, :]
        ns1 = s1 - a_src[:, None] + a_dst
        ns2 = (s2 - l_s ** 2 + (l_s - a_src[:, None]) ** 2 - l_d ** 2 + (l_d + a_dst) ** 2)
        std1 = np.sqrt(np.maximum(ns2 / n - (ns1 / n) ** 2, 0.0))
        # capacity pre-filter (the exact checks run in can_move)
        fits = ((state.mem[cool][None, :] + ev.u_mem[cand][:, None] <= mem_limit[cool][None, :])
                & (state.cpu[cool][None, :] + ev.u_cpu[cand][:, None] <= cpu_limit[cool][None, :]))
        chosen = _best_valid(state, np.where(fits, std0 - std1, -np.inf), cand, cool)
        if chosen is None:
            return
        state.apply(*chosen)
        yield state.hosts


def trim_to_budget(problem: Problem, ev: Evaluator, unit_hosts: np.ndarray) -> np.ndarray | None:
    """Undo moves of ``unit_hosts`` until the budgets hold, cheapest first.

    Each round scores every undoable move by how much undoing it raises the objective per unit
    of budget it frees (memory when the memory budget is exceeded, else one migration), and
    undoes the cheapest ones — a quarter of the excess per round, so a plan far over its budget
    is trimmed in a few rounds. Returns ``None`` when undoing optional moves cannot meet the
    budgets.
    """
    st = State(problem, ev, unit_hosts)
    home = ev.unit_home
    w_cpu, w_mem = problem.balance_weights

    def over() -> tuple[int, int]:
        k = problem.max_migrations
        g = problem.max_moved_mem
        return (max(0, st.migrations - k) if k is not None else 0,
                max(0, st.moved_mem - g) if g is not None else 0)

    def pen(cpu: np.ndarray, memd: np.ndarray, hosts: np.ndarray) -> np.ndarray:
        pc = Evaluator._penalty_rows(ev.tan_cpu, hosts, cpu - ev.target_cpu[hosts])
        pm = Evaluator._penalty_rows(ev.tan_mem, hosts, memd - ev.target_mem[hosts])
        return np.where(ev.balanced_mask[hosts], w_cpu * pc + w_mem * pm, 0)

    while any(over()):
        count_over, mem_over = over()
        us = np.nonzero((st.hosts != home) & (home >= 0) & ~ev.unit_pinned)[0]
        if us.size == 0:
            return None
        src, dst = st.hosts[us], home[us]
        before = pen(st.cpu[src], st.memd[src], src) + pen(st.cpu[dst], st.memd[dst], dst)
        after = (pen(st.cpu[src] - ev.u_cpu[us], st.memd[src] - ev.u_memd[us], src)
                 + pen(st.cpu[dst] + ev.u_cpu[us], st.memd[dst] + ev.u_memd[us], dst))
        delta = (after - before) - ev.u_move_cost[us]
        freed = ev.u_mem[us].astype(float) if mem_over else np.ones(len(us))
        order = np.argsort(delta / np.maximum(freed, 1.0), kind="stable")
        if mem_over:
            batch = max(1, int(mem_over / max(1.0, float(ev.u_mem[us].mean())) / 4))
        else:
            batch = max(1, count_over // 4)
        undone = 0
        for i in order:
            u = int(us[i])
            if st.can_move(u, int(home[u])):
                st.apply(u, int(home[u]))
                undone += 1
                if undone >= batch or not any(over()):
                    break
        if undone == 0:
            return None
    return st.hosts
