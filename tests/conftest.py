"""Shared helpers: compact scenario builders and the named scenario fixtures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from balancer.model import ClusterSnapshot
from balancer.service import PlanOptions, PlanResult, plan
from balancer.snapshot import parse_snapshot
from balancer.verify import verify

SCENARIOS = Path(__file__).parent / "scenarios"


def host(name: str, cpu: float = 16, mem: int = 65536, state: str = "active") -> dict[str, Any]:
    return {"name": name, "cpu_capacity": cpu, "mem_capacity_mb": mem, "state": state}


def vm(name: str, on: str, cpu: float = 1.0, mem: int = 4096, *, vcpus: int = 4,
       memd: int | None = None, automation: str = "fully") -> dict[str, Any]:
    return {"name": name, "host": on, "vcpus": vcpus, "mem_mb": mem, "cpu_demand": cpu,
            "mem_demand_mb": mem // 2 if memd is None else memd, "automation": automation}


def doc(hosts: list[dict], vms: list[dict], rules: list[dict] | None = None) -> dict[str, Any]:
    return {"version": 1, "hosts": hosts, "vms": vms, "rules": rules or []}


def snap(hosts: list[dict], vms: list[dict], rules: list[dict] | None = None) -> ClusterSnapshot:
    return parse_snapshot(doc(hosts, vms, rules))


def scenario(name: str) -> ClusterSnapshot:
    return parse_snapshot(json.loads((SCENARIOS / f"{name}.json").read_text()))


# Deterministic solver settings for tests: stop on iterations, never on wall time.
def det(**kw: Any) -> PlanOptions:
    base: dict[str, Any] = {"time_limit": 120.0, "max_iterations": 40, "seed": 1}
    base.update(kw)
    return PlanOptions(**base)


def checked_plan(s: ClusterSnapshot, opts: PlanOptions) -> PlanResult:
    """Plan and assert the solver-free verifier accepts the answer."""
    result = plan(s, opts)
    assert verify(s, result.placement, opts.limits()) == []
    return result


def where(result: PlanResult) -> dict[str, str]:
    s = result.snapshot
    return {v.name: s.hosts[h].name for v, h in zip(s.vms, result.placement, strict=True)}


@pytest.fixture
def demo_doc() -> dict[str, Any]:
    return json.loads((Path(__file__).parents[1] / "balancer/data/demo-cluster.json").read_text())


@pytest.fixture(autouse=True)
def _private_state_home(tmp_path_factory: pytest.TempPathFactory,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`balancer execute` keeps its journal under $XDG_STATE_HOME by default: never the
    user's own folder in tests."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
