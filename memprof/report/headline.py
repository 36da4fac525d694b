"""The report's first lines: the peak, where it happened, and one sentence on what to do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memprof.profile import OUTSIDE_MODULES, Profile
from memprof.report import advice as advice_view
from memprof.report.style import CATEGORY_LABELS, module_label
from memprof.units import format_bytes

#: The usual first move when a category dominates the peak (said without a number: only the
#: advisor predicts how much it saves).
_USUAL_FIX: dict[str, str] = {
    "activation": "activation checkpointing of the largest blocks, mixed precision or a smaller "
                  "batch shrink them",
    "optimizer_state": "an optimizer with less state (SGD with momentum, 8-bit AdamW) or "
                       "sharding it over GPUs shrinks it",
    "parameter": "bf16 weights, quantization of frozen layers or sharding shrink them",
    "gradient": "bf16 gradients, freezing layers or sharding shrink them",
    "temporary": "they are scratch of the busiest op; fused or in-place kernels, a smaller "
                 "batch or foreach=False in the optimizer lower them",
    "input": "a smaller batch or sequence lowers them",
    "buffer": "they are registered buffers (running statistics, masks, caches)",
    "other": "it outlived its step: look for tensors kept across steps",
}


@dataclass(frozen=True)
class Headline:
    """What the top of the report says. ``peak_bytes`` is None when no step was profiled."""

    peak_bytes: int | None
    peak_text: str
    device: str
    where: str
    sentence: str
    dominant: str | None
    dominant_pct: float | None
    fix_source: str  # "advice", "profile" or "none"


def build(profile: Profile, advice: dict[str, Any] | None) -> Headline:
    """The headline of ``profile``, using the advisor's best row when there is advice."""
    device = profile.device.name
    if profile.peak_info is None:
        return Headline(None, "no step profiled", device,
                        "no step was profiled (was the schedule ever active?)",
                        "Nothing to show: run at least one step inside the profiler.",
                        None, None, "none")
    peak = profile.peak_info
    total = peak.total_bytes
    where = f"step {peak.step}, {peak.phase}"
    if peak.module and peak.module != OUTSIDE_MODULES:
        where += f", in module {module_label(peak.module)!r}"
    elif peak.module == OUTSIDE_MODULES:
        where += ", outside any module"
    shares = {c: v for c, v in peak.by_category.items() if v > 0}
    if not shares or total <= 0:
        return Headline(total, format_bytes(total), device, where,
                        "The peak held no tracked memory.", None, None, "none")
    dominant = max(shares, key=lambda c: shares[c])
    pct = 100.0 * shares[dominant] / total
    label = CATEGORY_LABELS[dominant]
    verb = "is" if dominant in ("optimizer_state", "other") else "are"
    opening = f"{label[0].upper()}{label[1:]} {verb} {pct:.0f}% of the peak"
    row = advice_view.best(advice)
    if row is not None:
        found = advice_view.saving(row)
        assert found is not None  # best() only returns rows with a saving
        amount, how = found
        verb_saves = "saved" if how == "measured" else "saves about"
        sentence = (f"{opening}; {advice_view.describe(row)} {verb_saves} "
                    f"{format_bytes(amount)} ({how}).")
        source = "advice"
    else:
        holder = _largest_holder(peak.by_module, dominant)
        held = f" (most in {holder})" if holder else ""
        sentence = (f"{opening}{held}; {_USUAL_FIX[dominant]}. "
                    "Run memprof advise for predicted and measured savings.")
        source = "profile"
    return Headline(total, format_bytes(total), device, where, sentence, dominant, pct, source)


def _largest_holder(by_module: dict[str, dict[str, int]], category: str) -> str | None:
    best = max(by_module.items(), key=lambda kv: kv[1].get(category, 0), default=None)
    if best is None or best[1].get(category, 0) <= 0:
        return None
    return f"{module_label(best[0])!r}, {format_bytes(best[1][category])}"
