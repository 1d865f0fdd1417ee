"""Trace loaders for what-if replay: PlanetLab, Bitbrains Rnd, Alibaba v2018, and a long format.

Description
    Every loader returns a ``Trace``: one row per time step on a regular grid (``interval_s``),
    one column per VM (names sorted), with

    * ``cpu_util``: CPU demand as a share of the VM's CPU size (0..1), NaN where the VM is absent
      (not yet started, switched off, not reporting);
    * ``mem_util``: memory in use as a share of the VM's configured memory, or None when the
      trace has no memory (PlanetLab);
    * ``vcpus`` / ``mem_mb``: the VM's CPU size in cores and configured memory in MiB, or None
      when the trace has no sizes (PlanetLab: the simulator's documented mapping sizes them).

    Formats (see ``simulator/data/traces/README.md``):

    * ``planetlab:DIR`` one file per VM, one integer CPU % per line, 300 s apart (CloudSim copy);
      ``planetlab:FILE.csv[.gz]`` the same day packed as one CSV (header ``vm,t0,...``, one row
      per VM: its file name, then its values), as bundled.
    * ``bitbrains:DIR|FILE`` GWA-T-12 CSV (``;`` + TAB separated, optionally gzipped). Rows with
      0 cores or 0 provisioned memory mean "VM absent"; duplicate timestamps are averaged;
      samples are put on a 300 s grid from the earliest timestamp (nearest slot).
    * ``alibaba:FILE`` v2018 ``machine_usage`` (no header; machines used as VM-like series,
      96 cores and ``ALIBABA_MEM_MB`` each unless ``machine_meta`` beside it says other cores);
      the irregular ~60 s samples are averaged into 300 s slots, short gaps carried forward.
    * ``csv:FILE`` / ``parquet:FILE`` long format with columns ``timestamp, vm, cpu, mem``:
      ``timestamp`` in seconds (or ISO 8601), ``cpu`` in cores used, ``mem`` in MiB used.
      Optional ``vcpus`` and ``mem_mb`` columns give sizes; without them a VM's size is its
      peak use rounded up (cores to a whole number, memory to a whole GiB).

    Bundled samples (``simulator/data/traces``, installed with the package) are named without a
    path: ``planetlab:sample`` (= ``planetlab:20110303``), ``planetlab:20110306``,
    ``bitbrains:sample`` (31 VMs), ``alibaba:sample`` (2 machines). ``bundled()`` lists them.

    A malformed row raises ``TraceError`` naming the file and line (``FILE:LINE: field 'x' ...``);
    with ``skip_bad=True`` such rows are skipped and counted in ``Trace.skipped``.
Requirements
    numpy; pandas for the long format; pyarrow for Parquet.
Limitations
    Whole traces are held in memory (Bitbrains 200 VMs x 30 days is about 14 MB as float32).
    Alibaba machines are physical hosts, not VMs; treat them as a differently shaped workload.
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from balancer.errors import InputError

KINDS = ("planetlab", "bitbrains", "alibaba", "csv", "parquet")
PLANETLAB_INTERVAL = 300
ALIBABA_MEM_MB = 384 * 1024  # documented mapping: machine_meta gives memory only normalised
ALIBABA_CORES = 96


class TraceError(InputError):
    """A trace that cannot be read: the message names the file and line."""


@dataclass
class Trace:
    kind: str
    source: str
    interval_s: int
    names: tuple[str, ...]
    cpu_util: np.ndarray  # (steps, vms) float, NaN = absent
    mem_util: np.ndarray | None = None
    vcpus: np.ndarray | None = None  # (vms,) cores
    mem_mb: np.ndarray | None = None  # (vms,) MiB
    start_s: float = 0.0
    skipped: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return int(self.cpu_util.shape[0])

    @property
    def n_vms(self) -> int:
        return len(self.names)

    def head(self, steps: int | None = None, vms: int | None = None) -> Trace:
        """The first ``steps`` steps and first ``vms`` VMs (for tests and quick looks)."""
        s = slice(None, steps)
        v = slice(None, vms)
        return Trace(
            kind=self.kind, source=self.source, interval_s=self.interval_s,
            names=self.names[v], cpu_util=self.cpu_util[s, v],
            mem_util=None if self.mem_util is None else self.mem_util[s, v],
            vcpus=None if self.vcpus is None else self.vcpus[v],
            mem_mb=None if self.mem_mb is None else self.mem_mb[v],
            start_s=self.start_s, skipped=self.skipped, notes=list(self.notes))

    def window(self, start: int, steps: int) -> Trace:
        """Steps ``start`` .. ``start + steps - 1`` (e.g. one day of a month-long trace)."""
        s = slice(start, start + steps)
        return Trace(
            kind=self.kind, source=f"{self.source}[{start}:{start + steps}]",
            interval_s=self.interval_s, names=self.names, cpu_util=self.cpu_util[s],
            mem_util=None if self.mem_util is None else self.mem_util[s], vcpus=self.vcpus,
            mem_mb=self.mem_mb, start_s=self.start_s + start * self.interval_s,
            skipped=self.skipped, notes=list(self.notes))


def _err(path: Path | str, line: int | None, msg: str) -> TraceError:
    where = f"{path}:{line}" if line is not None else f"{path}"
    return TraceError(f"{where}: {msg}")


def _open_text(path: Path):  # noqa: ANN202
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``KIND:PATH``; the kind must be known."""
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise InputError(f"--trace: expected KIND:PATH (KIND one of {', '.join(KINDS)}), "
                         f"got {spec!r}")
    if kind not in KINDS:
        raise InputError(f"--trace: kind {kind!r} is unknown (known: {', '.join(KINDS)})")
    return kind, path


DATA = Path(__file__).resolve().parent / "data" / "traces"
PLANETLAB_DAYS = ("20110303", "20110306")
SAMPLES: dict[tuple[str, str], str] = {
    ("planetlab", "sample"): "planetlab/20110303.csv.gz",
    **{("planetlab", d): f"planetlab/{d}.csv.gz" for d in PLANETLAB_DAYS},
    ("bitbrains", "sample"): "bitbrains-rnd/2013-7",
    ("alibaba", "sample"): "alibaba-v2018/machine_usage.m_1932+m_1937.csv.gz",
}


def bundled() -> dict[str, Path]:
    """The bundled trace samples: spec (``KIND:NAME``) -> file or folder."""
    return {f"{k}:{n}": DATA / rel for (k, n), rel in SAMPLES.items()}


def resolve(spec: str) -> tuple[str, Path]:
    """``KIND:PATH`` -> (kind, path); a bundled name (``planetlab:sample``) -> its file."""
    kind, path = parse_spec(spec)
    p = Path(path)
    if not p.exists() and (kind, path) in SAMPLES:
        p = DATA / SAMPLES[(kind, path)]
    if not p.exists():
        names = ", ".join(n for (k, n) in SAMPLES if k == kind)
        hint = f" (bundled {kind} samples: {names})" if names else ""
        raise TraceError(f"{path}: no such file or directory{hint}")
    return kind, p


def load(spec: str, *, skip_bad: bool = False, max_vms: int | None = None) -> Trace:
    """Load ``KIND:PATH``; ``max_vms`` keeps the first VMs in name order (files read lazily)."""
    kind, p = resolve(spec)
    if kind == "planetlab":
        return load_planetlab(p, skip_bad=skip_bad, max_vms=max_vms)
    if kind == "bitbrains":
        return load_bitbrains(p, skip_bad=skip_bad, max_vms=max_vms)
    if kind == "alibaba":
        return load_alibaba(p, skip_bad=skip_bad, max_vms=max_vms)
    return load_long(p, kind, skip_bad=skip_bad, max_vms=max_vms)


# ---------------------------------------------------------------- PlanetLab

def _planetlab_value(text: str) -> float:
    """One CPU % sample -> share 0..1; ValueError with a readable message."""
    try:
        if not text:
            raise ValueError
        x = float(text)
    except ValueError:
        raise ValueError(f"CPU % must be a number in 0..100, got {text!r}") from None
    if not math.isfinite(x) or not 0 <= x <= 100:
        raise ValueError(f"CPU % must be in 0..100, got {text!r}")
    return x / 100.0


def _planetlab_matrix(series: list[list[float]]) -> np.ndarray:
    steps = max(len(s) for s in series)
    cpu = np.full((steps, len(series)), np.nan, dtype=np.float64)
    for j, s in enumerate(series):
        cpu[: len(s), j] = s
    _ffill(cpu)  # a skipped sample takes the previous value (the VM did not vanish)
    return cpu


def load_planetlab_packed(path: Path, *, skip_bad: bool = False,
                          max_vms: int | None = None) -> Trace:
    """A PlanetLab day packed as one CSV (``vm,t0,...``; one row per VM), gzipped or not."""
    import csv

    names: list[str] = []
    series: list[list[float]] = []
    skipped = 0
    with _open_text(path) as fh:
        for ln, row in enumerate(csv.reader(fh), start=1):
            if ln == 1 and row and row[0] == "vm":
                continue
            if not row:
                continue
            if max_vms is not None and len(names) >= max_vms:
                break
            name = row[0]
            if not name:
                raise _err(path, ln, "field 'vm' is empty")
            vals: list[float] = []
            for text in row[1:]:
                try:
                    vals.append(_planetlab_value(text.strip()))
                except ValueError as exc:
                    if not skip_bad:
                        raise _err(path, ln, f"VM {name!r}: {exc}") from None
                    skipped += 1
                    vals.append(math.nan)
            if not vals:
                raise _err(path, ln, f"VM {name!r}: no samples")
            names.append(name)
            series.append(vals)
    if not series:
        raise TraceError(f"{path}: no VMs in this file")
    order = sorted(range(len(names)), key=names.__getitem__)
    names = [names[i] for i in order]
    series = [series[i] for i in order]
    return Trace(kind="planetlab", source=str(path), interval_s=PLANETLAB_INTERVAL,
                 names=tuple(names), cpu_util=_planetlab_matrix(series), skipped=skipped)


def load_planetlab(path: Path, *, skip_bad: bool = False, max_vms: int | None = None) -> Trace:
    if path.is_file() and (path.name.endswith(".csv") or path.name.endswith(".csv.gz")):
        return load_planetlab_packed(path, skip_bad=skip_bad, max_vms=max_vms)
    if not path.is_dir():
        raise TraceError(f"{path}: a PlanetLab day is a directory of per-VM files "
                         "(or one packed .csv/.csv.gz)")
    files = sorted(f for f in os.listdir(path) if not f.startswith(".")
                   and f.lower() != "readme.md" and (path / f).is_file())
    if not files:
        raise TraceError(f"{path}: no trace files in this directory")
    if max_vms is not None:
        files = files[:max_vms]
    series: list[list[float]] = []
    skipped = 0
    for name in files:
        fp = path / name
        vals: list[float] = []
        with open(fp, encoding="utf-8", errors="replace") as fh:
            for ln, raw in enumerate(fh, start=1):
                try:
                    vals.append(_planetlab_value(raw.strip()))
                except ValueError as exc:
                    if not skip_bad:
                        raise _err(fp, ln, str(exc)) from None
                    skipped += 1
                    vals.append(math.nan)
        if not vals:
            raise _err(fp, None, "file is empty")
        series.append(vals)
    return Trace(kind="planetlab", source=str(path), interval_s=PLANETLAB_INTERVAL,
                 names=tuple(files), cpu_util=_planetlab_matrix(series), skipped=skipped)


def _ffill(a: np.ndarray) -> None:
    """Carry the last value forward over NaNs, in place, column by column."""
    for t in range(1, a.shape[0]):
        row = a[t]
        nan = np.isnan(row)
        if nan.any():
            row[nan] = a[t - 1][nan]


# ---------------------------------------------------------------- Bitbrains

BITBRAINS_COLUMNS = 11


def _bitbrains_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = [p for p in path.iterdir() if p.is_file() and
             (p.name.endswith(".csv") or p.name.endswith(".csv.gz"))]
    if not files:
        raise TraceError(f"{path}: no .csv or .csv.gz files in this directory")

    def key(p: Path) -> tuple[int, str]:
        stem = p.name.split(".")[0]
        return (int(stem), "") if stem.isdigit() else (1 << 60, stem)
    return sorted(files, key=key)


def load_bitbrains(path: Path, *, skip_bad: bool = False, max_vms: int | None = None,
                   interval_s: int = 300) -> Trace:
    files = _bitbrains_files(path)
    if max_vms is not None:
        files = files[:max_vms]
    per_vm: list[tuple[np.ndarray, np.ndarray, np.ndarray, float, float]] = []
    names: list[str] = []
    skipped = 0
    for fp in files:
        ts_l: list[float] = []
        cu_l: list[float] = []
        mu_l: list[float] = []
        max_cores = 0.0
        max_mem_kb = 0.0
        with _open_text(fp) as fh:
            for ln, raw in enumerate(fh, start=1):
                if ln == 1 and raw.startswith("Timestamp"):
                    continue
                if not raw.strip():
                    continue
                parts = raw.split(";")
                try:
                    if len(parts) != BITBRAINS_COLUMNS:
                        raise ValueError(f"expected {BITBRAINS_COLUMNS} ';'-separated fields, "
                                         f"got {len(parts)}")
                    ts = float(parts[0])
                    cores = float(parts[1])
                    cap_mhz = float(parts[2])
                    use_mhz = float(parts[3])
                    mem_cap = float(parts[5])
                    mem_use = float(parts[6])
                    for nm, x in (("Timestamp", ts), ("CPU cores", cores),
                                  ("CPU capacity provisioned [MHZ]", cap_mhz),
                                  ("CPU usage [MHZ]", use_mhz),
                                  ("Memory capacity provisioned [KB]", mem_cap),
                                  ("Memory usage [KB]", mem_use)):
                        if not math.isfinite(x) or x < 0:
                            raise ValueError(f"field '{nm}' must be a number >= 0, got {x}")
                except ValueError as exc:
                    if skip_bad:
                        skipped += 1
                        continue
                    msg = str(exc)
                    if msg.startswith("could not convert"):
                        msg = "a field is not a number: " + msg.split(":", 1)[-1].strip()
                    raise _err(fp, ln, msg) from None
                ts_l.append(ts)
                if cores <= 0 or mem_cap <= 0 or cap_mhz <= 0:
                    cu_l.append(math.nan)  # VM off / not reporting
                    mu_l.append(math.nan)
                    continue
                max_cores = max(max_cores, cores)
                max_mem_kb = max(max_mem_kb, mem_cap)
                cu_l.append(min(use_mhz / cap_mhz, 1.0) * cores)  # cores in use
                mu_l.append(min(mem_use, mem_cap) / 1024.0)  # MiB in use
        names.append(fp.name.split(".")[0])
        per_vm.append((np.array(ts_l), np.array(cu_l), np.array(mu_l), max_cores,
                       max_mem_kb / 1024.0))
    if not any(len(p[0]) for p in per_vm):
        raise TraceError(f"{path}: no samples")
    t0 = min(float(p[0].min()) for p in per_vm if len(p[0]))
    t1 = max(float(p[0].max()) for p in per_vm if len(p[0]))
    steps = int(round((t1 - t0) / interval_s)) + 1
    n = len(names)
    cpu = np.full((steps, n), np.nan)
    mem = np.full((steps, n), np.nan)
    vcpus = np.zeros(n)
    mem_mb = np.zeros(n)
    never = []
    for j, (ts, cu, mu, cores, mmb) in enumerate(per_vm):
        if cores <= 0:
            never.append(names[j])
            vcpus[j], mem_mb[j] = 1.0, 1024.0
            continue
        vcpus[j], mem_mb[j] = cores, math.ceil(mmb)
        slot = np.rint((ts - t0) / interval_s).astype(np.int64)
        ok = ~np.isnan(cu)
        # duplicate timestamps / several samples per slot: average them
        sums = np.bincount(slot[ok], weights=cu[ok], minlength=steps)
        msum = np.bincount(slot[ok], weights=mu[ok], minlength=steps)
        cnt = np.bincount(slot[ok], minlength=steps)
        have = cnt > 0
        cpu[have, j] = sums[have] / cnt[have] / cores
        mem[have, j] = msum[have] / cnt[have] / mem_mb[j]
    notes = []
    if never:
        notes.append(f"{len(never)} VM(s) never present: {', '.join(never[:5])}")
    return Trace(kind="bitbrains", source=str(path), interval_s=interval_s, names=tuple(names),
                 cpu_util=np.clip(cpu, 0, 1), mem_util=np.clip(mem, 0, 1), vcpus=vcpus,
                 mem_mb=mem_mb, start_s=t0, skipped=skipped, notes=notes)


# ---------------------------------------------------------------- Alibaba

def load_alibaba(path: Path, *, skip_bad: bool = False, max_vms: int | None = None,
                 interval_s: int = 300, max_gap_slots: int = 3) -> Trace:
    if path.is_dir():
        cands = sorted(path.glob("machine_usage*.csv*"))
        if not cands:
            raise TraceError(f"{path}: no machine_usage*.csv(.gz) file in this directory")
        path = cands[0]
    cores_of: dict[str, float] = {}
    meta = sorted(path.parent.glob("machine_meta*.csv"))
    for mp in meta:
        with open(mp, encoding="utf-8") as fh:
            for raw in fh:
                parts = raw.strip().split(",")
                if len(parts) >= 5 and parts[4].strip().isdigit():
                    cores_of[parts[0]] = float(parts[4])
    rows: dict[str, tuple[list[float], list[float], list[float]]] = {}
    skipped = 0
    with _open_text(path) as fh:
        for ln, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            parts = raw.rstrip("\r\n").split(",")
            try:
                if len(parts) != 9:
                    raise ValueError(f"expected 9 comma-separated fields, got {len(parts)}")
                mid = parts[0].strip()
                if not mid:
                    raise ValueError("field 'machine_id' is empty")
                vals = []
                for nm, txt in (("time_stamp", parts[1]), ("cpu_util_percent", parts[2]),
                                ("mem_util_percent", parts[3])):
                    try:
                        x = float(txt)
                    except ValueError:
                        raise ValueError(f"field '{nm}' must be a number, got {txt!r}") from None
                    if not math.isfinite(x) or x < 0 or (nm != "time_stamp" and x > 100):
                        raise ValueError(f"field '{nm}' out of range: {txt!r}")
                    vals.append(x)
            except ValueError as exc:
                if skip_bad:
                    skipped += 1
                    continue
                raise _err(path, ln, str(exc)) from None
            r = rows.setdefault(mid, ([], [], []))
            r[0].append(vals[0])
            r[1].append(vals[1] / 100.0)
            r[2].append(vals[2] / 100.0)
    if not rows:
        raise TraceError(f"{path}: no samples")
    names = sorted(rows)
    if max_vms is not None:
        names = names[:max_vms]
    t0 = min(min(rows[m][0]) for m in names)
    t1 = max(max(rows[m][0]) for m in names)
    steps = int((t1 - t0) // interval_s) + 1
    cpu = np.full((steps, len(names)), np.nan)
    mem = np.full((steps, len(names)), np.nan)
    for j, m in enumerate(names):
        ts, cu, mu = (np.asarray(x) for x in rows[m])
        slot = ((ts - t0) // interval_s).astype(np.int64)
        cnt = np.bincount(slot, minlength=steps)
        have = cnt > 0
        cpu[have, j] = np.bincount(slot, weights=cu, minlength=steps)[have] / cnt[have]
        mem[have, j] = np.bincount(slot, weights=mu, minlength=steps)[have] / cnt[have]
        # carry forward over short gaps only (after the first sample)
        first = int(np.argmax(have))
        gap = 0
        for t in range(first + 1, steps):
            if have[t]:
                gap = 0
            elif gap < max_gap_slots:
                gap += 1
                cpu[t, j], mem[t, j] = cpu[t - 1, j], mem[t - 1, j]
    vcpus = np.array([cores_of.get(m, ALIBABA_CORES) for m in names], dtype=float)
    return Trace(kind="alibaba", source=str(path), interval_s=interval_s, names=tuple(names),
                 cpu_util=cpu, mem_util=mem, vcpus=vcpus,
                 mem_mb=np.full(len(names), float(ALIBABA_MEM_MB)), start_s=t0,
                 skipped=skipped,
                 notes=["machines used as VM-like series (physical hosts, not VMs)"])


# ---------------------------------------------------------------- long format

LONG_REQUIRED = ("timestamp", "vm", "cpu", "mem")


def load_long(path: Path, kind: str, *, skip_bad: bool = False, max_vms: int | None = None,
              interval_s: int | None = None) -> Trace:
    import pandas as pd

    if kind == "parquet":
        try:
            df = pd.read_parquet(path)
        except ImportError as exc:
            raise TraceError(f"{path}: reading Parquet needs pyarrow ({exc})") from None
        except Exception as exc:  # noqa: BLE001  (pyarrow raises its own error types)
            raise TraceError(f"{path}: not a readable Parquet file ({exc})") from None
        first_line, unit = 0, "row"
    else:
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise TraceError(f"{path}: not a readable CSV file ({exc})") from None
        except pd.errors.EmptyDataError:
            raise TraceError(f"{path}: file is empty") from None
        first_line, unit = 2, "line"  # header is line 1
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in LONG_REQUIRED if c not in df.columns]
    if missing:
        raise TraceError(f"{path}: missing column(s) {', '.join(missing)} "
                         f"(need {', '.join(LONG_REQUIRED)})")
    n_rows = len(df)
    bad = np.zeros(n_rows, dtype=bool)
    why: dict[int, str] = {}

    def mark(mask: np.ndarray, msg: str) -> None:
        new = mask & ~bad
        hits = np.flatnonzero(new)
        if hits.size:
            why.setdefault(int(hits[0]), msg)
        bad[new] = True

    ts_raw = df["timestamp"]
    ts = pd.to_numeric(ts_raw, errors="coerce")
    if ts.isna().all() and n_rows:
        dt = pd.to_datetime(ts_raw, errors="coerce", utc=True, format="ISO8601")
        ts = (dt - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    ts = ts.to_numpy(dtype=float)
    mark(~np.isfinite(ts), "field 'timestamp' must be seconds or an ISO 8601 time")
    vm = df["vm"].astype(str).str.strip().to_numpy()
    mark(vm == "", "field 'vm' is empty")
    cols = {}
    for c in ("cpu", "mem", "vcpus", "mem_mb"):
        if c not in df.columns:
            continue
        x = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float)
        mark(~np.isfinite(x) | (x < 0), f"field '{c}' must be a number >= 0")
        cols[c] = x
    if bad.any():
        if not skip_bad:
            i = min(why)
            raw = df[["timestamp", "vm", "cpu", "mem"]].iloc[i].tolist()
            raise _err(path, None, f"{unit} {i + first_line}: {why[i]} (row {raw})")
    keep = ~bad
    skipped = int(bad.sum())
    ts, vm = ts[keep], vm[keep]
    cols = {k: v[keep] for k, v in cols.items()}
    if len(ts) == 0:
        raise TraceError(f"{path}: no valid rows")
    names = sorted(set(vm.tolist()))
    if max_vms is not None:
        names = names[:max_vms]
    idx = {n: i for i, n in enumerate(names)}
    col = np.array([idx.get(v, -1) for v in vm])
    sel = col >= 0
    ts, col = ts[sel], col[sel]
    cols = {k: v[sel] for k, v in cols.items()}
    t0 = float(ts.min())
    if interval_s is None:
        uniq = np.unique(ts)
        gaps = np.diff(uniq)
        gaps = gaps[gaps > 0]
        interval_s = int(round(float(np.median(gaps)))) if gaps.size else 300
        interval_s = max(1, interval_s)
    slot = np.rint((ts - t0) / interval_s).astype(np.int64)
    steps = int(slot.max()) + 1
    n = len(names)
    flat = slot * n + col
    cnt = np.bincount(flat, minlength=steps * n).reshape(steps, n)
    cpu_abs = np.bincount(flat, weights=cols["cpu"], minlength=steps * n).reshape(steps, n)
    mem_abs = np.bincount(flat, weights=cols["mem"], minlength=steps * n).reshape(steps, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        cpu_abs = np.where(cnt > 0, cpu_abs / cnt, np.nan)
        mem_abs = np.where(cnt > 0, mem_abs / cnt, np.nan)
    if "vcpus" in cols:
        vcpus = np.zeros(n)
        np.maximum.at(vcpus, col, cols["vcpus"])
    else:
        vcpus = np.maximum(1.0, np.ceil(np.nanmax(np.nan_to_num(cpu_abs, nan=0.0), axis=0)))
    if "mem_mb" in cols:
        mem_mb = np.zeros(n)
        np.maximum.at(mem_mb, col, cols["mem_mb"])
    else:
        peak = np.nanmax(np.nan_to_num(mem_abs, nan=0.0), axis=0)
        mem_mb = np.maximum(1024.0, np.ceil(peak / 1024.0) * 1024.0)
    vcpus = np.where(vcpus > 0, vcpus, 1.0)
    mem_mb = np.where(mem_mb > 0, mem_mb, 1024.0)
    cpu = np.clip(cpu_abs / vcpus, 0, 1)
    mem = np.clip(mem_abs / mem_mb, 0, 1)
    return Trace(kind=kind, source=str(path), interval_s=interval_s, names=tuple(names),
                 cpu_util=cpu, mem_util=mem, vcpus=vcpus, mem_mb=mem_mb, start_s=t0,
                 skipped=skipped)


__all__ = ["DATA", "KINDS", "PLANETLAB_DAYS", "Trace", "TraceError", "bundled", "load",
           "load_alibaba", "load_bitbrains", "load_long", "load_planetlab",
           "load_planetlab_packed", "parse_spec", "resolve"]
