"""The replay simulator, its policies and ``balancer replay``, on small slices of real traces."""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from balancer.errors import InputError
from simulator import replay_policies, traces
from simulator.cluster import (
    ClusterConfig,
    HostType,
    PowerModel,
    Simulator,
    workload_from_trace,
)
from simulator.consolidate import fits, shed_choice
from simulator.replay import load_experiment, policy_from_spec
from simulator.traces import Trace

ROOT = Path(__file__).resolve().parents[1]
TRACES = traces.DATA  # the bundled samples (simulator/data/traces)
PLANETLAB = "planetlab:sample"
BELOGLAZOV = ROOT / "configs" / "beloglazov-planetlab.toml"

G4 = PowerModel(table_w=(86, 89.4, 92.6, 96, 99.5, 102, 106, 108, 112, 114, 117))


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "balancer.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def synthetic(util: list[list[float]], vcpus: list[float], mem: list[float],
              interval: int = 300) -> Trace:
    a = np.array(util, dtype=float)
    return Trace(kind="csv", source="test", interval_s=interval,
                 names=tuple(f"v{i}" for i in range(a.shape[1])), cpu_util=a,
                 mem_util=None, vcpus=np.array(vcpus, dtype=float),
                 mem_mb=np.array(mem, dtype=float))


def small_cluster(**kw: object) -> ClusterConfig:
    base = dict(host_types=(HostType("g4", 3.72, 4096, G4, 0.0),), hosts=2,
                bandwidth_mbps=1000.0, migration_time="ram-over-half-bandwidth",
                migration_degradation=0.1, migration_cpu_overhead=0.0,
                empty_host_off=True, memory_binding=False, initial_fill=1.0)
    base.update(kw)
    return ClusterConfig(**base)  # type: ignore[arg-type]


class Scripted:
    """A replay policy that does exactly what the test says, at given steps."""

    name = "scripted"

    def __init__(self, script: dict[int, replay_policies.Decision]) -> None:
        self.script = script

    def decide(self, ctx: object) -> replay_policies.Decision:
        return self.script.get(ctx.step, replay_policies.Decision())  # type: ignore[attr-defined]


# ---------------------------------------------------------------- power and migration model


def test_power_table_is_interpolated_linearly() -> None:
    w = G4.watts(np.array([0.0, 0.05, 0.1, 0.55, 1.0, 1.3]))
    assert list(np.round(w, 3)) == [86.0, 87.7, 89.4, 104.0, 117.0, 117.0]
    lin = PowerModel(idle_w=100, peak_w=200)
    assert float(lin.watts(np.array([0.25]))[0]) == 125.0
    with pytest.raises(InputError, match="table_w"):
        PowerModel(table_w=(1, 2, 3))


def test_energy_and_overload_by_hand() -> None:
    # one VM of 3 cores on a 3.72-core G4 host: 50 % -> 1.5 cores = 40.3 %, then 100 % -> 3
    # cores = 80.6 %, then 140 % is impossible for util, so use a second VM to overload.
    tr = synthetic([[0.5, 0.0], [1.0, 0.0], [1.0, 0.5]], [3.0, 2.0], [1000, 1000])
    cfg = small_cluster(hosts=1)
    r = Simulator(workload_from_trace(tr, cfg), cfg, Scripted({})).run("x")
    loads = np.array([1.5, 3.0, 4.0]) / 3.72
    want_kwh = float(G4.watts(loads).sum()) * 300 / 3.6e6
    assert r.summary.energy_kwh == pytest.approx(want_kwh)
    assert r.summary.slatah == pytest.approx(1 / 3)  # last step: 4 cores on 3.72
    assert r.summary.unmet_share == pytest.approx((4.0 - 3.72) / (1.5 + 3.0 + 4.0))
    assert r.summary.migrations == 0 and r.summary.pdm == 0


def test_migration_takes_time_degrades_and_lands() -> None:
    # VM 0 (1740 MB) moves from host 0 to host 1 at step 1: 1740 / 62.5 = 27.84 s of 300 s
    tr = synthetic([[0.4, 0.3]] * 3, [2.0, 2.0], [1740, 870])
    cfg = small_cluster(hosts=2, initial_fill=1.0)
    sim = Simulator(workload_from_trace(tr, cfg), cfg, Scripted(
        {1: replay_policies.Decision(moves=((0, 1),))}))
    assert list(sim.vm_host) == [0, 0]  # first fit packs both on host 0
    assert sim.migration_seconds(0) == pytest.approx(1740 / 62.5)
    r = sim.run("x")
    assert list(sim.vm_host) == [1, 0]
    assert r.summary.migrations == 1
    assert r.summary.moved_gb == pytest.approx(1740 / 1024)
    lost = 0.1 * 800 * (1740 / 62.5) / 300  # degradation x demand x share of the step
    assert r.summary.pdm == pytest.approx(lost / (3 * 1400))
    # during step 1 the target carries the VM's reserved demand; host 1 is active from then
    assert r.log.columns["active_hosts"] == [1.0, 2.0, 2.0]


def test_precopy_model_used_outside_the_beloglazov_rule() -> None:
    tr = synthetic([[0.1]], [1.0], [4096])
    cfg = small_cluster(migration_time="precopy", bandwidth_mbps=10_000.0)
    sim = Simulator(workload_from_trace(tr, cfg), cfg, Scripted({}))
    from balancer.migration_model import estimate
    assert sim.migration_seconds(0) == pytest.approx(estimate(4096, 10_000.0).seconds)


def test_powered_off_host_draws_nothing_and_boots() -> None:
    tr = synthetic([[0.2]] * 4, [1.0], [1000])
    ht = HostType("lin", 4.0, 4096, PowerModel(idle_w=100, peak_w=200), boot_s=300.0)
    cfg = small_cluster(host_types=(ht,), hosts=2, empty_host_off=False)
    script = {0: replay_policies.Decision(standby=(1,)),  # empty: off at the end of step 0
              2: replay_policies.Decision(power_on=(1,))}  # booting through step 2
    r = Simulator(workload_from_trace(tr, cfg), cfg, Scripted(script)).run("x")
    p = r.log.columns["power_w"]
    busy = 100 + 100 * 0.2 / 4.0
    assert p == pytest.approx([busy + 100, busy, busy + 100, busy + 100])
    assert r.log.columns["active_hosts"] == [2.0, 1.0, 1.0, 2.0]  # booting is not active


def test_moves_to_an_off_host_are_refused() -> None:
    tr = synthetic([[0.2]] * 3, [1.0], [1000])
    cfg = small_cluster(hosts=2, empty_host_off=False)
    script = {0: replay_policies.Decision(standby=(1,)),
              1: replay_policies.Decision(moves=((0, 1),))}
    with pytest.raises(ValueError, match="cannot receive"):
        Simulator(workload_from_trace(tr, cfg), cfg, Scripted(script)).run("x")


# ---------------------------------------------------------------- policies on real traces


@pytest.fixture(scope="module")
def planetlab_slice() -> tuple[object, ClusterConfig]:
    exp = load_experiment(BELOGLAZOV)
    cfg = replace(exp["cluster"], hosts=40)
    tr = traces.load(PLANETLAB, max_vms=60).head(steps=16)
    return workload_from_trace(tr, cfg), cfg


def _run(work: object, cfg: ClusterConfig, name: str, **args: object):  # noqa: ANN202
    pol = replay_policies.make(name, dict(args))
    return Simulator(work, cfg, pol, seed=1).run(name)  # type: ignore[arg-type]


def test_vm_types_follow_the_cloudsim_mapping(planetlab_slice: tuple) -> None:
    work, _ = planetlab_slice
    # 60 VMs, 4 types: blocks of 15
    assert list(work.vcpus[[0, 14, 15, 30, 45, 59]]) == [2.5, 2.5, 2.0, 1.0, 0.5, 0.5]
    assert list(work.mem_mb[[0, 15, 30, 45]]) == [870, 1740, 1740, 613]
    raw = int(next(r for r in csv.reader(gzip.open(TRACES / "planetlab" / "20110303.csv.gz", "rt"))
                   if r[0] == work.names[0])[1 + 3])
    assert work.cpu[3, 0] == round(raw / 100 * 2500)  # trace % x the VM's MIPS


def test_policies_side_by_side(planetlab_slice: tuple) -> None:
    work, cfg = planetlab_slice
    none = _run(work, cfg, "none")
    bal = _run(work, cfg, "balance", max_iterations=2)
    greedy = _run(work, cfg, "greedy")
    cons = _run(work, cfg, "consolidate", max_iterations=2)
    assert none.summary.migrations == 0
    # balance spreads the tightly packed start: hottest host cooler, fewer overloads
    assert bal.summary.migrations > 0 and greedy.summary.migrations > 0
    assert bal.log.array("cpu_util_max").mean() < none.log.array("cpu_util_max").mean()
    assert bal.summary.slatah < none.summary.slatah
    assert bal.summary.mean_active_hosts > none.summary.mean_active_hosts
    # consolidate uses fewer hosts (and less energy) than balance, and overloads less than
    # the tightly packed start that none keeps
    assert cons.summary.mean_active_hosts < bal.summary.mean_active_hosts
    assert cons.summary.energy_kwh < bal.summary.energy_kwh
    assert cons.summary.slatah < none.summary.slatah


def test_replays_are_deterministic(planetlab_slice: tuple) -> None:
    work, cfg = planetlab_slice
    a = _run(work, cfg, "consolidate", max_iterations=2).summary.as_dict()
    b = _run(work, cfg, "consolidate", max_iterations=2).summary.as_dict()
    a.pop("seconds")
    b.pop("seconds")
    assert a == b


def test_consolidate_helpers() -> None:
    est = np.array([500.0, 300.0, 900.0, 100.0])
    mem = np.array([2000.0, 600.0, 4000.0, 500.0])
    # 250 to shed: the least memory among VMs that cover it is VM 1
    assert shed_choice([0, 1, 2, 3], est, mem, 250.0) == [1]
    # 1000 to shed: no single VM covers it; most demand per MiB first (VM 1: 0.5/MiB)
    assert shed_choice([0, 1, 2, 3], est, mem, 1000.0)[0] == 1
    assert fits([0, 1], est, {7: 600.0, 8: 300.0})
    assert not fits([0, 2], est, {7: 600.0, 8: 800.0})


def test_policy_args_are_validated_by_field() -> None:
    with pytest.raises(InputError, match="field 'target_util'"):
        replay_policies.make("consolidate", {"target_util": 1.5})
    with pytest.raises(InputError, match="fields 'low_util' < 'target_util'"):
        replay_policies.make("consolidate", {"low_util": 0.9})
    with pytest.raises(InputError, match="field 'bogus' is unknown"):
        replay_policies.make("balance", {"bogus": 1})
    with pytest.raises(InputError, match="replay policy 'nope' is unknown"):
        replay_policies.make("nope")
    assert {"none", "balance", "greedy", "consolidate"} <= set(replay_policies.registered())


def test_every_config_file_loads() -> None:
    for f in sorted((ROOT / "configs").glob("replay-*.toml")):
        name, pol = policy_from_spec(str(f), {})
        assert name == pol.name
    exp = load_experiment(BELOGLAZOV)
    assert exp["cluster"].hosts == 800
    assert [t.cores for t in exp["cluster"].host_types] == [3.72, 5.32]
    for f in sorted((ROOT / "configs").glob("beloglazov-*.toml")):
        load_experiment(f)


def test_bad_config_names_the_field(tmp_path: Path) -> None:
    text = BELOGLAZOV.read_text().replace("bandwidth_mbps = 1000", "bandwidth_mbps = -5")
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(InputError, match="cluster.bandwidth_mbps"):
        load_experiment(f)
    f.write_text(BELOGLAZOV.read_text().replace("[policies.consolidate]",
                                                "[policies.consolidate]\nmax_power_off = -1"))
    r = cli("replay", "--trace", PLANETLAB, "--config", str(f))
    assert r.returncode == 2 and "policies.consolidate" in r.stderr
    assert "'max_power_off'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- the CLI


def test_cli_replay_table_json_and_report(tmp_path: Path) -> None:
    common = ["replay", "--trace", PLANETLAB, "--config", str(BELOGLAZOV),
              "--vms", "50", "--steps", "10", "--hosts", "30", "--no-progress"]
    r = cli(*common, "--policy", "none", "consolidate", "--format", "json", "--report",
            str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [p["policy"] for p in doc["policies"]] == ["none", "consolidate"]
    assert doc["trace"]["vms"] == 50 and doc["trace"]["steps"] == 10
    assert doc["cluster"]["hosts"] == 30
    for p in doc["policies"]:
        assert p["slav"] == pytest.approx(p["slatah"] * p["pdm"], rel=1e-3, abs=1e-12)
    rep = tmp_path / "rep"
    html = (rep / "index.html").read_text()
    for f in ("compare.png", "imbalance.png", "activity.png", "heatmap-consolidate.png",
              "steps-none.csv", "steps-consolidate.csv"):
        assert (rep / f).stat().st_size > 0
        assert f in html
    assert (rep / "compare.png").read_bytes()[:4] == b"\x89PNG"
    with open(rep / "steps-consolidate.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 10
    assert sum(float(x["migrations"]) for x in rows) == doc["policies"][1]["migrations"]
    assert json.loads((rep / "summary.json").read_text())["policies"] == doc["policies"]
    # the same inputs give the same table
    t1 = cli(*common, "--policy", "none", "consolidate")
    t2 = cli(*common, "--policy", "none", "consolidate")
    assert t1.returncode == 0, t1.stderr
    strip = [ln for ln in t1.stdout.splitlines() if not ln.startswith("replay seconds")]
    assert strip == [ln for ln in t2.stdout.splitlines() if not ln.startswith("replay seconds")]
    assert "overloaded host-time (SLATAH)" in t1.stdout and "energy (kWh)" in t1.stdout


def test_cli_progress_goes_to_stderr() -> None:
    r = cli("replay", "--trace", PLANETLAB, "--vms", "10", "--steps", "3",
            "--policy", "none")
    assert r.returncode == 0, r.stderr
    assert "3/3" in r.stderr and "3/3" not in r.stdout


def test_cli_argument_errors() -> None:
    base = ["replay", "--trace", PLANETLAB, "--vms", "5", "--steps", "2"]
    r = cli(*base, "--interval", "7m")
    assert r.returncode == 2 and "not a multiple of the trace step" in r.stderr
    r = cli(*base, "--interval", "soon")
    assert r.returncode == 2 and "--interval" in r.stderr
    r = cli(*base, "--policy", "dpm")
    assert r.returncode == 2 and "replay policy 'dpm' is unknown" in r.stderr
    r = cli(*base, "--hosts", "0")
    assert r.returncode == 2 and "--hosts" in r.stderr
    r = cli(*base, "--config", "/nonexistent.toml")
    assert r.returncode == 2 and "no such file" in r.stderr
    bb = f"bitbrains:{TRACES / 'bitbrains-rnd' / '2013-7'}"
    r = cli("replay", "--trace", bb, "--vms", "60", "--steps", "3", "--hosts", "1",
            "--policy", "none", "--no-progress")
    assert r.returncode == 2 and "1 hosts cannot hold the configured memory" in r.stderr
    assert "Traceback" not in r.stderr
    for res in (r,):
        assert "Traceback" not in res.stderr


def test_demo_replays_the_bundled_day() -> None:
    r = cli("replay", "--demo", "--steps", "6", "--format", "json", "--no-progress")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["trace"]["source"].endswith("planetlab/20110303.csv.gz")
    assert doc["trace"]["vms"] == 1052 and doc["trace"]["steps"] == 6
    assert [p["policy"] for p in doc["policies"]] == ["none", "power"]
    r = cli("replay", "--demo", "--trace", "planetlab:sample")
    assert r.returncode == 2 and "not both" in r.stderr
    r = cli("replay")
    assert r.returncode == 2 and "--trace" in r.stderr and "Traceback" not in r.stderr


def test_other_traces_replay(tmp_path: Path) -> None:
    bb = tmp_path / "bb"
    bb.mkdir()
    for n in (1, 2, 3, 4):
        (bb / f"{n}.csv.gz").write_bytes((TRACES / "bitbrains-rnd" / "2013-7" /
                                          f"{n}.csv.gz").read_bytes())
    r = cli("replay", "--trace", f"bitbrains:{bb}", "--steps", "24", "--hosts", "3",
            "--policy", "none", "balance", "--format", "json", "--no-progress")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["trace"]["vms"] == 4 and doc["cluster"]["hosts"] == 3
    assert all(p["energy_kwh"] > 0 for p in doc["policies"])
    r = cli("replay", "--trace", "alibaba:sample", "--steps", "12",
            "--policy", "none", "--format", "json", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["trace"]["vms"] == 2


def test_consolidate_powers_off_at_night_and_on_before_the_peak() -> None:
    # 12 VMs of 1 core on 6 hosts of 4 cores (linear 100..200 W, boot 300 s = one step).
    # Demand: 10 % for 12 steps, then 70 % for 12 steps.
    low, high = [[0.1] * 12] * 12, [[0.7] * 12] * 12
    tr = synthetic(low + high, [1.0] * 12, [1024] * 12)
    ht = HostType("lin", 4.0, 16384, PowerModel(idle_w=100, peak_w=200), boot_s=300.0)
    cfg = small_cluster(host_types=(ht,), hosts=6, empty_host_off=False, initial_fill=0.05,
                        memory_binding=True)
    work = workload_from_trace(tr, cfg)
    pol = replay_policies.make("consolidate", {"window": 1, "min_on_cycles": 0,
                                               "max_iterations": 2})
    sim = Simulator(work, cfg, pol, seed=0)
    assert len(set(sim.vm_host.tolist())) == 6  # 5 % fill: two VMs per host at the start
    r = sim.run("consolidate")
    active = r.log.columns["active_hosts"]
    # at night it packs the 1.2 cores of demand onto one or two hosts and switches the rest off
    assert min(active[:12]) <= 2 and active[0] == 6
    # by day (8.4 cores) it needs at least 3 hosts at <= 82 %: hosts come back on
    assert max(active[12:]) >= 3
    assert r.summary.migrations > 0 and r.summary.plan_calls > 0
    none = Simulator(work, cfg, replay_policies.make("none")).run("none")
    assert r.summary.energy_kwh < none.summary.energy_kwh
    # nothing is lost: every VM is on a host that is on
    assert all(sim.power[h] == 2 for h in set(sim.vm_host.tolist()))


# ---------------------------------------------------------------- sizing, run_one, reproducibility


def test_default_cluster_is_sized_to_the_trace_peak_and_says_so() -> None:
    from simulator.cluster import DEFAULT_HOST_TYPES
    from simulator.replay import SIZING_UTIL, prepare

    ready = prepare("planetlab:sample")
    work, cfg, sizing = ready["work"], ready["cluster"], ready["sizing"]
    ht = DEFAULT_HOST_TYPES[0]  # PlanetLab VMs are small: the first default type
    peak = float((work.cpu.sum(axis=1) / 1000.0).max())
    want_cpu = int(np.ceil(peak / (SIZING_UTIL * ht.cores)))
    assert sizing.hosts_for_cpu == want_cpu and want_cpu > sizing.hosts_for_mem
    assert cfg.hosts == want_cpu == sizing.hosts and cfg.host_types == (ht,)
    # Bitbrains has a 511.5 GiB VM: the smallest default type that holds it, memory packed
    ready = prepare("bitbrains:sample", steps=288)
    work, cfg, sizing = ready["work"], ready["cluster"], ready["sizing"]
    DEFAULT_HOST_TYPE = DEFAULT_HOST_TYPES[1]
    assert work.mem_mb.max() > ht.mem_mb and cfg.host_types == (DEFAULT_HOST_TYPE,)
    assert cfg.hosts >= max(sizing.hosts_for_cpu, sizing.hosts_for_mem)
    assert sizing.hosts_for_mem * 0.9 * DEFAULT_HOST_TYPE.mem_mb >= work.mem_mb.sum()
    r = cli("replay", "--trace", "bitbrains:sample", "--steps", "24", "--policy", "none",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (f"cluster: {cfg.hosts} hosts of {DEFAULT_HOST_TYPE.name}" in r.stdout
            and "sized to the trace: peak CPU demand" in r.stdout and "at 70 %" in r.stdout)
    r = cli("replay", "--trace", "bitbrains:sample", "--steps", "24", "--policy", "none",
            "--hosts", "40", "--format", "json", "--no-progress")
    doc = json.loads(r.stdout)
    assert doc["cluster"]["hosts"] == 40 and doc["sizing"]["given"] is True


def test_run_one_same_config_and_seed_same_figures() -> None:
    from simulator.replay import run_one

    kw = dict(config=BELOGLAZOV, seed=3, steps=12, vms=150, hosts=40)
    a = run_one(PLANETLAB, "consolidate", {"window": 1}, **kw)
    b = run_one(PLANETLAB, "consolidate", {"window": 1}, **kw)
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    assert a["migrations"] > 0 and a["energy_kwh"] > 0 and a["hosts"] == 40
    assert a["vms"] == 150 and a["steps"] == 12 and a["seed"] == 3
    # the parameters are really used: another window gives another run
    c = run_one(PLANETLAB, "consolidate", {"window": 4}, **kw)
    c.pop("seconds")
    assert c != a
