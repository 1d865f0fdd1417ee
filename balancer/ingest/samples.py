"""Sample storage for pushed metrics and the common ``Source`` interface.

``SampleBuffer`` keeps pushed samples in memory as column chunks (appending a batch is a few
list extends under a lock, so pushing is cheap) and hands a pandas frame to the estimator.
Samples older than the retention are dropped at each ``frame()`` call.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import pandas as pd

COLUMNS = ("ts", "kind", "name", "cpu", "mem")


def empty_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "ts": pd.Series([], dtype="float64"),
        "kind": pd.Series([], dtype="object"),
        "name": pd.Series([], dtype="object"),
        "cpu": pd.Series([], dtype="float64"),
        "mem": pd.Series([], dtype="float64"),
    })


class Source(Protocol):
    """Where utilisation samples come from (push buffer, Prometheus, simulator)."""

    name: str

    def frame(self, now: float) -> pd.DataFrame:
        """Samples known at ``now``: columns ts, kind, name, cpu, mem (see package docs)."""
        ...


class SampleBuffer:
    """Thread-safe in-memory store of pushed samples, bounded by a retention time."""

    name = "push"

    def __init__(self, retention_s: float = 3600.0) -> None:
        self.retention_s = retention_s
        self._lock = threading.Lock()  # guards the column lists
        self._flock = threading.Lock()  # serialises frame() so no batch is taken twice or lost
        self._ts: list[float] = []
        self._kind: list[str] = []
        self._name: list[str] = []
        self._cpu: list[float] = []
        self._mem: list[float] = []
        self._frame: pd.DataFrame = empty_frame()
        self.total = 0
        self.latest_ts: float | None = None

    def add(self, ts: Sequence[float], kind: Sequence[str], name: Sequence[str],
            cpu: Sequence[float], mem: Sequence[float]) -> int:
        """Append a batch (already validated); returns the number of samples stored."""
        n = len(ts)
        if not (len(kind) == len(name) == len(cpu) == len(mem) == n):
            raise ValueError("sample columns differ in length")
        if n == 0:
            return 0
        newest = max(ts)
        with self._lock:
            self._ts.extend(ts)
            self._kind.extend(kind)
            self._name.extend(name)
            self._cpu.extend(cpu)
            self._mem.extend(mem)
            self.total += n
            if self.latest_ts is None or newest > self.latest_ts:
                self.latest_ts = newest
        return n

    def frame(self, now: float) -> pd.DataFrame:
        """All retained samples as one frame; drops those older than the retention."""
        with self._flock:
            return self._frame_locked(now)

    def _frame_locked(self, now: float) -> pd.DataFrame:
        with self._lock:
            ts, kind, name, cpu, mem = self._ts, self._kind, self._name, self._cpu, self._mem
            self._ts, self._kind, self._name, self._cpu, self._mem = [], [], [], [], []
            old = self._frame
        if ts:
            new = pd.DataFrame({"ts": np.asarray(ts, dtype="float64"), "kind": kind,
                                "name": name, "cpu": np.asarray(cpu, dtype="float64"),
                                "mem": np.asarray(mem, dtype="float64")})
            df = pd.concat([old, new], ignore_index=True) if len(old) else new
        else:
            df = old
        df = df[df["ts"] > now - self.retention_s].reset_index(drop=True)
        with self._lock:
            # Keep what was added meanwhile (it stays in the lists for the next call).
            self._frame = df
        return df

    def __len__(self) -> int:
        with self._lock:
            return len(self._frame) + len(self._ts)
