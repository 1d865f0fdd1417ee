"""Simulated utilisation for the demo: seeded noisy samples around the inventory's demand.

Every ``period_s`` each VM reports ``demand x (1 + 0.1 N(0,1))`` (clamped to its size) and each
host the sum over its VMs, so the demo has live, smooth metrics that follow migrations.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pandas as pd

from balancer.ingest.samples import SampleBuffer
from balancer.model import ClusterSnapshot


class SimulatedSource:
    name = "simulated"

    def __init__(self, inventory: Callable[[], ClusterSnapshot | None], *, period_s: float,
                 window_s: float, retention_s: float, seed: int = 0) -> None:
        self._inventory = inventory
        self.period_s = period_s
        self.window_s = window_s
        self.buffer = SampleBuffer(retention_s)
        self._rng = np.random.default_rng(seed)
        self._last: float | None = None
        self._lock = threading.Lock()

    def _emit(self, snap: ClusterSnapshot, ts: float) -> None:
        n = len(snap.vms)
        cpu = np.array([v.cpu_demand / 1000 for v in snap.vms])
        mem = np.array([float(v.mem_demand) for v in snap.vms])
        size_c = np.array([float(v.vcpus) for v in snap.vms])
        size_m = np.array([float(v.mem) for v in snap.vms])
        cpu = np.clip(cpu * (1 + 0.1 * self._rng.standard_normal(n)), 0, size_c)
        mem = np.clip(mem * (1 + 0.02 * self._rng.standard_normal(n)), 0, size_m)
        host_cpu: dict[str, float] = {h.name: 0.0 for h in snap.hosts}
        host_mem: dict[str, float] = {h.name: 0.0 for h in snap.hosts}
        for v, c, m in zip(snap.vms, cpu, mem, strict=True):
            host_cpu[v.host] += float(c)
            host_mem[v.host] += float(m)
        names = [v.name for v in snap.vms] + list(host_cpu)
        kinds = ["vm"] * n + ["host"] * len(host_cpu)
        self.buffer.add([ts] * len(names), kinds, names,
                        list(cpu) + list(host_cpu.values()),
                        list(mem) + list(host_mem.values()))

    def frame(self, now: float) -> pd.DataFrame:
        with self._lock:
            self._generate(now)
        return self.buffer.frame(now)

    def _generate(self, now: float) -> None:
        snap = self._inventory()
        if snap is not None:
            start = now - self.window_s if self._last is None else self._last + self.period_s
            start = max(start, now - self.window_s)
            ts = start
            while ts <= now:
                self._emit(snap, ts)
                self._last = ts
                ts += self.period_s
