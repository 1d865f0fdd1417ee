"""The verifier must catch every kind of broken promise (or the engine tests prove nothing)."""

from __future__ import annotations

from balancer.verify import Limits, verify

from conftest import host, snap, vm


def _pl(s, **where):  # noqa: ANN001, ANN003
    pl = list(s.placement())
    for name, h in where.items():
        pl[s.vm_index[name]] = s.host_index[h]
    return tuple(pl)


def test_valid_placement_passes() -> None:
    s = snap([host("h1"), host("h2")], [vm("a", "h1"), vm("b", "h1")])
    assert verify(s, _pl(s, b="h2")) == []


def test_catches_memory_overflow_on_receiving_host() -> None:
    s = snap([host("h1", mem=8192), host("h2", mem=8192)],
             [vm("a", "h1", mem=6144), vm("b", "h2", mem=4096)])
    errs = verify(s, _pl(s, b="h1"))
    assert any("host h1" in e and "MiB" in e for e in errs)


def test_overloaded_host_that_receives_nothing_is_fine() -> None:
    s = snap([host("h1", mem=8192), host("h2")], [vm("a", "h1", mem=6144), vm("b", "h1", mem=6144)])
    assert verify(s, s.placement()) == []


def test_catches_cpu_headroom() -> None:
    s = snap([host("h1", cpu=4), host("h2", cpu=4)], [vm("a", "h1", cpu=3.5), vm("b", "h2")])
    assert any("CPU demand" in e for e in verify(s, _pl(s, b="h1"), Limits(cpu_headroom=0.1)))


def test_catches_rules_manual_evacuation_and_budgets() -> None:
    s = snap([host("h1"), host("h2"), host("h3", state="maintenance")],
             [vm("a", "h1"), vm("b", "h2"), vm("c", "h3"), vm("m", "h1", automation="manual")],
             [{"name": "apart", "type": "anti_affinity", "vms": ["a", "b"]},
              {"name": "together", "type": "affinity", "vms": ["b", "m"], "mandatory": False},
              {"name": "lic", "type": "vm_host", "vms": ["a"], "hosts": ["h1"]}])
    errs = verify(s, _pl(s, a="h2", m="h2"), Limits(max_migrations=1, max_moved_mem_mb=100))
    text = "\n".join(errs)
    assert "rule apart" in text
    assert "rule lic" in text
    assert "manual VM moved" in text
    assert "left on h3" in text
    assert "max_migrations" in text and "MiB moved" in text
    assert any("maintenance" in e for e in verify(s, _pl(s, c="h3", a="h3")))


def test_catches_split_affinity_group() -> None:
    s = snap([host("h1"), host("h2")], [vm("a", "h1"), vm("b", "h1")],
             [{"name": "pair", "type": "affinity", "vms": ["a", "b"]}])
    assert any("rule pair" in e for e in verify(s, _pl(s, b="h2")))
