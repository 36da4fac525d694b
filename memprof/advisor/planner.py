"""The budget planner: the cheapest combination of changes whose predicted peak fits.

Changes of one ``group`` are alternatives (one precision, one optimizer, ...). Every
combination of at most one change per group is scored by predicted peak (the rewrites applied
in turn to the profile's timeline); among those that fit, the one with the least cost wins,
cost = 3 x quality cost + speed cost (priors per change: lossless and free changes first, then
precision, then those that alter training or the model). Sharding (it needs more GPUs) is only
considered when nothing else fits.
"""

from __future__ import annotations

import itertools
from typing import Any

from memprof.advisor import cost as cost_tiers
from memprof.advisor.core import Change, Facts, predict_peak


def describe(change: Change) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in change.options.items() if k != "modules")
    return f"{change.technique} ({opts})" if opts else change.technique


def cost(combo: tuple[Change, ...]) -> float:
    return sum(3 * c.quality_cost + c.speed_cost for c in combo)


def plan(
    facts: Facts, changes: list[Change], usable: int
) -> tuple[tuple[Change, ...] | None, int, int]:
    """(best combination or None, its predicted peak, number of combinations tried).

    Tiers of training cost are tried in order (see :mod:`memprof.advisor.cost`): the first
    tier whose changes (with those of the tiers before) reach the budget gives the plan."""
    tried = 0
    # Sharding needs more GPUs: every tier is tried without it first.
    for allow_sharding in (False, True):
        for level in range(len(cost_tiers.TIERS)):
            allowed = [c for c in changes
                       if cost_tiers.rank(cost_tiers.cost_of(c.technique, c.options)) <= level]
            combo, peak, n = _plan_within(facts, allowed, usable, allow_sharding)
            tried += n
            if combo is not None:
                return combo, peak, tried
    return None, 0, tried


def _plan_within(
    facts: Facts, changes: list[Change], usable: int, allow_sharding: bool
) -> tuple[tuple[Change, ...] | None, int, int]:
    candidates = [
        c
        for c in changes
        if c.applicable
        and c.transform is not None
        and c.predicted_peak is not None
        and c.predicted_peak < facts.peak_bytes
    ]
    tried = 0
    for sharding in sorted({False, allow_sharding}):
        groups: dict[str, list[Change]] = {}
        for c in candidates:
            if c.group == "sharding" and not sharding:
                continue
            groups.setdefault(c.group, []).append(c)
        options = [[None, *g] for g in groups.values()]
        best: tuple[float, tuple[Change, ...], int] | None = None
        for pick in itertools.product(*options):
            combo = tuple(c for c in pick if c is not None)
            tried += 1
            peak = predict_peak(facts, [c.transform for c in combo if c.transform is not None])
            if peak <= usable:
                key = cost(combo)
                if best is None or key < best[0] or (key == best[0] and peak < best[2]):
                    best = (key, combo, peak)
        if best is not None:
            return best[1], best[2], tried
    return None, 0, tried


def explain(combo: tuple[Change, ...], peak: int, usable: int, baseline: int) -> str:
    from memprof.units import format_bytes

    if not combo:
        return (
            f"fits as is: step peak {format_bytes(baseline)} within {format_bytes(usable)} usable"
        )
    names = " + ".join(describe(c) for c in combo)
    return (
        f"{names}: predicted peak {format_bytes(peak)} (from {format_bytes(baseline)}) "
        f"within {format_bytes(usable)} usable; chosen as the least quality/speed cost "
        "among the combinations that fit"
    )


def to_row(change: Change) -> dict[str, Any]:
    return {"technique": change.technique, "options": dict(change.options)}
