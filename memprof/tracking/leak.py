"""The leak warning: live memory between steps that keeps growing."""

from __future__ import annotations

import itertools

from memprof.units import format_bytes

#: A leak is reported when live memory between steps grew this many steps in a row...
LEAK_MIN_GROWTHS = 3
#: ...by at least this much in all.
LEAK_MIN_BYTES = 1 << 20


class MemoryLeakWarning(UserWarning):
    """Live memory between steps kept growing."""


def leak_warning(end_bytes: list[int]) -> str | None:
    """Warn when end-of-step live bytes (one per step, in order) grew step after step
    (ignoring the first step)."""
    ends = end_bytes[1:]
    if len(ends) < LEAK_MIN_GROWTHS + 1:
        return None
    recent = ends[-(LEAK_MIN_GROWTHS + 1):]
    growths = [b - a for a, b in itertools.pairwise(recent)]
    if all(g > 0 for g in growths) and sum(growths) >= LEAK_MIN_BYTES:
        per_step = format_bytes(sum(growths) / len(growths))
        return (
            f"possible leak: live memory between steps grew {LEAK_MIN_GROWTHS} steps in a row "
            f"(about {per_step} per step); something keeps tensors from earlier steps alive, "
            "such as a loss kept with its graph (use loss.item() or loss.detach())"
        )
    return None
