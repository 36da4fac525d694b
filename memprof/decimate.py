"""Keeping a timeline small without losing its shape: shared by the tracking, the report's figures
and the snapshot import, below all three."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def decimate(samples: Sequence[T], limit: int, *, key: Callable[[T], float]) -> list[T]:
    """At most ``limit`` samples, in order, keeping the first, the last, and each bucket's
    lowest and highest ``key`` (so peaks and troughs survive; the global peak always does).
    """
    if limit < 4:
        raise ValueError("a timeline needs at least 4 points per step")
    if len(samples) <= limit:
        return list(samples)
    inner = samples[1:-1]
    buckets = (limit - 2) // 2
    size = len(inner) / buckets
    keys = [key(sample) for sample in inner]  # once each (it runs at every profiled step)
    by_index = keys.__getitem__
    kept = [samples[0]]
    for b in range(buckets):
        start, stop = int(b * size), int((b + 1) * size)
        if start >= stop:
            continue
        low = min(range(start, stop), key=by_index)
        high = max(range(start, stop), key=by_index)
        for i in sorted({low, high}):
            kept.append(inner[i])
    kept.append(samples[-1])
    return kept
