"""One typed path for plan options: Threshold validated once, GiB -> MiB once."""

from __future__ import annotations

import pickle

import pytest

from balancer.errors import InputError
from balancer.service import PlanOptions, Threshold
from policies import build_problem
from policies.budget import BudgetArgs

from conftest import scenario


def test_threshold_is_one_type_validated_once() -> None:
    assert Threshold.parse("4", "--threshold") == 4
    assert isinstance(PlanOptions(threshold=5).threshold, Threshold)
    assert PlanOptions().threshold == Threshold.DEFAULT == 3
    for bad in (0, 6, True, 2.5, "x"):
        with pytest.raises(InputError, match="threshold"):
            PlanOptions(threshold=bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"^\[cluster\] threshold: must be"):
        Threshold.parse(9, "[cluster] threshold")
    assert pickle.loads(pickle.dumps(Threshold(2))) == 2


def test_bad_option_values_fail_at_construction_naming_the_field() -> None:
    with pytest.raises(InputError, match="max_moved_mem_gb"):
        PlanOptions(max_moved_mem_gb=-1)
    with pytest.raises(InputError, match="cpu_headroom"):
        PlanOptions(cpu_headroom=1.5)
    with pytest.raises(InputError, match="solver"):
        PlanOptions(solver="magic")


def test_policies_and_verifier_share_the_budget_in_mib() -> None:
    o = PlanOptions(max_moved_mem_gb=1.5, max_migrations=4, mem_overcommit=1.2)
    problem = build_problem(scenario("hot-cold"), policies=o.policies())
    assert problem.max_moved_mem == o.limits().max_moved_mem_mb == 1536
    assert BudgetArgs(max_moved_mem_gb=0.001).max_moved_mem_mb == 1
    assert problem.max_migrations == o.limits().max_migrations == 4
    assert o.limits().mem_overcommit == 1.2
    # the typed path and the registry path build the same problem
    by_name = build_problem(scenario("hot-cold"), o.policy_config())
    assert by_name.move_cost == problem.move_cost
    assert by_name.mem_limit == problem.mem_limit
