"""Fleet-scale pre-balancing: hot and cold hosts paired, one move per pair per round (numpy).

At thousands of hosts a neighbourhood search that frees a few hosts per step touches only a
fraction of the fleet within its effort. This pass balances the whole fleet first, cheaply:

    each round sorts the balanced hosts by their deviation from the target (round r uses the
    total deviation, CPU + memory, on even rounds and CPU - memory on odd ones, so CPU-heavy
    hosts also meet memory-heavy ones) and pairs the i-th from the top with the i-th from
    the bottom; for every pair it scores, vectorised, moving each eligible unit of the first
    host to the second by the change of the engine's objective (balance term of both hosts,
    migration cost) and applies the best move of each pair if it lowers the objective and
    keeps capacity on the receiving host. The pairs share no host, so the moves of a round
    are independent and their gains add up exactly.

Units under a rule (anti-affinity, should-rules) and pinned units are left to the search
that follows; a unit must have the partner host among its candidates. The number of rounds
is fixed, the order of everything is fixed, so the result depends only on the input.
"""

from __future__ import annotations

import numpy as np

from balancer.model.problem import Problem
from balancer.solver.objective import Evaluator


def _eligible(problem: Problem, ev: Evaluator) -> np.ndarray:
    """Units this pass may move: not pinned, no rule, members started on one host."""
    ok = ~ev.unit_pinned & (ev.unit_home >= 0)
    ruled = list(ev.apart_of) + list(ev.soft_of)
    if ruled:
        ok[np.array(ruled, dtype=np.int64)] = False
    return ok


def pair_rounds(problem: Problem, ev: Evaluator, unit_hosts: np.ndarray, rounds: int,
                ) -> tuple[np.ndarray, int]:
    """Run up to ``rounds`` rounds (see the module doc) from ``unit_hosts``, which must keep
    every hard constraint (so does the answer). Returns (placement, moves applied); stops
    early when a round finds nothing."""
    hosts = unit_hosts.copy()
    bal = np.array(problem.balanced, dtype=np.int64)
    if len(bal) < 2:
        return hosts, 0
    eligible = _eligible(problem, ev)
    units = np.nonzero(eligible)[0]
    w_cpu, w_mem = problem.balance_weights
    mem_limit = np.asarray(problem.mem_limit, dtype=np.int64)
    cpu_limit = np.asarray(problem.cpu_limit, dtype=np.int64)
    cpu, memd, mem = ev.loads(hosts)
    vm_hosts = hosts[ev.vm_unit]
    received = np.bincount(vm_hosts[vm_hosts != ev.start], minlength=len(ev.cpu_cap))
    home = ev.unit_home
    applied = 0

    def pen(h: np.ndarray, c: np.ndarray, m: np.ndarray) -> np.ndarray:
        pc = Evaluator._penalty_rows(ev.tan_cpu, h, c - ev.target_cpu[h])
        pm = Evaluator._penalty_rows(ev.tan_mem, h, m - ev.target_mem[h])
        return w_cpu * pc + w_mem * pm

    for r in range(rounds):
        dc = (cpu[bal] - ev.target_cpu[bal]) / ev.cpu_cap[bal]
        dm = (memd[bal] - ev.target_mem[bal]) / ev.mem_cap[bal]
        key = dc + dm if r % 2 == 0 else dc - dm
        order = bal[np.lexsort((bal, -key))]
        half = len(order) // 2
        partner = np.full(len(ev.cpu_cap), -1, dtype=np.int64)
        partner[order[:half]] = order[::-1][:half]  # hot host -> its cold partner
        src = hosts[units]
        dst = partner[src]
        sel = dst >= 0
        us, a, b = units[sel], src[sel], dst[sel]
        ok = ev.cand_mask[us, b]
        us, a, b = us[ok], a[ok], b[ok]
        if len(us) == 0:
            break
        uc, um, ug = ev.u_cpu[us], ev.u_memd[us], ev.u_mem[us]
        # capacity on the receiving host (it receives a VM unless the unit goes home)
        going_home = b == home[us]
        fits = (mem[b] + ug <= mem_limit[b]) & (cpu[b] + uc <= cpu_limit[b])
        fits |= going_home & (received[b] == 0)
        gain = (pen(a, cpu[a] - uc, memd[a] - um) + pen(b, cpu[b] + uc, memd[b] + um)
                - pen(a, cpu[a], memd[a]) - pen(b, cpu[b], memd[b]))
        cost = ev.u_move_cost[us]
        delta = gain + np.where(going_home, 0, cost) - np.where(a == home[us], 0, cost)
        cand = np.nonzero(fits & (delta < 0))[0]
        if len(cand) == 0:
            break
        # the best move of each pair (by source host), ties by the lowest unit index
        cand = cand[np.lexsort((us[cand], delta[cand], a[cand]))]
        first = np.ones(len(cand), dtype=bool)
        first[1:] = a[cand][1:] != a[cand][:-1]
        for i in cand[first].tolist():
            u, h_from, h_to = int(us[i]), int(a[i]), int(b[i])
            hosts[u] = h_to
            cpu[h_from] -= uc[i]
            memd[h_from] -= um[i]
            mem[h_from] -= ug[i]
            cpu[h_to] += uc[i]
            memd[h_to] += um[i]
            mem[h_to] += ug[i]
            n = len(problem.units[u].members)
            received[h_from] -= 0 if h_from == home[u] else n
            received[h_to] += 0 if h_to == home[u] else n
            applied += 1
    return hosts, applied
