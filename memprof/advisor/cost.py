"""The cost tiers' old address: they live in :mod:`memprof.cost_tiers`, below the advisor and the
report that both rank by them."""

from memprof.cost_tiers import (
    ADAPTERS,
    CHANGES_TRAINING,
    FROZEN,
    MORE_GPUS,
    NO_CHANGE,
    SMALL,
    TIERS,
    cost_of,
    rank,
)

__all__ = [
    "ADAPTERS",
    "CHANGES_TRAINING",
    "FROZEN",
    "MORE_GPUS",
    "NO_CHANGE",
    "SMALL",
    "TIERS",
    "cost_of",
    "rank",
]
