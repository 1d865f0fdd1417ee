"""Replay policies: per-cycle strategies that decide what to ask the engine during a what-if replay.

A replay policy is not an engine policy (``policies.base``: capacity, evacuation, rules, balance,
budget turn a snapshot into solver terms). A replay policy runs once per cycle of the simulator
(``simulator.cluster``) with a read-only context (the cluster, the demand observed so far, and
the engine to call) and answers with a ``Decision``: hosts to power on or put in standby, and
migrations. Each policy is one class with a typed ``Args`` dataclass whose ``__post_init__``
rejects bad values naming the field; ``make(name, args)`` rejects unknown names and fields.

Registered here: ``none``, ``balance`` (the default) and ``greedy``; ``consolidate`` lives in
``simulator.consolidate`` and ``power`` in ``simulator.power_policy``. Those modules import this
one; this one never imports them (``lookup`` loads ``BUILTIN_MODULES`` by name on first use, so
there is no import circle). The engine is reached through the context the simulator hands in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

import numpy as np

from balancer.errors import InputError

ON = 2  # simulator power state of a booted host


class Context(Protocol):  # what simulator.cluster.ReplayContext provides
    step: int
    n_hosts: int
    n_vms: int
    host_cpu: np.ndarray
    power: np.ndarray
    standby: np.ndarray
    vm_host: np.ndarray

    def observed(self, k: int) -> np.ndarray: ...
    def host_load(self, cpu: np.ndarray) -> np.ndarray: ...
    def snapshot(self, hosts: list[int], cpu: np.ndarray,
                 standby: set[int] | None = None) -> Any: ...
    def plan(self, snapshot: Any, **options: Any) -> list[tuple[int, int]]: ...


@dataclass(frozen=True)
class Decision:
    power_on: tuple[int, ...] = ()
    standby: tuple[int, ...] = ()
    wake: tuple[int, ...] = ()
    moves: tuple[tuple[int, int], ...] = ()


class ReplayPolicy(Protocol):
    name: ClassVar[str]

    def decide(self, ctx: Context) -> Decision: ...


_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    name = cls.name  # type: ignore[attr-defined]
    if name in _REGISTRY:
        raise ValueError(f"replay policy {name!r} is registered twice")
    _REGISTRY[name] = cls
    return cls


BUILTIN_MODULES = ("simulator.consolidate", "simulator.power_policy", "simulator.lr_mmt")


def _load_builtins() -> None:
    import importlib

    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)


def registered() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def lookup(name: str) -> type:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"replay policy {name!r} is unknown "
                         f"(known: {', '.join(registered())})") from None


def make(name: str, args: dict[str, Any] | None = None, where: str | None = None) -> Any:
    """Build a replay policy from its name and arguments, with field-named errors."""
    cls = lookup(name)
    args_cls = cls.Args  # type: ignore[attr-defined]
    known = {f.name for f in fields(args_cls)}
    w = where or f"policy {name}"
    for key in args or {}:
        if key not in known:
            raise InputError(f"{w}: field {key!r} is unknown (known: {', '.join(sorted(known))})")
    try:
        a = args_cls(**(args or {}))
    except TypeError as exc:
        raise InputError(f"{w}: {exc}") from None
    except InputError as exc:
        raise InputError(f"{w}: {exc}") from None
    return cls(a)


def estimate(ctx: Context, window: int) -> np.ndarray:
    """Per-VM CPU demand estimate: the peak of the last ``window`` observed steps."""
    return ctx.observed(window).max(axis=0)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise InputError(msg)


# ---------------------------------------------------------------- none


@dataclass(frozen=True)
class NoneArgs:
    pass


@register
class NoMigrations:
    """No migrations: the initial placement is kept (the "do nothing" line of the comparison)."""

    name: ClassVar[str] = "none"
    Args = NoneArgs

    def __init__(self, args: NoneArgs | None = None) -> None:
        self.args = args or NoneArgs()

    def decide(self, ctx: Context) -> Decision:
        return Decision()


# ---------------------------------------------------------------- balance / greedy


@dataclass(frozen=True)
class BalanceArgs:
    threshold: int = 3
    cpu_headroom: float = 0.1
    max_migrations: int | None = None  # per cycle
    max_iterations: int = 5  # LNS steps per cycle (deterministic stop)
    time_limit: float = 60.0  # safety net only; max_iterations stops first
    window: int = 1  # demand estimate: peak of the last `window` observed steps
    trigger_std: float = 0.0  # plan only if CPU util std over hosts exceeds this, or a host
    #                           is above 1 - cpu_headroom (0: plan every cycle)
    solver: str = "cpsat"

    def __post_init__(self) -> None:
        _need(self.threshold in (1, 2, 3, 4, 5) and not isinstance(self.threshold, bool),
              f"field 'threshold' must be 1..5, got {self.threshold!r}")
        _need(isinstance(self.cpu_headroom, (int, float)) and 0 <= self.cpu_headroom < 1,
              f"field 'cpu_headroom' must be in [0, 1), got {self.cpu_headroom!r}")
        _need(self.max_migrations is None or (isinstance(self.max_migrations, int)
                                              and self.max_migrations >= 0),
              f"field 'max_migrations' must be a whole number >= 0, got {self.max_migrations!r}")
        _need(isinstance(self.max_iterations, int) and self.max_iterations >= 1,
              f"field 'max_iterations' must be a whole number >= 1, got {self.max_iterations!r}")
        _need(isinstance(self.time_limit, (int, float)) and math.isfinite(self.time_limit)
              and self.time_limit > 0, f"field 'time_limit' must be > 0, got {self.time_limit!r}")
        _need(isinstance(self.window, int) and self.window >= 1,
              f"field 'window' must be a whole number >= 1, got {self.window!r}")
        _need(isinstance(self.trigger_std, (int, float)) and self.trigger_std >= 0,
              f"field 'trigger_std' must be >= 0, got {self.trigger_std!r}")
        _need(self.solver in ("cpsat", "greedy"),
              f"field 'solver' must be 'cpsat' or 'greedy', got {self.solver!r}")

    def plan_options(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "cpu_headroom": self.cpu_headroom,
                "max_migrations": self.max_migrations, "max_iterations": self.max_iterations,
                "time_limit": self.time_limit, "solver": self.solver}


@register
class Balance:
    """Balance: the engine's real cycle over every powered host, each cycle it is needed.

    Description
        Builds a snapshot of the hosts that are on with each VM's demand estimate (peak of the
        last ``window`` observed steps) and runs ``balancer.service.plan`` (CP-SAT LNS stopped
        after ``max_iterations`` steps, so replays are deterministic), as DRS runs every 5
        minutes. With ``trigger_std`` > 0 it plans only when the spread of host CPU utilisation
        exceeds it or a host is above its headroom, as DRS acts only past its threshold.
    Requirements
        A context with ``plan`` (the simulator's engine hook).
    Limitations
        Does not manage power: empty hosts stay on (drawing idle power unless the cluster
        config counts empty hosts as off).
    """

    name: ClassVar[str] = "balance"
    Args = BalanceArgs

    def __init__(self, args: BalanceArgs | None = None) -> None:
        self.args = args or self.Args()

    def decide(self, ctx: Context) -> Decision:
        a = self.args
        est = estimate(ctx, a.window)
        hosts = [h for h in range(ctx.n_hosts) if ctx.power[h] == ON]
        if a.trigger_std > 0:
            util = ctx.host_load(est)[hosts] / ctx.host_cpu[hosts]
            if float(np.std(util)) <= a.trigger_std and float(util.max()) <= 1 - a.cpu_headroom:
                return Decision()
        snap = ctx.snapshot(hosts, est)
        return Decision(moves=tuple(ctx.plan(snap, **a.plan_options())))


@dataclass(frozen=True)
class GreedyArgs(BalanceArgs):
    solver: str = "greedy"


@register
class Greedy(Balance):
    """The greedy baseline: as ``balance``, with the engine's greedy heuristic instead of CP-SAT."""

    name: ClassVar[str] = "greedy"
    Args = GreedyArgs


__all__ = ["Balance", "Decision", "Greedy", "NoMigrations", "ReplayPolicy", "estimate", "lookup",
           "make", "register", "registered"]
