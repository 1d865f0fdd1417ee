"""Generated variants of a real trace, to tune on more days than the data has.

Description
    Parameters chosen on one day fit that day. To choose them on more than the bundled days,
    each day yields seeded variants that keep what a power policy must cope with (per-VM demand
    levels, burstiness, the day's total) while changing what a tuned rule could latch onto:

    * ``shift``: each VM's series is rotated in time by its own random offset (whole day), so
      the VMs' peaks line up differently; every VM keeps its own distribution of demand.
    * ``bootstrap``: as many VMs as the day has, drawn with replacement from its VMs (a
      different mix, the same kind of VM), each rotated as in ``shift``.
    * ``scale``: every VM's demand times ``factor`` (default 1.15), capped at 100 %: a busier
      day of the same shape.

    Variants are named ``DAY~KIND~SEED`` (e.g. ``20110303~shift~1``); ``make(trace, name)``
    builds one from a loaded trace, deterministically from the seed.
Requirements
    A ``Trace`` (``simulator.traces``).
Limitations
    Variants share the day's VMs: they are not independent days. Reported figures are always
    on the real days; variants only widen the set parameters are chosen on.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from balancer.errors import InputError
from simulator.traces import Trace

KINDS = ("shift", "bootstrap", "scale")


def make(trace: Trace, kind: str, seed: int = 1, *, factor: float = 1.15) -> Trace:
    """The ``kind`` variant of ``trace`` for ``seed``."""
    if kind not in KINDS:
        raise InputError(f"variant: kind {kind!r} is unknown (known: {', '.join(KINDS)})")
    rng = np.random.default_rng(seed)
    cpu = trace.cpu_util
    steps, n = cpu.shape
    names = list(trace.names)
    cols = np.arange(n)
    if kind == "bootstrap":
        cols = rng.integers(0, n, size=n)
        names = [f"{trace.names[c]}#{i}" for i, c in enumerate(cols)]
    if kind == "scale":
        out = np.clip(cpu * factor, 0.0, 1.0)
    else:
        offs = rng.integers(0, steps, size=n)
        rows = (np.arange(steps)[:, None] + offs[None, :]) % steps
        out = cpu[:, cols][rows, np.arange(n)[None, :]]
    def pick(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[cols]
    mem = None
    if trace.mem_util is not None:
        mem = trace.mem_util[:, cols] if kind != "scale" else trace.mem_util
    return replace(trace, source=f"{trace.source}~{kind}~{seed}", names=tuple(names),
                   cpu_util=out, mem_util=mem, vcpus=pick(trace.vcpus),
                   mem_mb=pick(trace.mem_mb), notes=[*trace.notes, f"variant {kind} {seed}"])


__all__ = ["KINDS", "make"]
