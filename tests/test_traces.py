"""Trace loaders against the bundled trace samples (simulator/data/traces) and broken copies."""

from __future__ import annotations

import csv
import gzip
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from balancer.errors import InputError
from simulator import traces
from simulator.traces import TraceError

TRACES = traces.DATA
PLANETLAB = TRACES / "planetlab" / "20110303.csv.gz"
BITBRAINS = TRACES / "bitbrains-rnd" / "2013-7"
ALIBABA = TRACES / "alibaba-v2018"
ALIBABA_USAGE = ALIBABA / "machine_usage.m_1932+m_1937.csv.gz"


def planetlab_rows() -> list[list[str]]:
    """The packed day as rows ``[name, v0, ..., v287]`` (header dropped)."""
    with gzip.open(PLANETLAB, "rt", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][:2] == ["vm", "t0"] and len(rows[0]) == 289
    return rows[1:]


def write_planetlab_dir(tmp: Path, n: int = 3) -> list[Path]:
    """A small fixture in the original format: one 288-line file per VM."""
    day = tmp / "day"
    day.mkdir()
    out = []
    for row in planetlab_rows()[:n]:
        q = day / row[0]
        q.write_text("\n".join(row[1:]) + "\n")
        out.append(q)
    return out


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "balancer.cli", *args], capture_output=True,
                          text=True, timeout=300)


# ---------------------------------------------------------------- PlanetLab


def test_planetlab_day_loads_as_files_say() -> None:
    tr = traces.load("planetlab:sample", max_vms=6)
    rows = planetlab_rows()[:6]
    assert tr.names == tuple(r[0] for r in rows)
    assert tr.source == str(PLANETLAB)
    assert tr.steps == 288 and tr.interval_s == 300
    assert tr.vcpus is None and tr.mem_util is None  # no sizes, no memory in PlanetLab
    assert np.allclose(tr.cpu_util[:, 0], np.array([int(x) for x in rows[0][1:]]) / 100.0)


@pytest.mark.parametrize(("day", "vms", "mean"), [("20110303", 1052, 12.31),
                                                  ("20110306", 898, 11.44)])
def test_planetlab_whole_day_matches_readme_statistics(day: str, vms: int, mean: float) -> None:
    tr = traces.load(f"planetlab:{day}")
    assert tr.n_vms == vms
    assert round(100 * float(tr.cpu_util.mean()), 2) == mean  # README statistics
    assert any(" " in n for n in tr.names)  # names with a space load too


def test_original_per_vm_files_load_like_the_packed_day(tmp_path: Path) -> None:
    files = write_planetlab_dir(tmp_path, n=5)
    a = traces.load(f"planetlab:{tmp_path / 'day'}")
    b = traces.load("planetlab:sample", max_vms=5)
    assert a.names == b.names == tuple(f.name for f in files)
    assert np.array_equal(a.cpu_util, b.cpu_util)


def test_bundled_samples_are_listed_and_unknown_names_say_so() -> None:
    have = traces.bundled()
    assert set(have) == {"planetlab:sample", "planetlab:20110303", "planetlab:20110306",
                         "bitbrains:sample", "alibaba:sample"}
    assert all(p.exists() for p in have.values())
    with pytest.raises(TraceError, match=r"bundled planetlab samples: sample, 20110303"):
        traces.load("planetlab:20110304")


def test_packed_planetlab_bad_value_names_file_line_and_vm(tmp_path: Path) -> None:
    rows = planetlab_rows()[:3]
    rows[1][42] = "12x"
    f = tmp_path / "day.csv"
    with open(f, "w", newline="") as fh:
        csv.writer(fh).writerows([["vm", *(f"t{k}" for k in range(288))], *rows])
    with pytest.raises(TraceError) as exc:
        traces.load(f"planetlab:{f}")
    assert f"{f}:3: VM {rows[1][0]!r}" in str(exc.value) and "12x" in str(exc.value)
    tr = traces.load(f"planetlab:{f}", skip_bad=True)
    assert tr.skipped == 1 and tr.cpu_util[41, 1] == tr.cpu_util[40, 1]


def test_planetlab_bad_line_names_file_and_line(tmp_path: Path) -> None:
    files = write_planetlab_dir(tmp_path)
    lines = files[1].read_text().splitlines()
    lines[41] = "12x"
    files[1].write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError) as exc:
        traces.load(f"planetlab:{tmp_path / 'day'}")
    assert f"{files[1]}:42:" in str(exc.value) and "12x" in str(exc.value)


def test_planetlab_skip_bad_counts_and_carries_forward(tmp_path: Path) -> None:
    files = write_planetlab_dir(tmp_path)
    lines = files[1].read_text().splitlines()
    lines[41] = "150"  # out of range
    files[1].write_text("\n".join(lines) + "\n")
    tr = traces.load(f"planetlab:{tmp_path / 'day'}", skip_bad=True)
    assert tr.skipped == 1
    assert tr.cpu_util[41, 1] == tr.cpu_util[40, 1] == int(lines[40]) / 100.0


# ---------------------------------------------------------------- Bitbrains


def test_bitbrains_sizes_absent_rows_and_grid() -> None:
    tr = traces.load_bitbrains(BITBRAINS / "188.csv.gz")
    assert tr.names == ("188",) and tr.interval_s == 300
    rows = [r.split(";") for r in gzip.open(BITBRAINS / "188.csv.gz", "rt").read()
            .splitlines()[1:]]
    cores = max(float(r[1]) for r in rows)
    assert tr.vcpus[0] == cores
    assert tr.mem_mb[0] == math.ceil(max(float(r[5]) for r in rows) / 1024)
    # the rows with 0 cores are absent (NaN), not zero demand and not an error
    absent = sum(1 for r in rows if float(r[1]) == 0)
    assert absent == 2 and np.isnan(tr.cpu_util[:, 0]).sum() >= absent
    t0 = float(rows[0][0])
    assert tr.start_s == t0
    k = 5
    want = float(rows[k][3]) / float(rows[k][2])
    slot = round((float(rows[k][0]) - t0) / 300)
    assert tr.cpu_util[slot, 0] == pytest.approx(want, rel=1e-6)


def test_bitbrains_duplicate_timestamps_are_averaged() -> None:
    tr = traces.load_bitbrains(BITBRAINS / "20.csv.gz")
    rows = [r.split(";") for r in gzip.open(BITBRAINS / "20.csv.gz", "rt").read()
            .splitlines()[1:]]
    assert len(rows) > 16000  # README: duplicates inflate this file
    assert tr.steps < 9000  # one slot per 300 s over about 30 days
    seen: dict[float, int] = {}
    by_slot: dict[int, list[float]] = {}
    for r in rows:
        t = float(r[0])
        seen[t] = seen.get(t, 0) + 1
        if float(r[1]) > 0:
            by_slot.setdefault(round((t - tr.start_s) / 300), []).append(float(r[3]) / float(r[2]))
    dups = [t for t, c in seen.items() if c > 1]
    assert len(dups) > 1000
    for t in dups[:200]:
        slot = round((t - tr.start_s) / 300)
        if slot in by_slot:
            assert tr.cpu_util[slot, 0] == pytest.approx(float(np.mean(by_slot[slot])), rel=1e-6)
        else:  # every row of the slot says "VM absent"
            assert np.isnan(tr.cpu_util[slot, 0])


def test_bitbrains_directory_in_numeric_order_and_bad_row(tmp_path: Path) -> None:
    d = tmp_path / "bb"
    d.mkdir()
    for n in ("2", "10", "1"):
        shutil.copyfile(BITBRAINS / "188.csv.gz", d / f"{n}.csv.gz")
    tr = traces.load(f"bitbrains:{d}")
    assert tr.names == ("1", "2", "10")
    text = gzip.open(BITBRAINS / "188.csv.gz", "rt").read().splitlines()
    text[7] = text[7].replace(";", ";oops", 1)
    (d / "2.csv").write_text("\n".join(text) + "\n")
    (d / "2.csv.gz").unlink()
    with pytest.raises(TraceError, match=r"2\.csv:8: "):
        traces.load(f"bitbrains:{d}")
    assert traces.load(f"bitbrains:{d}", skip_bad=True).skipped == 1


# ---------------------------------------------------------------- Alibaba


def test_alibaba_machines_resampled_to_300s() -> None:
    tr = traces.load("alibaba:sample")
    assert tr.names == ("m_1932", "m_1937")
    assert tr.interval_s == 300 and list(tr.vcpus) == [96.0] * 2
    assert tr.steps == pytest.approx(691_030 / 300, abs=2)
    assert traces.load(f"alibaba:{ALIBABA}").names == tr.names  # the folder works too
    df = pd.read_csv(ALIBABA_USAGE, header=None)
    m = df[df[0] == "m_1937"]
    t0 = df[1].min()
    slots = (m[1] - t0) // 300
    slot = int(sorted(set(slots))[200])
    in_slot = m[slots == slot]
    assert len(in_slot) > 1  # several ~60 s samples per 300 s slot
    assert tr.cpu_util[slot, 1] == pytest.approx(in_slot[2].mean() / 100.0)
    # m_1932 starts late: absent (NaN) before its first sample
    assert np.isnan(tr.cpu_util[0, 0]) and not np.isnan(tr.cpu_util[-1, 0])


def test_alibaba_bad_row(tmp_path: Path) -> None:
    src = gzip.open(ALIBABA_USAGE, "rt").read().splitlines()
    bad = src[:20]
    bad[9] = "m_1932,386920,abc,92,,,43.05,33.08,5"
    f = tmp_path / "machine_usage.csv"
    f.write_text("\n".join(bad) + "\n")
    with pytest.raises(TraceError, match=r"machine_usage\.csv:10: field 'cpu_util_percent'"):
        traces.load(f"alibaba:{f}")
    assert traces.load(f"alibaba:{f}", skip_bad=True).skipped == 1


# ---------------------------------------------------------------- long format


def _long_frame() -> pd.DataFrame:
    rows = []
    for t in range(4):
        rows.append({"timestamp": 1000 + 60 * t, "vm": "web", "cpu": 0.5 * t, "mem": 1000 + t})
        rows.append({"timestamp": 1000 + 60 * t, "vm": "db", "cpu": 2.0, "mem": 3000})
    return pd.DataFrame(rows)


def test_long_csv_and_parquet_agree(tmp_path: Path) -> None:
    df = _long_frame()
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet")
    a = traces.load(f"csv:{tmp_path / 't.csv'}")
    b = traces.load(f"parquet:{tmp_path / 't.parquet'}")
    for tr in (a, b):
        assert tr.names == ("db", "web") and tr.interval_s == 60 and tr.steps == 4
        assert list(tr.vcpus) == [2.0, 2.0]  # peak use rounded up to whole cores
        assert list(tr.mem_mb) == [3072.0, 1024.0]  # peak rounded up to whole GiB
        assert np.allclose(tr.cpu_util[:, 1], [0.0, 0.25, 0.5, 0.75])
    assert np.array_equal(a.cpu_util, b.cpu_util)


def test_long_csv_bad_row_names_line(tmp_path: Path) -> None:
    f = tmp_path / "t.csv"
    _long_frame().to_csv(f, index=False)
    lines = f.read_text().splitlines()
    lines[4] = lines[4].replace(",2.0,", ",two,")
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=r"t\.csv: line 5: field 'cpu' must be a number"):
        traces.load(f"csv:{f}")
    tr = traces.load(f"csv:{f}", skip_bad=True)
    assert tr.skipped == 1


def test_long_missing_column(tmp_path: Path) -> None:
    f = tmp_path / "t.csv"
    _long_frame().drop(columns=["mem"]).to_csv(f, index=False)
    with pytest.raises(TraceError, match="missing column"):
        traces.load(f"csv:{f}")


def test_cli_trace_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    r = cli("replay", "--trace", "nosuch:/x")
    assert r.returncode == 2 and "kind 'nosuch' is unknown" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("replay", "--trace", f"planetlab:{tmp_path / 'missing'}")
    assert r.returncode == 2 and "no such file" in r.stderr
    assert "Traceback" not in r.stderr
    f = tmp_path / "t.csv"
    f.write_text("timestamp,vm,cpu,mem\n0,a,1,100\n300,a,x,100\n")
    r = cli("replay", "--trace", f"csv:{f}", "--no-progress")
    assert r.returncode == 2 and "line 3" in r.stderr and "field 'cpu'" in r.stderr
    r = cli("replay", "--trace", f"csv:{f}", "--skip-bad-rows", "--policy", "none",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "skipped 1 malformed trace rows" in r.stdout


def test_variants_keep_each_vm_and_the_day_total() -> None:
    from simulator import variants

    tr = traces.load("planetlab:sample", max_vms=40)
    s = variants.make(tr, "shift", 1)
    assert s.cpu_util.shape == tr.cpu_util.shape and s.names == tr.names
    # each VM keeps its own values, rotated in time
    assert all(sorted(s.cpu_util[:, j]) == sorted(tr.cpu_util[:, j]) for j in range(40))
    assert not np.array_equal(s.cpu_util, tr.cpu_util)
    assert np.array_equal(variants.make(tr, "shift", 1).cpu_util, s.cpu_util)  # seeded
    b = variants.make(tr, "bootstrap", 2)
    assert b.n_vms == 40 and len(set(b.names)) == 40
    src = [n.split("#")[0] for n in b.names]
    assert set(src) <= set(tr.names) and len(set(src)) < 40  # drawn with replacement
    c = variants.make(tr, "scale", 1, factor=1.5)
    assert np.allclose(c.cpu_util, np.clip(tr.cpu_util * 1.5, 0, 1))
    with pytest.raises(InputError, match="kind .x. is unknown"):
        variants.make(tr, "x")


def test_window_cuts_one_day_of_a_month() -> None:
    tr = traces.load("bitbrains:sample", max_vms=3)
    day = tr.window(288, 288)
    assert day.steps == 288 and np.array_equal(day.cpu_util, tr.cpu_util[288:576],
                                               equal_nan=True)
    assert day.start_s == tr.start_s + 288 * 300 and list(day.vcpus) == list(tr.vcpus)
