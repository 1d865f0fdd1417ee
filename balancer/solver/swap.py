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
SWAP_UNDO = 64  # moves tried as the first half (those whose undo costs least)


def _ops(problem: Problem, ev: Evaluator, st: State, imb: Imbalance, us: np.ndarray,
         home: np.ndarray, cand: np.ndarray, members: np.ndarray, cpu: np.ndarray,
         memd: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every (unit, destination) pair of the units ``us`` (whose members started together, at
    ``home``; ``cand`` their candidate mask, ``members`` the VMs per unit) that passes the
    cheap vectorised checks, with its change of migrations and of MiB moved and the imbalance
    after it alone (computed densely over units x hosts: the sum of utilisations changes by
    the unit's share on its host and on the destination, the sum of squares likewise)."""
    cur = st.hosts[us]
    rows = np.arange(len(us))
    # capacity on the destination (a unit going home needs no room if its host receives
    # nothing else: the exact check below decides)
    fits = ((st.mem[None, :] + ev.u_mem[us][:, None] <= np.asarray(problem.mem_limit)[None, :])
            & (st.cpu[None, :] + ev.u_cpu[us][:, None]
               <= np.asarray(problem.cpu_limit)[None, :]))
    fits[rows, home] = True
    mask = cand & fits
    mask[rows, cur] = False
    ri, hs = np.nonzero(mask)
    u = us[ri]
    n_members = members[u]
    was = (cur[ri] != home[ri]).astype(np.int64)
    now = (hs != home[ri]).astype(np.int64)
    d_mig = (now - was) * n_members
    d_mem = (now - was) * ev.u_mem[u]
    if imb.n == 0:
        return u, hs, d_mig, d_mem, np.zeros(len(u))
    dense = np.zeros(mask.shape)
    inv_n = 1.0 / imb.n
    for load, inv, dem in ((cpu, imb.inv_cpu, ev.u_cpu), (memd, imb.inv_mem, ev.u_memd)):
        x = load * inv
        s1, s2 = x.sum(), (x * x).sum()
        d = dem[us].astype(float)
        a = d * inv[cur]  # utilisation leaving the unit's host
        b = np.multiply.outer(d, inv)  # arriving on each destination
        m1 = (b + (s1 - a)[:, None]) * inv_n  # mean after: (s1 - a + b) / n
        m1 *= m1
        b *= b + 2 * x  # b^2 + 2 b x_h
        b += (s2 + a * (a - 2 * x[cur]))[:, None]  # sum of squares after
        b *= inv_n
        b -= m1
        np.maximum(b, 0.0, out=b)
        dense += np.sqrt(b, out=b)
    return u, hs, d_mig, d_mem, dense[ri, hs]


def improve(problem: Problem, ev: Evaluator, unit_hosts: np.ndarray, rounds: int = 400,
            imb: Imbalance | None = None) -> np.ndarray:
    """Lower the plan's ``cpu std + mem std`` within the problem's budgets (see the module
    doc). ``unit_hosts`` must satisfy every hard constraint; so does the answer."""
    imb = imb or Imbalance.of(problem, ev)
    st = State(problem, ev, unit_hosts)
    movable = np.nonzero(~ev.unit_pinned)[0]
    k_max, g_max = problem.max_migrations, problem.max_moved_mem
    home_of = ev.unit_home
    # units whose members started apart are left out
    us = movable[home_of[movable] >= 0]
    home = home_of[us]
    cmask = ev.cand_mask[us]
    members = np.bincount(ev.vm_unit, minlength=len(problem.units))
    for _ in range(rounds):
        cpu = st.cpu.astype(float)
        memd = st.memd.astype(float)
        base = imb.value(cpu, memd)
        u, hs, d_mig, d_mem, single = _ops(problem, ev, st, imb, us, home, cmask, members, cpu,
                                          memd)
        if len(u) == 0:
            break
        src = st.hosts[u]
        room_mig = np.inf if k_max is None else k_max - st.migrations
        room_mem = np.inf if g_max is None else g_max - st.moved_mem
        within = (d_mig <= room_mig) & (d_mem <= room_mem)
        best_val, best = base - MIN_STEP, None
        # single operations, best first
        cand = np.nonzero(within & (single < best_val))[0]
        cand = _smallest(cand, single[cand], 32)
        for i in cand.tolist():
            if st.can_move(int(u[i]), int(hs[i])):
                best_val, best = float(single[i]), ((int(u[i]), int(hs[i])),)
                break
        # swaps: undo one moved unit, then one of the best single operations (all pairs at
        # once: the two moves' effects on sum and sum of squares add, plus a cross term on
        # the hosts they share)
        moved = np.nonzero((st.hosts[u] != home_of[u]) & (hs == home_of[u]))[0]
        if len(moved):
            moved = _smallest(moved, single[moved], SWAP_UNDO)
            pool = _smallest(np.arange(len(single)), single, SWAP_POOL)
            vals = _pair_values(imb, cpu, memd, ev, u, src, hs, moved, pool)
            ok = ((u[moved][:, None] != u[pool][None, :])
                  & (d_mig[moved][:, None] + d_mig[pool][None, :] <= room_mig)
                  & (d_mem[moved][:, None] + d_mem[pool][None, :] <= room_mem)
                  & (vals < best_val))
            jj, ii = np.nonzero(ok)
            if len(jj):
                order = np.lexsort((pool[ii], moved[jj], vals[jj, ii]))
                tried = 0
                for t in order.tolist():
                    if tried >= 16:
                        break
                    tried += 1
                    j, i = int(moved[jj[t]]), int(pool[ii[t]])
                    a, h_home = int(u[j]), int(home_of[u[j]])
                    trial = State(problem, ev, st.hosts)
                    if not trial.can_move(a, h_home):
                        continue
                    trial.apply(a, h_home)
                    if trial.can_move(int(u[i]), int(hs[i])):
                        best_val = float(vals[jj[t], ii[t]])
                        best = ((a, h_home), (int(u[i]), int(hs[i])))
                        break
        if best is None:
            break
        for a, h in best:
            st.apply(a, h)
    return st.hosts


def _pair_values(imb: Imbalance, cpu: np.ndarray, memd: np.ndarray, ev: Evaluator,
                 u: np.ndarray, src: np.ndarray, dst: np.ndarray, first: np.ndarray,
                 second: np.ndarray) -> np.ndarray:
    """Imbalance after operation ``first[j]`` and then ``second[i]``, for every (j, i):
    a (len(first), len(second)) array. Exact: the sum of utilisations changes by the sum of
    the two operations' changes, the sum of squares by theirs plus twice the product of
    their changes on each host they share."""
    if imb.n == 0:
        return np.zeros((len(first), len(second)))
    out = np.zeros((len(first), len(second)))
    for load, inv, dem in ((cpu, imb.inv_cpu, ev.u_cpu), (memd, imb.inv_mem, ev.u_memd)):
        x = load * inv
        s1, s2 = x.sum(), (x * x).sum()

        a1, b1, da1, db1, l1, q1 = _parts(x, inv, dem[u[first]], src[first], dst[first])
        a2, b2, da2, db2, l2, q2 = _parts(x, inv, dem[u[second]], src[second], dst[second])
        cross = np.zeros((len(first), len(second)))
        for h1, d1 in ((a1, da1), (b1, db1)):
            for h2, d2 in ((a2, da2), (b2, db2)):
                cross += np.where(h1[:, None] == h2[None, :], d1[:, None] * d2[None, :], 0.0)
        n1 = s1 + l1[:, None] + l2[None, :]
        n2 = s2 + q1[:, None] + q2[None, :] + 2 * cross
        out += np.sqrt(np.maximum(n2 / imb.n - (n1 / imb.n) ** 2, 0.0))
    return out


def _parts(x: np.ndarray, inv: np.ndarray, dem: np.ndarray, a: np.ndarray, b: np.ndarray,
           ) -> tuple[np.ndarray, ...]:
    """Per operation (load ``dem`` from host ``a`` to ``b``): hosts, utilisation changes on
    each, change of the sum and of the sum of squares of utilisations."""
    d = dem.astype(float)
    da, db = -d * inv[a], d * inv[b]
    q = 2 * x[a] * da + da * da + 2 * x[b] * db + db * db
    return a, b, da, db, da + db, q


def _smallest(idx: np.ndarray, key: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` entries of ``idx`` with the smallest ``key``, ordered by (key, idx)."""
    if len(idx) > k:
        part = np.argpartition(key, k - 1)[:k]
        cut = key[part].max()
        keep = key <= cut  # ties at the cut: keep them all, the sort below decides
        idx, key = idx[keep], key[keep]
    order = np.lexsort((idx, key))[:k]
    return idx[order]


def kick_improve(problem: Problem, ev: Evaluator, unit_hosts: np.ndarray, kicks: int,
                 kick_size: int, seed: int, rounds: int = 400,
                 imb: Imbalance | None = None) -> np.ndarray:
    """Iterated local search: ``kicks`` times, undo ``kick_size`` moves of the best plan drawn
    at random (seeded: the result depends only on the input and ``seed``), improve the rest
    with ``improve`` and keep the result if its imbalance is lower. A move is undone only if
    ``State.can_move`` allows its unit home (forced moves stay). ``unit_hosts`` must satisfy
    every hard constraint; so does the answer."""
    imb = imb or Imbalance.of(problem, ev)
    rng = np.random.default_rng(seed)
    home = ev.unit_home

    def value(hosts: np.ndarray) -> float:
        cpu, memd, _ = ev.loads(hosts)
        return imb.value(cpu.astype(float), memd.astype(float))

    best = unit_hosts.copy()
    best_val = value(best)
    for _ in range(kicks):
        moved = np.nonzero((best != home) & (home >= 0) & ~ev.unit_pinned)[0]
        if len(moved) == 0:
            break
        st = State(problem, ev, best)
        for u in rng.choice(moved, size=min(kick_size, len(moved)), replace=False).tolist():
            if st.can_move(int(u), int(home[u])):
                st.apply(int(u), int(home[u]))
        cand = improve(problem, ev, st.hosts, rounds=rounds, imb=imb)
        v = value(cand)
        if v < best_val - MIN_STEP:
            best, best_val = cand, v
    return best
