"""Batch size and gradient accumulation, from two measured batch sizes.

The fit is per phase: for each of forward, backward and optimizer the largest live total is
measured at the workload's batch ``b`` and at ``b/2``, and a line ``c + k * batch`` is drawn
through the two points (an intercept for what does not grow: weights, states; a slope for
activations and inputs). Nothing is assumed proportional. The predicted step peak at another
batch is the largest phase prediction; the largest batch that fits is where it crosses the
budget. Gradient accumulation over ``n`` micro-batches costs the peak of one micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memprof.profile import Profile

PHASES = ("forward", "backward", "optimizer", "other")


def batch_size(batch: Any) -> int | None:
    """The leading dimension shared by the batch's tensors."""
    for t in _tensors(batch):
        if t.dim() > 0:
            return int(t.shape[0])
    return None


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, tuple | list):
        return [t for v in batch for t in _tensors(v)]
    return []


def resize(batch: Any, size: int, original: int) -> Any:
    """``batch`` cut or tiled along dim 0 to ``size`` rows."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0 or batch.shape[0] != original:
            return batch
        reps = -(-size // original)
        tiled = batch.repeat(reps, *([1] * (batch.dim() - 1))) if reps > 1 else batch
        return tiled[:size].clone()
    if isinstance(batch, dict):
        return {k: resize(v, size, original) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(resize(v, size, original) for v in batch)
    return batch


def phase_peaks(profile: Profile) -> dict[str, int]:
    frame = profile.timeline()
    out = {p: 0 for p in PHASES}
    for phase, total in zip(frame["phase"], frame["total"], strict=True):
        if phase in out:
            out[phase] = max(out[phase], int(total))
    for m in profile.modules_stats:  # transients inside modules (between timeline samples)
        out["forward"] = max(out["forward"], int(m.peak_forward))
        out["backward"] = max(out["backward"], int(m.peak_backward))
    peak = profile.peak()
    out[peak.phase] = max(out.get(peak.phase, 0), int(peak.total_bytes))
    return out


@dataclass(frozen=True)
class BatchFit:
    """Per-phase lines ``intercept + slope * batch`` through two measured batch sizes."""

    sizes: tuple[int, int]
    lines: dict[str, tuple[float, float]]  # phase -> (intercept, slope)

    @classmethod
    def from_profiles(cls, small: tuple[int, Profile], large: tuple[int, Profile]) -> BatchFit:
        (b1, p1), (b2, p2) = small, large
        a, b = phase_peaks(p1), phase_peaks(p2)
        lines = {}
        for phase in PHASES:
            if a[phase] == 0 and b[phase] == 0:
                continue
            slope = (b[phase] - a[phase]) / (b2 - b1)
            lines[phase] = (a[phase] - slope * b1, slope)
        return cls((b1, b2), lines)

    def peak(self, batch: int) -> int:
        return int(max(c + k * batch for c, k in self.lines.values()))

    def largest_fitting(self, budget: int, *, limit: int = 1 << 20) -> int:
        """The largest batch whose predicted peak fits ``budget`` (0 if even 1 does not)."""
        if self.peak(1) > budget:
            return 0
        lo, hi = 1, 2
        while hi < limit and self.peak(hi) <= budget:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.peak(mid) <= budget else (lo, mid)
        return lo

    def to_dict(self) -> dict[str, Any]:
        return {
            "sizes": list(self.sizes),
            "per_sample_bytes": {p: round(k) for p, (c, k) in self.lines.items()},
            "fixed_bytes": {p: round(c) for p, (c, k) in self.lines.items()},
        }
