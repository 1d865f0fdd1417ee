"""Balance: even out CPU and memory demand across active hosts, when the gain pays for the move.

Description
    The balance term is the sum over active hosts and over CPU and memory of the squared
    deviation of the host's demand utilisation from the cluster's (capacity-weighted) mean
    utilisation: ``sum_h w_cpu (u_cpu,h - mean_cpu)^2 + w_mem (u_mem,h - mean_mem)^2``. Per
    dimension it is n times the variance of host utilisation, so lowering it lowers the standard
    deviation DRS reports as "host load standard deviation"; the weights (``weights()``) make a
    unit of CPU std worth as much as a unit of memory std, as in ``cpu_std + mem_std``.
    Each migration costs ``price * (mem_mb + fixed_cost_mb)``:
    memory moved dominates a live migration's cost (pre-copy time grows with it) and the fixed
    part keeps small VMs from being shuffled for nothing. ``price`` follows the DRS-like
    migration threshold:

    ========== ================================= ===========================================
    threshold  price (1e-10 util^2 per MiB)       behaviour
    ========== ================================= ===========================================
    1          (no balancing)                    only mandatory moves: evacuation, rule fixes
    2          30,000                            only moves that fix a gross imbalance
    3          10,000 (default)                  moderate
    4          1,000                             aggressive
    5          100                               most aggressive: balance at nearly any cost
    ========== ================================= ===========================================

    A move is made only if the drop of the balance term it buys exceeds its price: at threshold
    3, moving a 16 GiB VM needs a drop of about 0.0017 in the sum of squared deviations.
    Prices fall as the threshold rises, so an optimal plan at a higher threshold never ends
    with a worse balance (the weighted-sum argument: the lower price can only favour balance).
Requirements
    CPU and memory demand per VM; host capacities.
Limitations
    Demand is a point estimate; the balance term does not model correlation between VMs.
    Follows VMware DRS (load standard deviation, migration threshold, cost-benefit filter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from balancer.errors import InputError
from balancer.model import util_stats
from balancer.model.problem import WEIGHT_ONE
from policies.base import Draft, register

# objective units (1e-10 util^2 at weight 1) per MiB moved
PRICE_PER_MIB = {2: 30_000, 3: 10_000, 4: 1_000, 5: 100}
# threshold 1: the price of moving a VM that nothing forces to move (only to make room)
ROOM_PRICE_PER_MIB = 10**9


class Threshold(int):
    """The DRS-like migration threshold, 1 (mandatory moves only) to 5 (most aggressive).

    The one type for it: the CLI, the service config, the API and replay all build it with
    ``Threshold.parse`` (which names the field on bad input), and ``Threshold.DEFAULT`` is the
    one default. It is an ``int``, so it serialises and compares as one.
    """

    DEFAULT: ClassVar[int] = 3
    VALUES: ClassVar[tuple[int, ...]] = (1, 2, 3, 4, 5)

    def __new__(cls, value: object = 3) -> Threshold:
        if isinstance(value, Threshold):
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value not in cls.VALUES:
            raise InputError(f"threshold: must be an integer from 1 to 5, got {value!r}")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, value: object, field: str = "threshold") -> Threshold:
        """From a config value or command-line text; the error names ``field``."""
        if isinstance(value, str) and value.strip() in {str(v) for v in cls.VALUES}:
            value = int(value.strip())
        try:
            return cls(value)
        except InputError:
            raise InputError(f"{field}: must be an integer from 1 to 5, got {value!r}") from None

    def __reduce__(self) -> tuple[type, tuple[int]]:
        return (Threshold, (int(self),))


@dataclass(frozen=True)
class BalanceArgs:
    threshold: int = Threshold.DEFAULT
    fixed_cost_mb: int = 1024  # every migration costs as if it moved this much more memory
    weighting: str = "std"  # "std": weigh each dimension by 1 / its starting spread; "equal"

    def __post_init__(self) -> None:
        if self.weighting not in ("std", "equal"):
            raise InputError(f"weighting: must be 'std' or 'equal', got {self.weighting!r}")
        object.__setattr__(self, "threshold", Threshold(self.threshold))
        if self.fixed_cost_mb < 0:
            raise InputError(f"fixed_cost_mb: must be >= 0, got {self.fixed_cost_mb}")


@register
class Balance:
    name: ClassVar[str] = "balance"
    Args = BalanceArgs

    def __init__(self, args: BalanceArgs | None = None) -> None:
        self.args = args or BalanceArgs()

    def apply(self, draft: Draft) -> None:
        a = self.args
        if a.threshold == 1:
            # Mandatory moves only (they still go where they help balance most, and cost
            # enough that no more are made than the rules require). Any other VM may move only
            # to make room for them: its move costs more than any balance gain.
            draft.only_mandatory = True
            must = self.must_move(draft)
            for v, vm in enumerate(draft.snapshot.vms):
                price = PRICE_PER_MIB[2] * 10 if v in must else ROOM_PRICE_PER_MIB
                draft.move_cost[v] = WEIGHT_ONE * price * (vm.mem + a.fixed_cost_mb)
        else:
            price = PRICE_PER_MIB[a.threshold]
            for v, vm in enumerate(draft.snapshot.vms):
                draft.move_cost[v] = WEIGHT_ONE * price * (vm.mem + a.fixed_cost_mb)
        draft.balance_weights = self.weights(draft)

    @staticmethod
    def must_move(draft: Draft) -> set[int]:
        """VMs a mandatory move may concern: evacuation, broken rules, split affinity groups."""
        must = set(draft.mandatory_reason)
        start = draft.snapshot.placement()
        for _rule, vms, weight in draft.together:
            if weight is None and len({start[v] for v in vms}) > 1:
                must.update(vms)
        return must

    def weights(self, draft: Draft) -> tuple[int, int]:
        """Per-dimension weights so that a unit of std is worth the same in CPU and memory.

        The plan is judged by ``cpu_std + mem_std``. Near the start placement,
        ``d(std_d) = d(sum of squares_d) / (2 n std_d)``, so weighing each dimension's squared
        deviations by ``mean_std / std_d`` makes the objective's first-order trade between the
        two dimensions match that sum. Weights are clamped to [1/4, 4].
        """
        if self.args.weighting == "equal":
            return WEIGHT_ONE, WEIGHT_ONE
        snap = draft.snapshot
        st = util_stats(snap, snap.placement())
        mean = (st.cpu_std + st.mem_std) / 2
        if mean <= 0:
            return WEIGHT_ONE, WEIGHT_ONE

        def w(std: float) -> int:
            ratio = mean / std if std > 0 else 4.0
            return round(WEIGHT_ONE * min(4.0, max(0.25, ratio)))

        return w(st.cpu_std), w(st.mem_std)
