"""The report's first lines: the peak, where it happened, and one sentence on what to do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memprof.profile import OUTSIDE_MODULES, Profile
from memprof.report import advice_view
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
    recommendation = advice_view.recommend(advice, profile.oom)
    fits = advice_view.fit(advice)
    if recommendation is not None:
        if fits is not None:
            sentence = f"{fits.text} {opening}; to save more, {recommendation.text}."
        else:
            sentence = f"{opening}; {recommendation.text}."
        source = "advice"
    elif fits is not None:
        sentence = f"{fits.text} {opening}."
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


@dataclass(frozen=True)
class OOMCard:
    """The out-of-memory post-mortem as a short card: (label, text) pairs, in reading order,
    and the allocator's own message for whoever wants it."""

    items: list[tuple[str, str]]
    error: str


def oom_card(profile: Profile, recommendation: advice_view.Recommendation | None) -> OOMCard | None:
    """What was asked, where, what was alive, the capacity, and the fix (the same
    recommendation as the headline's)."""
    oom = profile.oom
    if oom is None:
        return None
    asked = format_bytes(oom.requested_bytes) if oom.requested_bytes else "an unknown size"
    where = f"{module_label(oom.module)!r}" if oom.module else "outside any module"
    held = sorted(((v, c) for c, v in oom.by_category.items() if v > 0), reverse=True)
    alive = format_bytes(oom.live_bytes)
    if held:
        alive += ": " + ", ".join(f"{CATEGORY_LABELS.get(c, c)} {format_bytes(v)}"
                                  for v, c in held[:3])
    items = [("asked for", asked), ("where", f"{where}, {oom.phase}, step {oom.step}"),
             ("alive", alive)]
    if oom.capacity_bytes is not None:
        capacity = f"{format_bytes(oom.capacity_bytes)} ({oom.capacity_source})"
        if oom.budget_bytes is not None and oom.budget_bytes != oom.capacity_bytes:
            capacity += f"; {format_bytes(oom.budget_bytes)} of it usable by tensors"
        items.append(("capacity", capacity))
    if recommendation is not None:
        items.append(("fix", recommendation.text))
    elif oom.plan and oom.plan.get("explanation"):
        items.append(("fix", str(oom.plan["explanation"])))
    else:
        items.append(("fix", "run memprof advise on this profile for what would fit"))
    return OOMCard(items=items, error=oom.error)
