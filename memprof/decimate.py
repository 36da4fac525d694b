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
    keys = list(map(key, inner))  # once each (it runs at every profiled step)
    kept = [samples[0]]
    append = kept.append
    for b in range(buckets):
        start, stop = int(b * size), int((b + 1) * size)
        if start >= stop:
            continue
        window = keys[start:stop]  # each bucket's first lowest and first highest, in order
        low = start + window.index(min(window))
        high = start + window.index(max(window))
        if low < high:
            append(inner[low])
            append(inner[high])
        elif high < low:
            append(inner[high])
            append(inner[low])
        else:
            append(inner[low])
    kept.append(samples[-1])
    return kept
