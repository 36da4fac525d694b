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
    kept = [samples[0]]
    for b in range(buckets):
        chunk = inner[int(b * size): int((b + 1) * size)]
        if not chunk:
            continue
        low = min(range(len(chunk)), key=lambda i: key(chunk[i]))
        high = max(range(len(chunk)), key=lambda i: key(chunk[i]))
        for i in sorted({low, high}):
            kept.append(chunk[i])
    kept.append(samples[-1])
    return kept
