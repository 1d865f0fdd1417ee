"""The placement engine: CP-SAT over neighbourhoods of the cluster (large neighbourhood search).

Description
    1. Start from the better (by objective) of the current placement and the greedy baseline's
       answer, among those that satisfy every hard constraint. If neither does (evacuation or a
       broken mandatory rule that greedy could not fix), a *repair* model frees the offending
       units with all their allowed hosts plus the units on the least-loaded of those hosts,
       widening until CP-SAT finds a feasible placement or proves that none exists.
    2. If the whole problem is small (units x candidate hosts under ``full_model_pairs``), solve
       it whole: CP-SAT proves optimality or returns its bound.
    3. Otherwise (and with the remaining time) improve by large neighbourhood search: pick a
       few hosts (one drawn by its share of the imbalance, partners whose CPU/memory deviation
       best complements it, and random ones), free every movable unit on them (and, when a
       budget binds, every unit already moved, so the budget can be spent elsewhere), solve that
       sub-model with the incumbent as hint, and keep the answer if the whole objective drops.
       Steps start with pairs of hosts; the neighbourhood grows when steps stop improving and
       shrinks when CP-SAT cannot prove a step optimal; the search stops early once the largest
       neighbourhoods find nothing more.
    4. With a budget, step 3 runs without it at prices walked down from a high one until the
       plan breaks the budget, then bisected (``price.py``), over-budget plans are trimmed,
       and the best plans within the budget are finished by the budgeted local search on the
       judged imbalance (``swap.py``).
    The same model (``cpsat.build``) serves every step; only the free set differs.
Requirements
    A ``Problem`` from ``policies.build_problem``.
Limitations
    Beyond the whole-model case the answer is not proven optimal; the bound reported then is
    the fluid relaxation's (``bound.py``), weak where single VMs are large. Deterministic for
    a given seed when stopped by ``max_iterations`` or ``max_dtime`` rather than wall time.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np
from ortools.sat.python import cp_model

from balancer.errors import InfeasibleError
from balancer.model import Placement
from balancer.model.problem import Problem, vm_placement
from balancer.solver import bound as bound_mod
from balancer.solver import cpsat, pairs, swap
from balancer.solver import price as price_mod
from balancer.solver.gains import Imbalance
from balancer.solver.greedy import State, greedy, initial_unit_hosts, trim_to_budget
from balancer.solver.objective import Evaluator
from balancer.solver.price import Priced, best_within, measure, reprice, search_budget

log = logging.getLogger(__name__)


class Status(str, Enum):
    OPTIMAL = "OPTIMAL"  # proven optimal (whole model)
    FEASIBLE = "FEASIBLE"  # a valid plan, not proven optimal
    INFEASIBLE = "INFEASIBLE"  # proven: no placement satisfies the hard constraints
    NO_SOLUTION_IN_TIME = "NO_SOLUTION_IN_TIME"


@dataclass(frozen=True)
class EngineOptions:
    """How hard to search. The effort is counted in deterministic units (CP-SAT deterministic
    time ``max_dtime`` and LNS steps ``max_iterations``), so the same problem and seed give
    the same plan on a busy machine; ``time_limit`` is a wall-clock safety stop, and when it
    fires the result says so (``stopped_by == "wall_clock"``)."""

    time_limit: float = 10.0  # wall seconds for the whole solve (a safety stop)
    seed: int = 0
    workers: int = 1  # CP-SAT workers per sub-model
    max_iterations: int | None = None  # LNS steps (deterministic stop)
    max_dtime: float | None = None  # CP-SAT deterministic time over all steps (deterministic)
    # model size built over all steps (CP-SAT variables + constraints), a deterministic proxy
    # of the time spent building models in Python
    max_work: int | None = None
    full_model_pairs: int = 1500
    full_dtime: float = 5.0  # deterministic-time limit of the whole-model solve
    max_neighbourhood_hosts: int = 6
    step_dtime: float = 0.5  # deterministic-time limit of one LNS step
    greedy_cells: int | None = 50_000_000  # (VM, host) pairs the greedy hint may score
    budget_explore: float = 0.6  # share of the effort spent exploring without the budgets
    price: float | None = None  # the threshold's price per MiB (budgets are searched by price)
    fixed_cost_mb: float = 1024.0  # the fixed part of a move's price
    price_steps: int = 6  # bisection steps of the price search (budget_descent off)
    # the price search walks down from descent_high by descent_ratio per step, from the
    # current placement, until a plan breaks the budget, then bisects descent_bisect times
    budget_descent: bool = True
    descent_high: float = 60_000.0
    descent_ratio: float = 0.45
    descent_bisect: int = 3
    reopen_moved: int = 12  # moved units re-opened per LNS step while a budget binds
    swap_starts: int = 3  # plans within a budget improved by the budgeted local search
    swap_rounds: int = 400  # its rounds (each applies one add, re-target, undo or swap)
    # then the best plan within the budget goes through an iterated local search: this many
    # kicks, each undoing ``kick_size`` moves drawn at random (seeded) before the local search
    kicks: int = 12
    kick_size: int = 8
    # with a count budget (and no memory budget) the plan is a choice of K moves: more kicks,
    # each undoing a share of them (at least kick_size)
    count_kicks: int = 24
    count_kick_share: float = 1 / 3
    frontier_swap_rounds: int = 60  # the same, per frontier point
    # between two price points of the frontier, this many points solved by memory budget
    # (the plan of the point that moves more, trimmed to a memory level between the two and
    # finished by the budgeted local search), so any memory level has a plan nearby
    frontier_fill: int = 2
    frontier_fill_rounds: int = 30  # local search rounds per such point
    # decomposition (large clusters): disjoint host groups solved side by side
    # balanced hosts from which the decomposition runs; None: never (the default: measured
    # worse than LNS alone for the same CPU on 500 hosts / 10,000 VMs, docs/benchmarks.md)
    decompose_min_hosts: int | None = None
    group_hosts: int = 8  # hosts per group
    group_dtime: float = 0.3  # deterministic-time limit of one group's model
    decompose_rounds: int = 3  # rounds, each with a different grouping
    threads: int = 2  # group models solved at once (CP-SAT releases the GIL while solving)
    # fleet scale: hot and cold hosts paired, one move per pair per round (``pairs.py``),
    # before the search, from this many balanced hosts (None: never)
    pairs_min_hosts: int | None = 200
    pair_rounds: int = 60
    fluid_bound: bool = True  # report the fluid relaxation's bound (an LP, ``bound.py``)


@dataclass
class SolveResult:
    status: Status
    unit_hosts: np.ndarray
    placement: Placement
    objective: int
    bound: int
    seconds: float
    stopped_by: str = "effort"  # optimal | converged | effort | stop | wall_clock
    iterations: int = 0
    improvements: int = 0
    start_objective: int = 0
    greedy_objective: int | None = None
    stats: dict[str, float] = field(default_factory=dict)


def mandatory_violations(problem: Problem, ev: Evaluator, unit_hosts: np.ndarray) -> list[str]:
    """Hard constraints the unit placement breaks (empty: feasible)."""
    st = State(problem, ev, unit_hosts)
    out = []
    for u in range(len(problem.units)):
        if st.violates_mandatory(u):
            out.append(f"unit {u}")
    for h in range(problem.n_hosts):
        if st.received[h] > 0 and (st.mem[h] > problem.mem_limit[h]
                                   or st.cpu[h] > problem.cpu_limit[h]):
            out.append(f"capacity of host {h}")
    if problem.max_migrations is not None and st.migrations > problem.max_migrations:
        out.append("budget max_migrations")
    if problem.max_moved_mem is not None and st.moved_mem > problem.max_moved_mem:
        out.append("budget max_moved_mem_gb")
    return out


NOT_SOLVED = -1  # the stop event was set before the solve began


class _Watcher:
    """Stops the CP-SAT solve in progress when ``stop`` is set (a small thread per engine
    run; ``close`` joins it)."""

    def __init__(self, stop: threading.Event | None) -> None:
        self.stop = stop
        self.lock = threading.Lock()
        self.current: set[cp_model.CpSolver] = set()
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        if stop is not None:
            self.thread = threading.Thread(target=self._run, name="engine-stop-watcher",
                                           daemon=True)
            self.thread.start()

    def _run(self) -> None:
        assert self.stop is not None
        while not self.done.is_set():
            if self.stop.wait(0.05):
                with self.lock:
                    for solver in self.current:
                        solver.StopSearch()
                if self.done.wait(0.05):
                    return

    def solve(self, solver: cp_model.CpSolver, model: cp_model.CpModel) -> int:
        if self.stop is None:
            return solver.Solve(model)
        with self.lock:
            if self.stop.is_set():
                return NOT_SOLVED
            self.current.add(solver)
        try:
            return solver.Solve(model)
        finally:
            with self.lock:
                self.current.discard(solver)

    def close(self) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join()


class _Search:
    def __init__(self, problem: Problem, opts: EngineOptions, ev: Evaluator | None = None,
                 stop: threading.Event | None = None) -> None:
        self.p = problem
        self.o = opts
        self.ev = ev or Evaluator(problem)
        self.rng = np.random.default_rng(opts.seed)
        self.t0 = time.monotonic()
        self.dtime = 0.0
        self.work = 0
        self.iterations = 0
        self.converged = False
        self.stop = stop
        self.watcher = _Watcher(stop)
        self.stopped_by: str | None = None  # the first stop that fired, if any
        self.movable = [u for u, unit in enumerate(problem.units) if not unit.pinned]
        self.movable_arr = np.array(self.movable, dtype=np.int64)

    # --- budget of effort -------------------------------------------------------------------
    def remaining(self) -> float:
        return self.o.time_limit - (time.monotonic() - self.t0)

    def _stopped(self, why: str) -> bool:
        if self.stopped_by is None:
            self.stopped_by = why
        return True

    def exhausted(self) -> bool:
        if self.stop is not None and self.stop.is_set():
            return self._stopped("stop")
        if self.remaining() <= 0.02:
            return self._stopped("wall_clock")
        if self.o.max_dtime is not None and self.dtime >= self.o.max_dtime:
            return self._stopped("effort")
        if self.o.max_iterations is not None and self.iterations >= self.o.max_iterations:
            return self._stopped("effort")
        if self.o.max_work is not None and self.work >= self.o.max_work:
            return self._stopped("effort")
        return False

    def interrupted(self) -> bool:
        """A stop that is not part of the deterministic effort fired (stop event, wall)."""
        if self.stop is not None and self.stop.is_set():
            return self._stopped("stop")
        if self.remaining() <= 0.02:
            return self._stopped("wall_clock")
        return False

    def _solver(self, dtime: float | None, wall: float | None = None) -> cp_model.CpSolver:
        s = cp_model.CpSolver()
        prm = s.parameters
        prm.catch_sigint_signal = False  # CP-SAT would reset SIGINT to SIG_DFL after a solve
        prm.num_workers = self.o.workers
        prm.random_seed = self.o.seed
        # small sub-models: probing and symmetry detection cost more than they save
        prm.cp_model_probing_level = 0
        prm.symmetry_level = 0
        prm.max_time_in_seconds = max(0.05, min(self.remaining(), wall or self.remaining()))
        caps = [] if dtime is None else [dtime]
        if self.o.max_dtime is not None:
            caps.append(max(0.01, self.o.max_dtime - self.dtime))
        if caps:
            prm.max_deterministic_time = min(caps)
        return s

    def run_model(self, sub: cpsat.SubModel, dtime: float | None, wall: float | None = None,
                  ) -> tuple[int, cp_model.CpSolver]:
        solver = self._solver(dtime, wall)
        proto = sub.model.Proto()
        self.work += len(proto.variables) + len(proto.constraints)
        status = self.watcher.solve(solver, sub.model)
        if status == NOT_SOLVED:
            self._stopped("stop")
            return cp_model.UNKNOWN, solver
        self.dtime += solver.ResponseProto().deterministic_time
        if status == cp_model.UNKNOWN or status == cp_model.FEASIBLE:
            # a wall-clock or stop-event cut is not reproducible: say which one fired
            if self.stop is not None and self.stop.is_set():
                self._stopped("stop")
            elif solver.WallTime() >= 0.98 * solver.parameters.max_time_in_seconds:
                self._stopped("wall_clock")
        return status, solver

    # --- steps ------------------------------------------------------------------------------
    def full(self, base: np.ndarray, dtime: float | None
             ) -> tuple[int, cp_model.CpSolver, cpsat.SubModel]:
        cands = {u: list(self.p.units[u].candidates) for u in self.movable}
        sub = cpsat.build(self.p, self.ev, base, self.movable, cands)
        status, solver = self.run_model(sub, dtime)
        return status, solver, sub

    def repair_model(self, base: np.ndarray) -> tuple[np.ndarray | None, bool]:
        """Find a feasible placement from an infeasible ``base``; (placement, proven_infeasible)."""
        st = State(self.p, self.ev, base)
        bad = [u for u in self.movable if st.violates_mandatory(u)]
        over = [h for h in range(self.p.n_hosts) if st.received[h] > 0 and (
            st.mem[h] > self.p.mem_limit[h] or st.cpu[h] > self.p.cpu_limit[h])]
        bad_set = set(bad) | {u for u in self.movable if int(base[u]) in over}
        load = st.load()
        targets = sorted({h for u in bad_set for h in self.p.units[u].candidates},
                         key=lambda h: (load[h], h))
        m = 8
        while True:
            chosen = set(targets[:m]) | set(over)
            free = sorted(bad_set | {u for u in self.movable if int(base[u]) in chosen})
            cands = {}
            for u in free:
                allowed = set(self.p.units[u].candidates)
                cands[u] = sorted(allowed if u in bad_set else (allowed & chosen) | {int(base[u])})
            sub = cpsat.build(self.p, self.ev, base, free, cands)
            status, solver = self.run_model(sub, None)
            if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                return cpsat.read_solution(sub, solver, base), False
            everything = len(free) == len(self.movable) and all(
                set(cands[u]) == set(self.p.units[u].candidates) for u in free)
            if status == cp_model.INFEASIBLE and everything:
                return None, True
            if self.exhausted():
                return None, False
            if m >= len(targets) and status == cp_model.INFEASIBLE:
                # all targets in play: free everything
                targets = sorted(range(self.p.n_hosts), key=lambda h: (load[h], h))
                bad_set = set(self.movable)
            m *= 4

    def choose_hosts(self, inc: np.ndarray, k: int) -> list[int]:
        ev = self.ev
        cpu, memd, _ = ev.loads(inc)
        bal = np.array(self.p.balanced, dtype=np.int64)
        dc = (cpu[bal] - ev.target_cpu[bal]) / ev.cpu_cap[bal]
        dm = (memd[bal] - ev.target_mem[bal]) / ev.mem_cap[bal]
        score = dc * dc + dm * dm
        k = min(k, len(bal))
        if score.sum() <= 0 or self.rng.random() < 0.15:
            first = int(self.rng.integers(len(bal)))
        else:
            first = int(self.rng.choice(len(bal), p=score / score.sum()))
        chosen = {first}
        # partners: most negative dot product with the first host's deviation, some noise
        dot = dc * dc[first] + dm * dm[first]
        noise = self.rng.random(len(bal)) * (np.abs(dot).max() + 1e-12) * 0.5
        order = np.argsort(dot + noise, kind="stable")
        n_partner = max(1, (k - 1) * 2 // 3)
        for i in order:
            if len(chosen) >= 1 + n_partner:
                break
            chosen.add(int(i))
        rest = [i for i in range(len(bal)) if i not in chosen]
        if rest and len(chosen) < k:
            extra = self.rng.choice(len(rest), size=min(k - len(chosen), len(rest)), replace=False)
            chosen.update(rest[int(i)] for i in extra)
        return sorted(int(bal[i]) for i in chosen)

    def lns_step(self, inc: np.ndarray, k: int) -> tuple[np.ndarray | None, bool]:
        p = self.p
        hosts = set(self.choose_hosts(inc, k))
        free = self.movable_arr[np.isin(inc[self.movable_arr], list(hosts))].tolist()
        migrations, moved_mem = self.ev.moved(inc)
        budget_binds = (
            (p.max_migrations is not None and migrations >= 0.8 * p.max_migrations)
            or (p.max_moved_mem is not None and moved_mem >= 0.8 * p.max_moved_mem))
        moved: set[int] = set()
        if budget_binds:
            # some of the units already moved, so the budget they hold can be re-spent
            away = self.movable_arr[inc[self.movable_arr] != self.ev.unit_home[self.movable_arr]]
            if away.size > self.o.reopen_moved:
                away = self.rng.choice(away, size=self.o.reopen_moved, replace=False)
            moved = {int(u) for u in away}
        free_set = set(free) | moved
        if not free_set:
            return None, True
        free = sorted(free_set)
        cands = {}
        for u in free:
            allowed = set(p.units[u].candidates)
            c = (allowed & hosts) | {int(inc[u])}
            if u in moved:
                c |= allowed & p.unit_start_hosts(u)
            cands[u] = sorted(c)
        sub = cpsat.build(p, self.ev, inc, free, cands)
        status, solver = self.run_model(sub, self.o.step_dtime)
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return cpsat.read_solution(sub, solver, inc), status == cp_model.OPTIMAL
        return None, False


    def groups(self, inc: np.ndarray, rnd: int) -> list[list[int]]:
        """Disjoint groups of ``group_hosts`` balanced hosts, each with hosts from the whole
        range of deviations (dealt in snake order over the hosts sorted by deviation), so that
        each group's load is close to its share of the cluster's and balancing inside the
        groups balances the cluster. Round 0 sorts by total deviation, odd rounds by CPU minus
        memory deviation (pairing CPU-heavy with memory-heavy hosts), even rounds by a seeded
        random key mixed with the total deviation."""
        ev = self.ev
        cpu, memd, _ = ev.loads(inc)
        bal = np.array(self.p.balanced, dtype=np.int64)
        dc = (cpu[bal] - ev.target_cpu[bal]) / ev.cpu_cap[bal]
        dm = (memd[bal] - ev.target_mem[bal]) / ev.mem_cap[bal]
        if rnd == 0:
            key = dc + dm
        elif rnd % 2 == 1:
            key = dc - dm
        else:
            key = dc + dm + self.rng.normal(0.0, float(np.std(dc + dm)) + 1e-9, len(bal))
        order = bal[np.argsort(-key, kind="stable")]
        n_groups = max(1, len(bal) // self.o.group_hosts)
        out: list[list[int]] = [[] for _ in range(n_groups)]
        for i, h in enumerate(order.tolist()):
            lap, pos = divmod(i, n_groups)
            out[pos if lap % 2 == 0 else n_groups - 1 - pos].append(int(h))
        return [sorted(g) for g in out if len(g) >= 2]

    def decompose(self, inc: np.ndarray, inc_obj: int) -> tuple[np.ndarray, int, int]:
        """Balance disjoint host groups side by side, a few rounds with different groupings.

        Each group's model frees the movable units on its hosts, with the group's hosts as
        candidates; the groups share no host, so their answers combine (kept only if the whole
        objective drops). Models are built in order and solved by ``threads`` threads, each
        solve deterministic, so the result does not depend on scheduling.
        Returns (placement, objective, improvements)."""
        from concurrent.futures import ThreadPoolExecutor

        p, ev = self.p, self.ev
        improvements = 0
        with ThreadPoolExecutor(max_workers=max(1, self.o.threads)) as pool:
            for rnd in range(self.o.decompose_rounds):
                if self.exhausted():
                    break
                subs = []
                for hosts in self.groups(inc, rnd):
                    hs = set(hosts)
                    free = self.movable_arr[np.isin(inc[self.movable_arr], hosts)].tolist()
                    if not free:
                        continue
                    cands = {u: sorted((set(p.units[u].candidates) & hs) | {int(inc[u])})
                             for u in free}
                    sub = cpsat.build(p, ev, inc, free, cands)
                    proto = sub.model.Proto()
                    self.work += len(proto.variables) + len(proto.constraints)
                    subs.append(sub)

                def run(sub: cpsat.SubModel) -> tuple[int, cp_model.CpSolver]:
                    solver = self._solver(self.o.group_dtime)
                    return self.watcher.solve(solver, sub.model), solver

                results = list(pool.map(run, subs))
                cand = inc.copy()
                for sub, (status, solver) in zip(subs, results, strict=True):
                    if status == NOT_SOLVED:
                        self._stopped("stop")
                        continue
                    self.dtime += solver.ResponseProto().deterministic_time
                    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                        for u in sub.free:
                            for h in sub.cands[u]:
                                if solver.BooleanValue(sub.x[u, h]):
                                    cand[u] = h
                                    break
                self.iterations += 1
                c_obj = ev.objective(cand)
                log.debug("decompose round %d: %d groups obj %d -> %d", rnd, len(subs),
                          inc_obj, c_obj)
                if c_obj < inc_obj and not mandatory_violations(p, ev, cand):
                    inc, inc_obj = cand, c_obj
                    improvements += 1
        return inc, inc_obj, improvements

    def effort(self) -> float:
        """Share of the effort spent so far, in deterministic units (LNS steps, CP-SAT
        deterministic time); wall time only when neither is set."""
        shares = []
        if self.o.max_iterations:
            shares.append(self.iterations / self.o.max_iterations)
        if self.o.max_dtime:
            shares.append(self.dtime / self.o.max_dtime)
        if self.o.max_work:
            shares.append(self.work / self.o.max_work)
        if not shares:
            shares.append((time.monotonic() - self.t0) / self.o.time_limit)
        return max(shares)

    def lns(self, inc: np.ndarray, inc_obj: int, until: float | None,
            work_until: int | None = None, iterations_until: int | None = None,
            ) -> tuple[np.ndarray, int, int]:
        """Improve ``inc`` until ``until`` of the effort is spent (or ``work_until`` units
        of work are done, or the search converges).

        Returns (placement, objective, improvements)."""
        p, ev = self.p, self.ev
        k, fails = 2, 0
        k_max = max(2, min(self.o.max_neighbourhood_hosts, len(p.balanced)))
        patience = max(8, len(p.balanced) // 2)
        improvements = 0
        while (not self.exhausted() and (until is None or self.effort() < until)
               and (work_until is None or self.work < work_until)
               and (iterations_until is None or self.iterations < iterations_until)):
            cand, optimal = self.lns_step(inc, k)
            self.iterations += 1
            improved = False
            if cand is not None:
                c_obj = ev.objective(cand)
                if c_obj < inc_obj:
                    inc, inc_obj = cand, c_obj
                    improvements += 1
                    improved = True
            log.debug("lns step %d k=%d optimal=%s obj=%d t=%.2f", self.iterations, k, optimal,
                      inc_obj, time.monotonic() - self.t0)
            fails = 0 if improved else fails + 1
            if not optimal and k > 2:
                k -= 1
            elif fails >= patience and k < k_max:
                k, fails = k + 1, 0
            elif fails >= 3 * patience and k >= k_max:
                self.converged = True  # the largest neighbourhoods find nothing more
                break
        return inc, inc_obj, improvements


def explain_infeasible(problem: Problem, opts: EngineOptions,
                       stop: threading.Event | None = None) -> list[str]:
    """Names a minimal set of rules, host capacities and budgets that cannot all hold.

    CP-SAT's sufficient assumptions give a conflicting set; deletion then drops each member whose
    removal leaves the rest still infeasible, so what remains is minimal (each name matters).
    The whole explanation gets the solve's time limit; when that runs out the set found so far
    (sufficient, perhaps not minimal) is returned.
    """
    t0 = time.monotonic()
    ev = Evaluator(problem)
    movable = [u for u, unit in enumerate(problem.units) if not unit.pinned]
    base = initial_unit_hosts(problem)
    cands = {u: list(problem.units[u].candidates) for u in movable}
    sub = cpsat.build(problem, ev, base, movable, cands, explain=True)
    model = sub.model

    def left() -> float:
        if stop is not None and stop.is_set():
            return 0.0
        return opts.time_limit - (time.monotonic() - t0)

    def infeasible(assumed: list[int]) -> tuple[bool, list[int]]:
        model.ClearAssumptions()
        model.AddAssumptions([model.GetBoolVarFromProtoIndex(i) for i in assumed])
        solver = cp_model.CpSolver()
        solver.parameters.catch_sigint_signal = False  # keep the caller's SIGINT handler
        solver.parameters.num_workers = 1
        solver.parameters.max_time_in_seconds = max(0.2, min(left(), opts.time_limit / 4))
        solver.parameters.max_deterministic_time = 10.0
        status = solver.Solve(model)
        if status != cp_model.INFEASIBLE:
            return False, []
        return True, list(solver.SufficientAssumptionsForInfeasibility())

    ok, core = infeasible(list(sub.assumptions))
    if not ok:
        return []
    core = sorted(set(core) & set(sub.assumptions))
    for lit in list(core):
        if left() <= 0:
            break
        trial = [c for c in core if c != lit]
        still, smaller = infeasible(trial)
        if still:
            core = sorted(set(smaller) & set(trial)) or trial
    return sorted(sub.assumptions[i] for i in core)


def _bisect(s: _Search, problem: Problem, opts: EngineOptions, inc: np.ndarray,
            g: np.ndarray, g_obj: int | None) -> tuple[list[Priced], int]:
    """The price search of the second pass: the unbudgeted engine at the threshold's price,
    then bisection upwards warm-started from the best plan within the budget."""
    ev = s.ev
    assert opts.price is not None
    fixed_mb = opts.fixed_cost_mb
    improvements = 0
    # a. the unbudgeted engine at the threshold's own price
    p0, ev0 = reprice(problem, ev, opts.price, fixed_mb)
    s.p, s.ev = p0, ev0
    free, _, n = s.lns(inc, ev0.objective(inc), until=opts.budget_explore * 0.5)
    s.p, s.ev = problem, ev
    improvements += n
    cands: list[Priced] = [measure(problem, ev, opts.price, inc)]
    if g_obj is not None:
        cands.append(measure(problem, ev, math.inf, g))
    first = measure(problem, ev, opts.price, free)
    if first.within_budget:
        # b. the budget does not bind at the threshold's price: search on with it in force
        pb, evb = reprice(problem, ev, opts.price, fixed_mb, keep_budget=True)
        s.p, s.ev = pb, evb
        more, _, n = s.lns(free, evb.objective(free), until=1.0)
        s.p, s.ev = problem, ev
        improvements += n
        cands += [first, measure(problem, ev, opts.price, more)]
    else:
        # b. the price that fits, by bisection; each over-budget plan trimmed to the budget
        start = best_within(cands)
        if opts.max_work:
            step_work = max(1, int(0.8 * (opts.max_work - s.work) / max(1, opts.price_steps)))
        else:
            step_work = max(1, s.work // 4)
        cands += search_budget(s, problem, start.unit_hosts if start else inc, free, opts.price,
                               fixed_mb, opts.price_steps, step_work)
    return cands, improvements


def _descend(s: _Search, problem: Problem, opts: EngineOptions, inc: np.ndarray,
             g: np.ndarray, g_obj: int | None) -> list[Priced]:
    """The price search walking down from a high price (``price.descend_budget``); if the
    budget does not bind at the threshold's price, the search goes on with it in force."""
    ev = s.ev
    assert opts.price is not None
    cands: list[Priced] = [measure(problem, ev, opts.price, inc)]
    if g_obj is not None:
        cands.append(measure(problem, ev, math.inf, g))
    here = initial_unit_hosts(problem)
    if mandatory_violations(problem, ev, here):
        here = best_within(cands).unit_hosts if best_within(cands) else inc
    got, last = price_mod.descend_budget(
        s, problem, here, max(opts.descent_high, opts.price), opts.price, opts.descent_ratio,
        opts.fixed_cost_mb, opts.descent_bisect)
    cands += got
    if last is not None and not s.exhausted():
        pb, evb = reprice(problem, ev, opts.price, opts.fixed_cost_mb, keep_budget=True)
        s.p, s.ev = pb, evb
        try:
            more, _, _ = s.lns(last, evb.objective(last), until=1.0)
        finally:
            s.p, s.ev = problem, ev
        cands.append(measure(problem, ev, opts.price, more))
    return cands


def _budget_by_price(s: _Search, problem: Problem, opts: EngineOptions, inc: np.ndarray,
                     inc_obj: int, g: np.ndarray, g_obj: int | None, stats: dict,
                     ) -> tuple[np.ndarray, int, int]:
    """A budgeted plan by price search (``balancer.solver.price``) and the budgeted local
    search (``balancer.solver.swap``); returns (placement, objective, improvements).

    a./b. The price walked down from ``descent_high`` by ``descent_ratio`` per step from the
       current placement until a plan breaks the budget, then bisected ``descent_bisect``
       times, each over-budget plan trimmed to the budget (``_descend``); if the budget does
       not bind at the threshold's price, the search goes on there with the budget in force.
       (``budget_descent=False``: the second pass's search, ``_bisect``.)
    c. The best ``swap_starts`` plans within the budget (price points, trims, greedy, the
       incumbent) go through the budgeted local search on the judged imbalance, and so does
       the current placement (the local search then chooses every move itself).
    d. The best of them goes through an iterated local search (``kicks`` random kicks of
       ``kick_size`` undone moves, seeded; with a count budget K alone ``count_kicks`` kicks
       of ``max(kick_size, count_kick_share x K)`` moves).
    The plan kept is the one within the budget with the lowest imbalance (CPU std + memory
    std); the greedy answer stays a fallback (``greedy_kept``)."""
    ev = s.ev
    assert opts.price is not None
    improvements = 0
    if opts.budget_descent:
        cands = _descend(s, problem, opts, inc, g, g_obj)
    else:
        cands, n = _bisect(s, problem, opts, inc, g, g_obj)
        improvements += n
    # c. the best few plans within the budget, improved on the judged imbalance
    starts = sorted((c for c in cands if c.within_budget),
                    key=lambda c: (c.imbalance, c.moved_mem, c.price))[:opts.swap_starts]
    for c in starts:
        improved = swap.improve(problem, ev, c.unit_hosts, rounds=opts.swap_rounds)
        price = c.price if math.isfinite(c.price) else opts.price
        cands.append(measure(problem, ev, price, improved))
    # the local search from the current placement too (no move yet: it picks the budget's
    # moves on the judged imbalance alone), when that placement keeps every hard constraint
    here = initial_unit_hosts(problem)
    if not mandatory_violations(problem, ev, here):
        cands.append(measure(problem, ev, opts.price, swap.improve(
            problem, ev, here, rounds=opts.swap_rounds)))
    # d. iterated local search from the best plan within the budget
    best = best_within(cands)
    assert best is not None  # the incumbent fits
    kicks, size = opts.kicks, opts.kick_size
    if problem.max_migrations is not None and problem.max_moved_mem is None and kicks > 0:
        kicks = opts.count_kicks
        size = max(size, round(opts.count_kick_share * problem.max_migrations))
    if kicks > 0 and not s.interrupted():
        kicked = swap.kick_improve(problem, ev, best.unit_hosts, kicks, size, opts.seed,
                                   rounds=opts.swap_rounds)
        cands.append(measure(problem, ev, best.price, kicked))
        best = best_within(cands)
        assert best is not None
    stats["price_points"] = len(cands)
    stats["price"] = best.price if math.isfinite(best.price) else None
    stats["greedy_kept"] = bool(np.array_equal(best.unit_hosts, g))
    out = best.unit_hosts
    return out, ev.objective(out), improvements + 1


def first_cause(problem: Problem, ev: Evaluator | None = None) -> str | None:
    """The first cause of infeasibility a person can act on, in one sentence, if a direct
    count finds one: forced moves beyond a budget, more memory than the hosts left can hold,
    an anti-affinity rule with more VMs than hosts it may use."""
    ev = ev or Evaluator(problem)
    snap = problem.snapshot
    home = ev.unit_home
    # units that must move: their start host is not one of their candidates, or they break
    # a mandatory rule (reason given by the policies)
    must = [u for u, unit in enumerate(problem.units)
            if not unit.pinned and (u in problem.mandatory_reason or home[u] < 0
                                    or not ev.cand_mask[u, home[u]])]
    by_source: dict[int, int] = {}
    for u in must:
        for v in problem.units[u].members:
            if not ev.cand_mask[u, ev.start[v]] or home[u] < 0 or u in problem.mandatory_reason:
                by_source[int(ev.start[v])] = by_source.get(int(ev.start[v]), 0) + 1
    n_forced = sum(by_source.values())
    forced_mem = sum(int(ev.u_mem[u]) for u in must)

    def sources() -> str:
        parts = []
        for h, n in sorted(by_source.items(), key=lambda kv: (-kv[1], kv[0])):
            host = snap.hosts[h]
            what = f"host {host.name}" + ("" if host.active else f" in {host.state.value}")
            verb = "evacuations" if not host.active else "forced moves"
            parts.append(f"{what} needs {n} {verb}")
        return ", ".join(parts[:3]) + (f" and {len(parts) - 3} more hosts" if len(parts) > 3
                                       else "")

    k = problem.max_migrations
    if k is not None and n_forced > k:
        return (f"{sources()} and the budget allows {k} migrations (max_migrations); raise "
                f"--max-migrations to at least {n_forced}")
    g = problem.max_moved_mem
    if g is not None and forced_mem > g:
        return (f"{sources()} ({forced_mem / 1024:.1f} GiB) and the budget allows "
                f"{g / 1024:.1f} GiB moved (max_moved_mem_gb)")
    receiving = sorted(problem.receiving)
    room = sum(int(problem.mem_limit[h]) for h in receiving)
    cpu_room = sum(int(problem.cpu_limit[h]) for h in receiving)
    if int(ev.vm_mem.sum()) > room:
        gone = [snap.hosts[h].name for h in range(problem.n_hosts) if h not in problem.receiving]
        return (f"the {len(receiving)} hosts that may receive VMs hold {room / 1024:.0f} GiB "
                f"but the VMs need {int(ev.vm_mem.sum()) / 1024:.0f} GiB"
                + (f" once {', '.join(gone[:3])} {'is' if len(gone) == 1 else 'are'} empty"
                   if gone else ""))
    if int(ev.vm_cpu.sum()) > cpu_room:
        return (f"the {len(receiving)} hosts that may receive VMs allow {cpu_room / 1000:.0f} "
                f"cores of demand but the VMs need {int(ev.vm_cpu.sum()) / 1000:.0f}")
    for grp in problem.apart:
        if grp.weight is not None:
            continue
        allowed = set().union(*(set(problem.units[u].candidates) for u in grp.units))
        if len(grp.units) > len(allowed):
            return (f"rule {grp.rule} keeps {len(grp.units)} VMs on different hosts but only "
                    f"{len(allowed)} hosts may hold them")
    return None


def infeasible_error(problem: Problem, opts: EngineOptions, ev: Evaluator,
                     stop: threading.Event | None = None) -> InfeasibleError:
    """The error for a proven-infeasible problem: the first actionable cause, then the
    minimal conflict set."""
    culprits = explain_infeasible(problem, opts, stop)
    cause = first_cause(problem, ev)
    full = ", ".join(culprits) if culprits else "(could not isolate)"
    if cause:
        msg = f"{cause}. Full conflict set: {full}"
    else:
        msg = f"no placement satisfies every hard constraint; in conflict: {full}"
    err = InfeasibleError(msg, culprits=culprits)
    err.cause = cause  # type: ignore[attr-defined]
    return err


def solve(problem: Problem, opts: EngineOptions | None = None,
          ev: Evaluator | None = None, stop: threading.Event | None = None) -> SolveResult:
    """Solve ``problem``; ``ev`` may be passed in when the caller already built one.

    ``stop`` (a ``threading.Event``): when set, the engine stops the CP-SAT solve in progress
    and returns its best verified incumbent within about 0.5 s (``stopped_by == "stop"``).
    """
    opts = opts or EngineOptions()
    s = _Search(problem, opts, ev, stop)
    try:
        return _solve(s, problem, opts)
    finally:
        s.watcher.close()


def _solve(s: _Search, problem: Problem, opts: EngineOptions) -> SolveResult:
    ev = s.ev
    start = initial_unit_hosts(problem)
    start_obj = ev.objective(start)

    # 1. incumbent: current placement or greedy answer, whichever is feasible and better
    options: list[tuple[int, int, np.ndarray]] = []
    if not mandatory_violations(problem, ev, start):
        options.append((start_obj, 0, start))
    has_budget = problem.max_migrations is not None or problem.max_moved_mem is not None
    fleet = (opts.pairs_min_hosts is not None and not has_budget
             and len(problem.balanced) >= opts.pairs_min_hosts)
    # at fleet scale without a budget the pairs pass (below) replaces the greedy hint: the
    # greedy baseline then makes only the forced moves
    g = greedy(problem, ev, max_cells=0 if fleet else opts.greedy_cells,
               should_stop=s.interrupted)
    g_obj: int | None = None
    if not mandatory_violations(problem, ev, g):
        g_obj = ev.objective(g)
        options.append((g_obj, 1, g))
    stats: dict[str, float] = {"greedy_seconds": round(time.monotonic() - s.t0, 3)}
    if options:
        inc_obj, _, inc = min(options, key=lambda t: (t[0], t[1]))
    else:
        base = g.copy()
        fixed, infeasible = s.repair_model(base)
        if fixed is None:
            seconds = time.monotonic() - s.t0
            if infeasible:
                raise infeasible_error(problem, opts, ev, s.stop)
            return SolveResult(Status.NO_SOLUTION_IN_TIME, base, vm_placement(problem, list(base)),
                               ev.objective(base), 0, seconds, start_objective=start_obj,
                               stopped_by=s.stopped_by or "wall_clock",
                               greedy_objective=None, stats=stats)
        inc, inc_obj = fixed, ev.objective(fixed)

    trivial_bound = sum(
        min(sum(int(ev.move_cost[v]) for v in problem.units[u].members if ev.start[v] != h)
            for h in problem.units[u].candidates)
        for u in s.movable if u in problem.mandatory_reason)
    bound = trivial_bound
    status = Status.FEASIBLE
    improvements = 0

    # 2. whole model when small
    n_pairs = sum(len(problem.units[u].candidates) for u in s.movable)
    if s.movable and n_pairs <= opts.full_model_pairs and not s.exhausted():
        st, solver, sub = s.full(inc, opts.full_dtime if opts.max_dtime is None
                                 else min(opts.full_dtime, opts.max_dtime / 2))
        s.iterations += 1
        if st in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            cand = cpsat.read_solution(sub, solver, inc)
            c_obj = ev.objective(cand)
            if c_obj < inc_obj:
                inc, inc_obj = cand, c_obj
                improvements += 1
            # the model leaves out a constant (hosts and rules no free unit touches)
            constant = c_obj - round(solver.ObjectiveValue())
            bound = max(bound, int(solver.BestObjectiveBound()) + constant)
            if st == cp_model.OPTIMAL:
                status = Status.OPTIMAL
                bound = inc_obj

    # 3. large neighbourhood search
    if status is not Status.OPTIMAL and s.movable and fleet and not s.exhausted():
        # fleet scale: the whole fleet pre-balanced by pairs of hot and cold hosts
        paired, n = pairs.pair_rounds(problem, ev, inc, opts.pair_rounds)
        p_obj = ev.objective(paired)
        stats["pair_moves"] = n
        if p_obj < inc_obj and not mandatory_violations(problem, ev, paired):
            inc, inc_obj = paired, p_obj
            improvements += 1
    if status is not Status.OPTIMAL and s.movable:
        if has_budget and not problem.only_mandatory and opts.price is not None:
            inc, inc_obj, n = _budget_by_price(s, problem, opts, inc, inc_obj, g, g_obj, stats)
            improvements += n
        else:
            if (opts.decompose_min_hosts is not None
                    and len(problem.balanced) >= opts.decompose_min_hosts):
                inc, inc_obj, n = s.decompose(inc, inc_obj)
                improvements += n
            inc, inc_obj, n = s.lns(inc, inc_obj, until=1.0)
            improvements += n

    # 4. an honest bound: the fluid relaxation (balancer.solver.bound)
    if (status is not Status.OPTIMAL and opts.fluid_bound and not fleet
            and not s.interrupted()):  # at fleet scale the LP costs more than the search
        fluid = bound_mod.fluid_bound(problem, ev)
        if fluid is not None:
            bound = max(bound, fluid)
            stats["bound_kind"] = "fluid"

    seconds = time.monotonic() - s.t0
    stats["dtime"] = round(s.dtime, 3)
    stats["work"] = s.work
    stats["converged"] = s.converged
    if s.stopped_by in ("stop", "wall_clock"):
        stopped_by = s.stopped_by
    elif status is Status.OPTIMAL:
        stopped_by = "optimal"
    elif s.converged:
        stopped_by = "converged"
    else:
        stopped_by = s.stopped_by or "effort"
    return SolveResult(
        status=status,
        stopped_by=stopped_by,
        unit_hosts=inc,
        placement=vm_placement(problem, [int(h) for h in inc]),
        objective=inc_obj,
        bound=min(bound, inc_obj),
        seconds=seconds,
        iterations=s.iterations,
        improvements=improvements,
        start_objective=start_obj,
        greedy_objective=None if fleet else g_obj,
        stats=stats,
    )



@dataclass
class CurvePoint:
    price: float  # per MiB moved (objective units / WEIGHT_ONE)
    unit_hosts: np.ndarray
    objective: int  # at this price
    bound: int  # a lower bound on the objective at this price (see ``lower_bound``)
    kind: str = "price"  # "price": solved at its price; "memory budget": a filled point


def curve(problem: Problem, prices: list[float], opts: EngineOptions | None = None,
          ev: Evaluator | None = None, stop: threading.Event | None = None,
          ) -> tuple[list[CurvePoint], str]:
    """The balance / migration-cost curve: one plan per price (per MiB moved), from the
    highest price to the lowest, each point's search warm-started from the plan before it
    (a lower price only adds moves that now pay). The effort (``max_work`` or
    ``max_iterations``) is shared evenly between the points. Returns (points, stopped_by).
    """
    opts = opts or EngineOptions()
    s = _Search(problem, opts, ev, stop)
    try:
        ev = s.ev
        start = initial_unit_hosts(problem)
        inc = start
        if mandatory_violations(problem, ev, start):
            inc = greedy(problem, ev, max_cells=0)  # the forced moves only
        if mandatory_violations(problem, ev, inc):
            fixed, infeasible = s.repair_model(start.copy())
            if fixed is None:
                if infeasible:
                    raise infeasible_error(problem, opts, ev, stop)
                return [], s.stopped_by or "wall_clock"
            inc = fixed
        points: list[CurvePoint] = []
        n = len(prices)
        for i, price in enumerate(sorted(prices, reverse=True)):
            if opts.max_work:
                target = opts.max_work * (i + 1) // n
            else:
                target = s.work + max(1, s.work // max(1, i))
            if not s.interrupted() and s.movable:
                inc = price_mod.improve_at(s, problem, price, opts.fixed_cost_mb, inc,
                                           max(0, target - s.work), iterations=(
                                               None if opts.max_iterations is None
                                               else opts.max_iterations * (i + 1) // n))
            _, evp = reprice(problem, ev, price, opts.fixed_cost_mb)
            # the point's plan: the same memory moved, spent better on the judged imbalance
            _, moved = ev.moved(inc)
            point = swap.improve(replace(problem, max_moved_mem=moved), ev, inc,
                                 rounds=opts.frontier_swap_rounds)
            obj = evp.objective(point)
            low = lower_bound(problem, evp, point)
            if opts.fluid_bound and not s.interrupted():
                low = max(low, bound_mod.fluid_bound(problem, evp) or 0)
            points.append(CurvePoint(price, point, obj, min(obj, low)))
        if opts.frontier_fill > 0 and not s.interrupted():
            points += _fill(problem, ev, points, opts, s.interrupted)
        stopped_by = s.stopped_by if s.stopped_by in ("stop", "wall_clock") else "effort"
        return points, stopped_by
    finally:
        s.watcher.close()


def _fill(problem: Problem, ev: Evaluator, points: list[CurvePoint], opts: EngineOptions,
          interrupted: Callable[[], bool] = lambda: False) -> list[CurvePoint]:
    """Points between the price points: for two neighbours A (higher price) and B (lower
    price, more memory moved), ``frontier_fill`` memory levels evenly between theirs; at each,
    B's plan trimmed to that memory (undo the moves costing least per MiB at B's price) and
    finished by the budgeted local search with that memory as the budget.

    Each such point is stated at the price between A's and B's in the same proportion; its
    bound interpolates theirs linearly in the price, which is valid: the best objective as a
    function of the price is a minimum of functions linear in it (one per plan), so concave,
    and lies above the chord between two lower bounds. ``interrupted`` (a stop event or the
    wall clock) is checked before each point: the points filled so far come back."""
    out: list[CurvePoint] = []
    imb = Imbalance.of(problem, ev)

    def value(hosts: np.ndarray) -> float:
        cpu, memd, _ = ev.loads(hosts)
        return imb.value(cpu.astype(float), memd.astype(float))

    for a, b in zip(points, points[1:], strict=False):
        _, mem_a = ev.moved(a.unit_hosts)
        _, mem_b = ev.moved(b.unit_hosts)
        if mem_b <= mem_a:
            continue
        for j in range(1, opts.frontier_fill + 1):
            if interrupted():
                return out
            lam = j / (opts.frontier_fill + 1)
            level = int(mem_a + (mem_b - mem_a) * lam)
            price = a.price + (b.price - a.price) * lam
            pb = replace(problem, max_moved_mem=level)
            _, evb = reprice(pb, ev, b.price, opts.fixed_cost_mb, keep_budget=True)
            trimmed = trim_to_budget(evb.problem, evb, b.unit_hosts)
            if trimmed is None:
                continue
            # or from the best plan already on the curve within that memory, if that one
            # balances better (so the point is never worse than the curve below it)
            starts = [trimmed]
            below = [q for q in points if q.unit_hosts is not b.unit_hosts
                     and ev.moved(q.unit_hosts)[1] <= level]
            if below:
                starts.append(min(below, key=lambda q: value(q.unit_hosts)).unit_hosts)
            hosts = swap.improve(pb, ev, min(starts, key=value),
                                 rounds=opts.frontier_fill_rounds, imb=imb)
            _, evp = reprice(problem, ev, price, opts.fixed_cost_mb)
            obj = evp.objective(hosts)
            low = int(math.floor(a.bound + (b.bound - a.bound) * lam))
            out.append(CurvePoint(price, hosts, obj, min(obj, max(low, lower_bound(
                problem, evp, hosts))), kind="memory budget"))
    return out


def lower_bound(problem: Problem, ev: Evaluator, unit_hosts: np.ndarray) -> int:
    """A valid lower bound on the objective: the forced moves' cheapest cost plus the balance
    term of the fluid relaxation (load divisible, every host's deviation zero is reachable),
    which is zero, plus the should-rule penalties that no placement can avoid (none assumed).
    Honest but weak; the whole-model solve reports CP-SAT's own bound instead."""
    return sum(
        min(sum(int(ev.move_cost[v]) for v in problem.units[u].members if ev.start[v] != h)
            for h in problem.units[u].candidates)
        for u in range(len(problem.units))
        if not problem.units[u].pinned and u in problem.mandatory_reason)
