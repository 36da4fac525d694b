"""The budget planner: the cheapest combination of changes whose predicted peak fits.

Changes of one ``group`` are alternatives (one precision, one optimizer, ...). Every
combination of at most one change per group is scored by predicted peak (the rewrites applied
in turn to the profile's timeline); among those that fit, the one with the least cost wins,
cost = 3 x quality cost + speed cost (priors per change: lossless and free changes first, then
precision, then those that alter training or the model). Sharding (it needs more GPUs) is only
considered when nothing else fits.

The predicted peak of a combination is analytic (the rewrites composed);
:func:`memprof.advisor.budget_plan.plan_for` runs the preferred combinations as a whole on fake
tensors when the model is at hand and keeps the first whose run fits (:func:`candidates` gives
them in order).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from memprof import cost_tiers
from memprof.advisor.core import Change, Facts, predict_peak


def describe(change: Change) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in change.options.items() if k != "modules")
    return f"{change.technique} ({opts})" if opts else change.technique


def describe_row(row: dict[str, Any]) -> str:
    """:func:`describe` of a plan row (:func:`to_row`)."""
    opts = ", ".join(f"{k}={v}" for k, v in row["options"].items() if k != "modules")
    return f"{row['technique']} ({opts})" if opts else str(row["technique"])


def cost(combo: tuple[Change, ...]) -> float:
    return sum(3 * c.quality_cost + c.speed_cost for c in combo)


def plan(
    facts: Facts, changes: list[Change], usable: int
) -> tuple[tuple[Change, ...] | None, int, int]:
    """(best combination or None, its predicted peak, number of combinations tried): the first
    of :func:`candidates`, unchecked (:func:`memprof.advisor.budget_plan.plan_for` runs them)."""
    counter = [0]
    for combo, peak in candidates(facts, changes, usable, tried=counter):
        return combo, peak, counter[0]
    return None, 0, counter[0]


def candidates(
    facts: Facts, changes: list[Change], usable: int, *, tried: list[int] | None = None
) -> Iterator[tuple[tuple[Change, ...], int]]:
    """Combinations predicted to fit ``usable``, in the order the planner prefers them, each
    once, with their predicted peak.

    A combination's peak is predicted by composing its changes' rewrites of the timeline
    (analytic), corrected by each change's own error: its row's prediction (a fake run when the
    model was at hand) less what its rewrite alone predicts. A single change is so predicted
    exactly as its row; a combination is a candidate when the composed or the corrected figure
    fits (:func:`memprof.advisor.budget_plan.plan_for` runs it to find out which is right), and
    within a tier those whose corrected figure fits come first.

    Tiers of training cost are taken in order (see :mod:`memprof.cost_tiers`), each with the
    changes of the tiers before; within a tier the least quality/speed cost comes first, then
    the lower peak (after the rule above). Changes that need more GPUs (group ``sharding``)
    come only after every tier without them. The rows are generic: any technique's changes
    take part through their ``group``, cost tier and ``transform``. ``tried`` (a one-item
    list) counts the combinations scored."""
    seen: set[tuple[int, ...]] = set()
    usable_changes = [
        c for c in changes
        if c.applicable and c.transform is not None and c.predicted_peak is not None
        and c.predicted_peak < facts.peak_bytes
    ]
    offsets = {id(c): int(c.predicted_peak or 0) - predict_peak(facts, [c.transform])
               for c in usable_changes if c.transform is not None}
    for allow_sharding in (False, True):
        for level in range(len(cost_tiers.TIERS)):
            allowed = [
                c for c in usable_changes
                if cost_tiers.rank(cost_tiers.cost_of(c.technique, c.options)) <= level
                and (allow_sharding or c.group != "sharding")
            ]
            if allow_sharding and not any(c.group == "sharding" for c in allowed):
                continue
            groups: dict[str, list[Change]] = {}
            for c in allowed:
                groups.setdefault(c.group, []).append(c)
            fitting: list[tuple[float, int, tuple[Change, ...]]] = []
            for pick in itertools.product(*([None, *g] for g in groups.values())):
                combo = tuple(c for c in pick if c is not None)
                key = tuple(sorted(id(c) for c in combo))  # the same set, whatever the order
                if key in seen:
                    continue
                seen.add(key)
                if tried is not None:
                    tried[0] += 1
                composed = predict_peak(
                    facts, [c.transform for c in combo if c.transform is not None])
                peak = max(0, composed + sum(offsets[id(c)] for c in combo))
                if min(composed, peak) <= usable:
                    fitting.append((cost(combo), peak, combo))
            # within a tier, those the corrected figure says fit are run first
            fitting.sort(key=lambda f: (f[1] > usable, f[0], f[1], len(f[2])))
            for _, peak, combo in fitting:
                yield combo, peak


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
