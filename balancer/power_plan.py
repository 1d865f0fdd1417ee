"""``balancer plan --power``: standby and wake recommendations from the CP-SAT power mode.

Description
    Turns a snapshot into power recommendations an operator can act on. Hosts in the snapshot
    that are ``active`` are on; hosts in ``standby`` are off and may be woken; hosts in
    ``maintenance`` stay powered and are evacuated (their VMs move), never switched.
    ``balancer.solver.power`` decides which hosts stay on and where VMs go (least power +
    ``migration_w`` per move, CPU demand within ``target_util`` of each host on, memory
    within capacity, at most ``max_switch`` hosts switched). Each switched host becomes a
    first-class recommendation:

    * ``standby``: the host, why (how many VMs move off it, where the rest of the cluster's CPU
      then runs), the watts it draws now, and the command to run after its VMs have left;
    * ``wake``: the host, why (the hosts on would run above the target), and its command;

    plus the moves (with waves from ``balancer.planner.make_waves``) and the plan's power before
    and after (the hosts' power tables). Host power comes from host labels
    ``power.idle_w``/``power.peak_w`` (linear) or ``power.table_w`` (11 comma-separated watts,
    0..100 % CPU), else from the defaults given.

    The command (``command``, a template with ``{action}`` and ``{host}``, e.g.
    ``ipmitool -H {host}-bmc -U admin chassis power soft`` or ``wakeonlan {host}``) is run for
    each recommendation only when asked (``run_commands``): standby after the moves, wake first.
Requirements
    A snapshot; ``policies.build_problem``; ``balancer.solver.power``.
Limitations
    The moves of a standby recommendation must be carried out (``balancer execute``) before its
    command runs; ``run_commands`` does not migrate. Demand is the snapshot's CPU demand (pass a
    forecast there for predictive use; ``balancer.forecast``).
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from balancer.errors import InputError
from balancer.forecast import ForecastOptions, ewm_last, forecast_peak
from balancer.model import ClusterSnapshot, HostState, Move
from balancer.solver.power import HostPower, PowerOptions, model_watts, solve


@dataclass(frozen=True)
class PowerPlanOptions:
    target_util: float = 0.8
    migration_w: float = 30.0
    max_switch: int = 4
    idle_w: float = 180.0  # hosts without power labels
    peak_w: float = 450.0
    mem_overcommit: float = 1.0
    max_dtime: float = 2.0  # CP-SAT deterministic time; then the best plan, else the rule's (hint)
    time_limit: float = 30.0
    seed: int = 0
    command: str | None = None  # template: {action} {host}
    z: float = 0.0  # margin per host: z x sqrt(sum of its VMs' forecast variances)


def host_power(snap: ClusterSnapshot, idle_w: float, peak_w: float) -> list[HostPower]:
    out = []
    for h in snap.hosts:
        lab = dict(h.labels)
        try:
            if "power.table_w" in lab:
                t = tuple(float(x) for x in lab["power.table_w"].split(","))
                if len(t) != 11 or any(b < a for a, b in zip(t, t[1:], strict=False)):
                    raise ValueError("needs 11 non-decreasing watts")
                out.append(HostPower(t))
            else:
                out.append(HostPower.linear(float(lab.get("power.idle_w", idle_w)),
                                            float(lab.get("power.peak_w", peak_w))))
        except ValueError as exc:
            raise InputError(f"host {h.name}: label power.*: {exc}") from None
    return out


def model_scope(snap: ClusterSnapshot, o: PowerPlanOptions, maint: set[int]
                ) -> tuple[list[int], set[int]]:
    """The hosts the power model decides over, and those whose VMs it may move.

    Movable: the ``3 x max_switch`` (at least 4) least utilised hosts on (those it may
    empty), as many of the hosts above the target (those it may relieve), and the hosts in
    maintenance. The scope adds the next ``2 x`` that many least utilised hosts on (receivers)
    and as many hosts in standby (those it may wake), largest first. Everything else stays as
    it is, its load and power counted: the model stays small whatever the cluster's size
    (with every VM free on every host, a 64-host / 1,000-VM cluster took CP-SAT 12 s for a
    first feasible answer, and 500 / 10,000 gave none)."""
    n = max(4, 3 * o.max_switch)
    load = [0] * len(snap.hosts)
    for v in snap.vms:
        load[snap.host_index[v.host]] += v.cpu_demand
    util = {i: load[i] / h.cpu_capacity for i, h in enumerate(snap.hosts)
            if h.state is HostState.ACTIVE and h.cpu_capacity > 0}
    order = sorted(util, key=lambda i: (util[i], i))
    hot = [i for i in reversed(order) if util[i] > o.target_util][:n]
    movable = set(order[:n]) | set(hot) | maint
    standby = sorted((i for i, h in enumerate(snap.hosts) if h.state is HostState.STANDBY),
                     key=lambda i: (-snap.hosts[i].cpu_capacity, i))[:2 * n]
    return sorted(movable | set(order[n:3 * n]) | set(standby)), movable


def greedy_hint(problem: Any, scope: list[int], movable: set[int], was_on: list[bool],
                locked: set[int], o: PowerPlanOptions) -> tuple[list[bool], list[int]]:
    """The DPM rule as the model's hint (CP-SAT starts from it): first relieve the movable
    hosts above the target, largest units first, onto hosts on in scope with room under the
    target, waking a host in standby in scope when none has room; then empty the least
    utilised movable hosts, one after the other, each only if all its units fit
    first-fit-decreasing on the hosts on in scope, within the target and their memory limit;
    at most ``max_switch`` hosts switched. Returns (on per host, host per unit)."""
    snap = problem.snapshot
    n_h = problem.n_hosts
    cpu = np.zeros(n_h)
    mem = np.zeros(n_h)
    u_host = [problem.start[u.members[0]] for u in problem.units]
    u_cpu = [sum(snap.vms[v].cpu_demand for v in u.members) for u in problem.units]
    u_mem = [sum(snap.vms[v].mem for v in u.members) for u in problem.units]
    for i, h in enumerate(u_host):
        cpu[h] += u_cpu[i]
        mem[h] += u_mem[i]
    caps = [h.cpu_capacity for h in snap.hosts]
    on = list(was_on)
    in_scope = set(scope)
    by_host: dict[int, list[int]] = {}
    for i, h in enumerate(u_host):
        by_host.setdefault(h, []).append(i)
    switched = 0

    def fits(i: int, d: int, c: np.ndarray, m: np.ndarray) -> bool:
        return (c[d] + u_cpu[i] <= o.target_util * caps[d]
                and m[d] + u_mem[i] <= problem.mem_limit[d])

    hot = sorted((h for h in movable if on[h] and caps[h] > 0
                  and cpu[h] > o.target_util * caps[h]), key=lambda h: (-cpu[h] / caps[h], h))
    for h in hot:
        for i in sorted(by_host.get(h, []), key=lambda i: (-u_cpu[i], i)):
            if cpu[h] <= o.target_util * caps[h]:
                break
            if problem.units[i].pinned:
                continue
            cands = [d for d in problem.units[i].candidates if d != h and d in in_scope]
            dest = next((d for d in cands if on[d] and fits(i, d, cpu, mem)), None)
            if dest is None and switched < o.max_switch:
                dest = next((d for d in cands if not on[d] and d not in locked
                             and fits(i, d, cpu, mem)), None)
                if dest is not None:
                    on[dest] = True
                    switched += 1
            if dest is None:
                continue
            u_host[i] = dest
            cpu[h] -= u_cpu[i]
            mem[h] -= u_mem[i]
            cpu[dest] += u_cpu[i]
            mem[dest] += u_mem[i]
    cands = sorted((h for h in movable if on[h] and h not in locked and caps[h] > 0
                    and h not in hot), key=lambda h: (cpu[h] / caps[h], h))
    for h in cands:
        if switched >= o.max_switch:
            break
        units = sorted((i for i in by_host.get(h, []) if u_host[i] == h),
                       key=lambda i: (-u_cpu[i], i))
        if any(problem.units[i].pinned for i in units):
            continue
        trial_cpu, trial_mem, placed = cpu.copy(), mem.copy(), {}
        for i in units:
            dest = next((d for d in problem.units[i].candidates
                         if d != h and d in in_scope and on[d]
                         and fits(i, d, trial_cpu, trial_mem)), None)
            if dest is None:
                break
            placed[i] = dest
            trial_cpu[dest] += u_cpu[i]
            trial_mem[dest] += u_mem[i]
        else:
            for i, d in placed.items():
                u_host[i] = d
            trial_cpu[h] = trial_mem[h] = 0.0
            cpu, mem = trial_cpu, trial_mem
            on[h] = False
            switched += 1
    return on, u_host


def read_history(path: str) -> pd.DataFrame:
    """Per-VM CPU history for the forecast: a CSV with ``timestamp`` (seconds or ISO 8601),
    ``vm`` and ``cpu`` (cores in use), one row per VM and sample (the replay's long format;
    other columns are ignored). Bad input names the file and the field."""
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"--power-history {path}: {exc}") from None
    for col in ("timestamp", "vm", "cpu"):
        if col not in df.columns:
            raise InputError(f"--power-history {path}: field '{col}' is missing (columns: "
                             f"{', '.join(map(str, df.columns))})")
    cpu = pd.to_numeric(df["cpu"], errors="coerce")
    bad = cpu.isna() | (cpu < 0)
    if bad.any():
        line = int(bad.to_numpy().nonzero()[0][0]) + 2
        raise InputError(f"--power-history {path}: line {line}: field 'cpu' must be a number "
                         f">= 0 (cores), got {df['cpu'].iloc[line - 2]!r}")
    ts = pd.to_numeric(df["timestamp"], errors="coerce")
    if ts.isna().any():
        ts = pd.to_datetime(df["timestamp"], errors="coerce", utc=True)
        if ts.isna().any():
            line = int(ts.isna().to_numpy().nonzero()[0][0]) + 2
            raise InputError(f"--power-history {path}: line {line}: field 'timestamp' must be "
                             "seconds or ISO 8601")
    return pd.DataFrame({"timestamp": ts, "vm": df["vm"].astype(str), "cpu": cpu})


def forecast_snapshot(snap: ClusterSnapshot, history: pd.DataFrame,
                      fopts: ForecastOptions | None = None
                      ) -> tuple[ClusterSnapshot, list[float], dict[str, Any]]:
    """The snapshot with each VM's CPU demand replaced by its forecast for the next cycle
    (``balancer.forecast``, as the replay's ``power`` policy), and each VM's forecast variance
    (millicores squared) for the margin per host. VMs without history keep their demand and
    get no variance."""
    fopts = fopts or ForecastOptions(method="ewm", k=0.0, last_floor=False)
    wide = (history.pivot_table(index="timestamp", columns="vm", values="cpu", aggfunc="mean")
            .sort_index().ffill().fillna(0.0) * 1000.0)
    names = [v.name for v in snap.vms]
    known = [n for n in names if n in wide.columns]
    demand = {v.name: float(v.cpu_demand) for v in snap.vms}
    var = dict.fromkeys(names, 0.0)
    if known:
        h = wide[known].to_numpy(dtype=float)
        est = forecast_peak(h, fopts)
        _, std = ewm_last(h[-fopts.history:], fopts.span)
        for i, n in enumerate(known):
            demand[n] = float(est[i])
            var[n] = float(std[i] ** 2)
    vms = tuple(replace(v, cpu_demand=int(round(demand[v.name]))) for v in snap.vms)
    report = {"method": fopts.method, "span": fopts.span, "k": fopts.k,
              "samples": int(len(wide)), "vms_forecast": len(known),
              "vms_without_history": len(names) - len(known),
              "cpu_now_cores": round(sum(v.cpu_demand for v in snap.vms) / 1000.0, 3),
              "cpu_forecast_cores": round(sum(v.cpu_demand for v in vms) / 1000.0, 3)}
    return replace(snap, vms=vms), [var[n] for n in names], report


def plan_power(snap: ClusterSnapshot, o: PowerPlanOptions | None = None,
               history: pd.DataFrame | None = None, *, keep_on: Iterable[str] = (),
               stop: Any = None) -> dict[str, Any]:
    """Power recommendations for ``snap``; with ``history`` (``read_history``), on the
    forecast demand of the next cycle with the margin per host ``o.z``. Hosts named in
    ``keep_on`` keep their power state (the daemon: a standby the operator dismissed).
    ``stop`` is accepted so that the daemon can run this in a solver worker (``run_fn``)."""
    from policies import build_problem

    o = o or PowerPlanOptions()
    vm_var = None
    forecast = None
    if history is not None:
        snap, vm_var, forecast = forecast_snapshot(snap, history)
    if o.command is not None:
        _render(o.command, "standby", "check")  # a bad template fails before anything runs
    was_on = [h.state is HostState.ACTIVE for h in snap.hosts]
    woken = replace(snap, hosts=tuple(replace(h, state=HostState.ACTIVE)
                                      if h.state is HostState.STANDBY else h
                                      for h in snap.hosts))
    problem = build_problem(woken, {"capacity": {"cpu_headroom": 0.0,
                                                 "mem_overcommit": o.mem_overcommit}})
    power = host_power(snap, o.idle_w, o.peak_w)
    # hosts in maintenance stay powered (the operator's) and are evacuated, never switched
    maint = {i for i, h in enumerate(snap.hosts) if h.state is HostState.MAINTENANCE}
    keep = set(keep_on)
    locked = maint | {i for i, h in enumerate(snap.hosts) if h.name in keep}
    was_on = [on or i in maint for i, on in enumerate(was_on)]
    scope, movable = model_scope(snap, o, maint)
    hint_on, hint_hosts = greedy_hint(problem, scope, movable, was_on, locked, o)
    res = solve(problem, power, was_on, PowerOptions(
        target_util=o.target_util, migration_w=o.migration_w, max_switch=o.max_switch,
        max_dtime=o.max_dtime, time_limit=o.time_limit, seed=o.seed, hint_fallback=True),
        locked=locked,
        vm_var=vm_var, z=o.z, hosts=scope, movable_from=movable, hint_on=hint_on,
        hint_hosts=hint_hosts)
    cpu = [float(v.cpu_demand) for v in snap.vms]
    vm_hosts = [res.unit_hosts[problem.unit_of[v]] for v in range(len(snap.vms))]
    caps = [h.cpu_capacity for h in snap.hosts]
    on_cap = sum(c for c, on in zip(caps, res.on, strict=True) if on)
    total = sum(cpu)
    start = snap.placement()
    recs = []
    for h in res.switched_off:
        name = snap.hosts[h].name
        n_off = sum(1 for v in range(len(cpu)) if start[v] == h)
        now = model_watts(problem, power, np.array(cpu),
                          [i == h for i in range(len(caps))], list(start))
        recs.append({
            "action": "standby", "host": name, "watts_now": round(now, 1),
            "reason": (f"its {n_off} VM(s) fit on the hosts that stay on, which then run at "
                       f"{100 * total / on_cap:.0f} % CPU on average (target "
                       f"{100 * o.target_util:.0f} %); it draws {now:.0f} W now"),
            "command": _render(o.command, "standby", name) if o.command else None})
    for h in res.switched_on:
        name = snap.hosts[h].name
        on_before = sum(c for c, on in zip(caps, was_on, strict=True) if on)
        recs.append({
            "action": "wake", "host": name,
            "watts_now": 0.0,
            "reason": (f"the hosts on would run at {100 * total / max(on_before, 1):.0f} % CPU, "
                       f"above the target {100 * o.target_util:.0f} %; it draws about "
                       f"{power[h].idle_w:.0f} W idle"),
            "command": _render(o.command, "wake", name) if o.command else None})
    saved = res.watts_before - res.watts_after
    load0 = np.bincount(np.asarray(start), weights=np.array(cpu), minlength=len(caps))

    def why(v: int) -> str:
        src, dst = start[v], vm_hosts[v]
        if src in res.switched_off:
            return f"empty {snap.hosts[src].name} for standby"
        if src in maint:
            return f"evacuate {snap.hosts[src].name} (maintenance)"
        if load0[src] > o.target_util * caps[src]:
            return (f"relieve {snap.hosts[src].name}: {100 * load0[src] / caps[src]:.0f} % CPU, "
                    f"above the target {100 * o.target_util:.0f} %")
        return (f"part of the least-power placement found: {snap.hosts[dst].name} runs its "
                f"demand for fewer watts than {snap.hosts[src].name} (power curves); the plan "
                f"saves {saved:.0f} W over {len(res.moved_vms)} moves, the price being "
                f"{o.migration_w:g} W per move")
    moves = [Move(snap.vms[v].name, snap.hosts[start[v]].name, snap.hosts[vm_hosts[v]].name,
                  why(v), snap.vms[v].mem) for v in res.moved_vms]
    from balancer.planner import PlannerLimits, make_waves

    waves = make_waves(woken, moves, PlannerLimits(mem_overcommit=o.mem_overcommit))
    return {
        "power": {"status": res.status, "watts_before": round(res.watts_before, 1),
                  "watts_after": round(res.watts_after, 1),
                  "watts_saved": round(res.watts_before - res.watts_after, 1),
                  "target_util": o.target_util, "recommendations": recs,
                  **({"forecast": forecast} if forecast is not None else {})},
        "migrations": [{"vm": m.vm, "from": m.source, "to": m.target, "reason": m.reason,
                        "mem_mb": m.mem} for m in moves],
        **waves.to_dict(),
    }


def _render(template: str, action: str, host: str) -> list[str]:
    try:
        return [part.format(action=action, host=host) for part in shlex.split(template)]
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(f"--power-command: bad template {template!r} ({exc}); use {{action}} "
                         "and {host}") from None


def run_commands(doc: dict[str, Any], timeout: float = 60.0) -> list[dict[str, Any]]:
    """Run each recommendation's command (wake first, then standby); returns what happened."""
    out = []
    recs = sorted(doc["power"]["recommendations"], key=lambda r: r["action"] != "wake")
    for r in recs:
        if not r.get("command"):
            continue
        try:
            p = subprocess.run(r["command"], capture_output=True, text=True, timeout=timeout)
            out.append({"host": r["host"], "action": r["action"], "exit": p.returncode,
                        "output": (p.stdout + p.stderr).strip()[-500:]})
        except (OSError, subprocess.TimeoutExpired) as exc:
            out.append({"host": r["host"], "action": r["action"], "exit": None,
                        "output": str(exc)})
    return out


__all__ = ["PowerPlanOptions", "forecast_snapshot", "host_power", "plan_power", "read_history",
           "run_commands"]
