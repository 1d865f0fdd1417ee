"""Budgeted local search on the judged imbalance: add, re-target, undo and swap moves.

A budget (at most K migrations, at most G MiB moved) makes the plan a choice of a few moves.
The price search (``balancer.solver.price``) finds good plans near the budget with the
engine's objective (a weighted sum of squared deviations plus a price per MiB); this pass
finishes the job on the measure plans are judged by, ``cpu std + mem std`` of active-host
utilisation (``gains.Imbalance``), with the budget as a hard limit:

    each round evaluates, exactly and vectorised (numpy), every single operation on the plan
      - move a unit that is home to another candidate host (add),
      - move a moved unit to another host, or back home (re-target, undo),
    and every *swap*: undo one moved unit and make one of the best single operations;
    the best operation that keeps every hard constraint (capacity, mandatory rules, budgets)
    and every should-rule that holds is applied; the search stops when no operation lowers
    the imbalance by more than ``MIN_STEP`` or after ``rounds`` rounds (a deterministic count).

Best improvement, ties broken by the lowest index, so the result depends only on the input.
"""

from __future__ import annotations

import numpy as np

from balancer.model.problem import Problem
from balancer.solver.gains import Imbalance
from balancer.solver.greedy import State
from balancer.solver.objective import Evaluator

MIN_STEP = 1e-7  # an operation must lower the imbalance by more than this
SWAP_POOL = 256  # single operations tried as the second half of a swap


def _ops(problem: Problem, ev: Evaluator, st: State, movable: np.ndarray,
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every (unit, destination) pair that passes the cheap vectorised checks, with its change
    of migrations and of MiB moved. Units whose members started apart are left out."""
    home = ev.unit_home[movable]
    ok_u = home >= 0
    us = movable[ok_u]
    home = home[ok_u]
    cur = st.hosts[us]
    mask = ev.cand_mask[us].copy()
    mask[np.arange(len(us)), cur] = False
    # capacity on the destination (a unit going home needs no room if its host receives
    # nothing else: the exact check below decides)
    fits = ((st.mem[None, :] + ev.u_mem[us][:, None] <= np.asarray(problem.mem_limit)[None, :])
            & (st.cpu[None, :] + ev.u_cpu[us][:, None]
               <= np.asarray(problem.cpu_limit)[None, :]))
    fits[np.arange(len(us)), home] = True
    mask &= fits
    ri, hs = np.nonzero(mask)
    u = us[ri]
    n_members = np.bincount(ev.vm_unit, minlength=len(problem.units))[u]
    was = (cur[ri] != home[ri]).astype(np.int64)
    now = (hs != home[ri]).astype(np.int64)
    d_mig = (now - was) * n_members
    d_mem = (now - was) * ev.u_mem[u]
    return u, hs, d_mig, d_mem


def improve(problem: Problem, ev: Evaluator, unit_hosts: np.ndarray, rounds: int = 400,
            imb: Imbalance | None = None) -> np.ndarray:
    """Lower the plan's ``cpu std + mem std`` within the problem's budgets (see the module
    doc). ``unit_hosts`` must satisfy every hard constraint; so does the answer."""
    imb = imb or Imbalance.of(problem, ev)
    st = State(problem, ev, unit_hosts)
    movable = np.nonzero(~ev.unit_pinned)[0]
    k_max, g_max = problem.max_migrations, problem.max_moved_mem
    home_of = ev.unit_home
    for _ in range(rounds):
        cpu = st.cpu.astype(float)
        memd = st.memd.astype(float)
        base = imb.value(cpu, memd)
        u, hs, d_mig, d_mem = _ops(problem, ev, st, movable)
        if len(u) == 0:
            break
        src = st.hosts[u]
        single = imb.shift(cpu, memd, src, hs, ev.u_cpu[u].astype(float),
                           ev.u_memd[u].astype(float))
        room_mig = np.inf if k_max is None else k_max - st.migrations
        room_mem = np.inf if g_max is None else g_max - st.moved_mem
        within = (d_mig <= room_mig) & (d_mem <= room_mem)
        best_val, best = base - MIN_STEP, None
        # single operations, best first
        cand = np.nonzero(within & (single < best_val))[0]
        order = cand[np.lexsort((cand, single[cand]))]
        for i in order[:32].tolist():
            if st.can_move(int(u[i]), int(hs[i])):
                best_val, best = float(single[i]), ((int(u[i]), int(hs[i])),)
                break
        # swaps: undo one moved unit, then one of the best single operations
        moved = np.nonzero((st.hosts[u] != home_of[u]) & (hs == home_of[u]))[0]
        if len(moved):
            pool = np.argsort(single, kind="stable")[:SWAP_POOL]
            for j in moved.tolist():
                a = int(u[j])
                h_from, h_home = int(src[j]), int(home_of[a])
                c2, m2 = cpu.copy(), memd.copy()
                c2[h_from] -= ev.u_cpu[a]
                m2[h_from] -= ev.u_memd[a]
                c2[h_home] += ev.u_cpu[a]
                m2[h_home] += ev.u_memd[a]
                sel = pool[(u[pool] != a) & (d_mig[pool] + d_mig[j] <= room_mig)
                           & (d_mem[pool] + d_mem[j] <= room_mem)]
                if len(sel) == 0:
                    continue
                vals = imb.shift(c2, m2, st.hosts[u[sel]], hs[sel],
                                 ev.u_cpu[u[sel]].astype(float),
                                 ev.u_memd[u[sel]].astype(float))
                good = np.nonzero(vals < best_val)[0]
                if len(good) == 0:
                    continue
                good = good[np.lexsort((sel[good], vals[good]))]
                trial = None
                for g in good[:8].tolist():
                    i = int(sel[g])
                    if trial is None:
                        trial = State(problem, ev, st.hosts)
                        if not trial.can_move(a, h_home):
                            break
                        trial.apply(a, h_home)
                    if trial.can_move(int(u[i]), int(hs[i])):
                        best_val, best = float(vals[g]), ((a, h_home), (int(u[i]), int(hs[i])))
                        break
        if best is None:
            break
        for a, h in best:
            st.apply(a, h)
    return st.hosts
