"""The advisor's output as the report shows it: whatever shape it has, or its absence.

The advisor saves a JSON-ready dict (``Profile.advice``, or ``Advice.to_dict()``). The report
reads the rows of ``recommendations`` (a list of dicts with the columns of ``Advice.table()``)
and the ``plan``, and says them in words and units: the file's key names never reach a reader.
:func:`recommend` is the one recommendation every output gives (the report's headline and
out-of-memory card, ``memprof run``, ``memprof advise``); :func:`fit` the verdict for a step
that fits its budget as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeGuard

from memprof.units import format_bytes

#: Keys of the advice dict that hold the recommendation rows, in order of preference.
ROW_KEYS = ("recommendations", "rows", "table")


def normalise(advice: Any) -> dict[str, Any] | None:
    """A dict from an ``Advice``, a dict, or None (an empty dict counts as no advice)."""
    if advice is None:
        return None
    if isinstance(advice, dict):
        return advice or None
    to_dict = getattr(advice, "to_dict", None)
    if callable(to_dict):
        result = to_dict()
        return dict(result) if result else None
    if dataclasses.is_dataclass(advice) and not isinstance(advice, type):
        return dataclasses.asdict(advice)
    table = getattr(advice, "table", None)
    if callable(table):
        frame = table()
        return {"recommendations": frame.to_dict(orient="records")}
    raise TypeError(f"cannot show advice of type {type(advice).__name__} in the report")


def rows(advice: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The recommendation rows (dicts), or an empty list."""
    if not advice:
        return []
    for key in ROW_KEYS:
        value = advice.get(key)
        if isinstance(value, list) and all(isinstance(r, dict) for r in value):
            return value
    return []


def is_applicable(row: dict[str, Any]) -> bool:
    value = row.get("applicable", True)
    if isinstance(value, str):
        return value.strip().lower() in ("", "yes", "true")
    return bool(value)


def saving(row: dict[str, Any]) -> tuple[int, str] | None:
    """The row's saving in bytes and whether it was ``measured`` or ``predicted``."""
    base, measured = row.get("baseline_peak_bytes"), row.get("measured_peak_bytes")
    if isinstance(base, int | float) and isinstance(measured, int | float) and (
        _is_number(base) and _is_number(measured)
    ):
        return int(base - measured), "measured"
    predicted = row.get("predicted_saving_bytes")
    if isinstance(predicted, int | float) and _is_number(predicted):
        return int(predicted), "predicted"
    return None


#: A change "saves memory" when it saves at least this fraction of the step's peak: below it
#: the difference is bookkeeping (a few bytes of a scalar, a rounding), not a recommendation.
MATERIAL_FRACTION = 0.01


def saves_memory(row: dict[str, Any]) -> bool:
    """Whether the row's (measured, else predicted) saving is material: over
    :data:`MATERIAL_FRACTION` of its baseline peak."""
    found = saving(row)
    if found is None or found[0] <= 0:
        return False
    base = row.get("baseline_peak_bytes")
    return not (isinstance(base, int | float) and _is_number(base)
                and found[0] < MATERIAL_FRACTION * base)


def best(advice: dict[str, Any] | None) -> dict[str, Any] | None:
    """The applicable row that saves the most (a measured saving beats a predicted one),
    among the changes a single GPU can make (:data:`MORE_HARDWARE` only when there are none),
    from the first tier of training cost (the rows' ``cost``) that reaches the advice's usable
    budget; without a budget, or when no tier reaches it, the first tier with any saving."""
    candidates = [(saving(r), r) for r in rows(advice) if is_applicable(r)]
    scored = [(s[0], r) for s, r in candidates if s is not None and saves_memory(r)]
    if not scored:
        return None
    from memprof import cost_tiers
    one_gpu = [p for p in scored if p[1].get("technique") not in MORE_HARDWARE]
    scored = one_gpu or scored  # more GPUs only when a single one can do nothing
    by_tier = sorted(scored, key=lambda pair: cost_tiers.rank(str(pair[1].get("cost", ""))))
    usable = (advice or {}).get("usable_bytes")
    if isinstance(usable, int):
        for _amount, row in by_tier:
            peak = row.get("measured_peak_bytes") or row.get("predicted_peak_bytes")
            if isinstance(peak, int) and peak <= usable:
                tier = cost_tiers.rank(str(row.get("cost", "")))
                fits = [p for p in by_tier if cost_tiers.rank(str(p[1].get("cost", ""))) == tier]
                return max(fits, key=lambda pair: pair[0])[1]
    first = cost_tiers.rank(str(by_tier[0][1].get("cost", "")))
    same = [p for p in by_tier if cost_tiers.rank(str(p[1].get("cost", ""))) == first]
    return max(same, key=lambda pair: pair[0])[1]


def describe(row: dict[str, Any]) -> str:
    """``checkpointing (blocks=3-10)``: the technique and its options, as plain text."""
    name = str(row.get("technique") or row.get("name") or "this change")
    options = options_text(row.get("options"))
    return f"{name} ({options})" if options else name


def cell(value: Any, key: str) -> str:
    """One value as text: sizes in IEC units, ratios and percentages rounded."""
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float) and (key.endswith("bytes") or key == "budget"):
        return format_bytes(value)
    if isinstance(value, float) and key.endswith("pct"):
        return f"{value:.1f}%"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={cell(v, str(k))}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(cell(v, key) for v in value)
    return str(value)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


# ------------------------------------------------------------------ one recommendation
@dataclass(frozen=True)
class Recommendation:
    """The one change memprof recommends, said the same way in the report's headline, its
    out-of-memory card and ``memprof run``'s output.

    ``change`` names it (``checkpointing (blocks=2 of 4 blocks)``, or a combination joined by
    `` + ``); ``saving_bytes`` is what it takes off the step's peak and ``how`` whether that is
    ``measured`` or ``predicted``; ``source`` says where it came from: ``"plan"`` (the cheapest
    combination that fits the budget, the post-mortem's capacity first), ``"closest"`` (nothing
    fits the budget: the single change with the lowest predicted peak, as the planner says) or
    ``"best row"`` (the most saving row of the cheapest cost tier, when there is no budget).
    """

    change: str
    saving_bytes: int | None
    how: str
    source: str
    peak_bytes: int | None = None
    usable_bytes: int | None = None

    @property
    def text(self) -> str:
        """``checkpointing (blocks=2 of 4 blocks) saves about 106.0 MiB (predicted)``."""
        if self.saving_bytes is None:
            text = self.change
        else:
            verb = "saved" if self.how == "measured" else "saves about"
            text = f"{self.change} {verb} {format_bytes(self.saving_bytes)} ({self.how})"
        if self.peak_bytes is None or not self.usable_bytes:
            return text
        if self.source == "plan":
            text += (f": peak {format_bytes(self.peak_bytes)}, within "
                     f"{format_bytes(self.usable_bytes)} usable")
        elif self.source == "closest":
            text = (f"nothing memprof tries fits {format_bytes(self.usable_bytes)} usable; the "
                    f"closest: {text}, to a peak of {format_bytes(self.peak_bytes)}")
        return text


def recommend(advice: dict[str, Any] | None, oom: Any = None) -> Recommendation | None:
    """The one recommendation for a profile: the plan that fits (the out-of-memory
    post-mortem's plan, for the capacity that failed, before the advice's own plan); when the
    plan says nothing fits, the change that comes closest; without a plan that needs a change,
    the :func:`best` row. None when nothing saves memory."""
    plans = [getattr(oom, "plan", None), (advice or {}).get("plan")]
    for plan in plans:
        if isinstance(plan, dict) and plan.get("fits") is False:
            return _closest(advice, plan)
        if not isinstance(plan, dict) or not plan.get("fits") or not plan.get("changes"):
            continue
        base = plan.get("baseline_peak_bytes")
        measured = plan.get("measured_peak_bytes")
        peak = measured if _is_number(measured) else plan.get("predicted_peak_bytes")
        saved = int(base - peak) if _is_number(base) and _is_number(peak) else None
        return Recommendation(
            change=" + ".join(describe(c) for c in plan["changes"] if isinstance(c, dict)),
            saving_bytes=saved, how="measured" if _is_number(measured) else "predicted",
            source="plan", peak_bytes=int(peak) if _is_number(peak) else None,
            usable_bytes=plan.get("usable_bytes"))
    row = best(advice)
    found = saving(row) if row is not None else None
    if row is None or found is None:
        return None
    return Recommendation(change=describe(row), saving_bytes=found[0], how=found[1],
                          source="best row")


def _closest(advice: dict[str, Any] | None, plan: dict[str, Any]) -> Recommendation | None:
    """When nothing fits the plan's budget: the single change with the lowest predicted peak
    (the planner's own "lowest single prediction"), said as the closest."""
    usable = plan.get("usable_bytes")
    candidates = [r for r in rows(advice)
                  if is_applicable(r) and _is_number(r.get("predicted_peak_bytes"))]
    if not candidates:
        return None
    row = min(candidates, key=lambda r: r["predicted_peak_bytes"])
    found = saving(row)
    return Recommendation(change=describe(row), saving_bytes=found[0] if found else None,
                          how=found[1] if found else "predicted", source="closest",
                          peak_bytes=int(row["predicted_peak_bytes"]),
                          usable_bytes=int(usable) if _is_number(usable) else None)


@dataclass(frozen=True)
class Fit:
    """A profile that fits its budget as it is: how much room is left, and (where the advice
    measured two batch sizes) the largest batch that would still fit."""

    budget: str
    peak_bytes: int
    usable_bytes: int
    largest_batch: int | None

    @property
    def headroom_bytes(self) -> int:
        return self.usable_bytes - self.peak_bytes

    @property
    def text(self) -> str:
        text = (f"It fits {self.budget}: step peak {format_bytes(self.peak_bytes)} of "
                f"{format_bytes(self.usable_bytes)} usable, "
                f"{format_bytes(self.headroom_bytes)} headroom")
        if self.largest_batch:
            text += f"; the largest batch that still fits is about {self.largest_batch}"
        return text + "."


def fit(advice: dict[str, Any] | None) -> Fit | None:
    """The :class:`Fit` when the advice's plan says the step fits with no change, else None."""
    plan = (advice or {}).get("plan")
    if not isinstance(plan, dict) or not plan.get("fits") or plan.get("changes"):
        return None
    peak, usable = plan.get("baseline_peak_bytes"), plan.get("usable_bytes")
    if not (_is_number(peak) and _is_number(usable)):
        return None
    largest = None
    for r in rows(advice):
        options = r.get("options")
        value = options.get("largest_batch_that_fits") if isinstance(options, dict) else None
        if r.get("technique") == "batch" and isinstance(value, int) and is_applicable(r):
            largest = value
    return Fit(budget=budget_name(str(plan.get("budget") or "")), peak_bytes=int(peak),
               usable_bytes=int(usable), largest_batch=largest)


def budget_name(text: str) -> str:
    """``on RTX 4090 (24.0 GiB)`` from the planner's long budget text, or ``in 24.0 GiB``."""
    name = text.split(";")[0].strip()
    if not name:
        return "its budget"
    if "(" in name and not name.endswith(")"):
        name += ")"
    return f"in {name}" if name[:1].isdigit() else f"on {name}"


# ------------------------------------------------------------------ the table a person reads
#: Techniques that need more hardware (GPUs) or move work off it (CPU offload): listed after
#: every change a single GPU can make, whatever they save.
MORE_HARDWARE = frozenset({"sharding"})


def display_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Applicable rows first, and among them those that save memory; of those, what a single
    GPU can do before what needs more hardware; then by cost to the training (cheapest
    first); then by saving (largest first)."""
    if not records:
        return []
    from memprof import cost_tiers

    def key(r: dict[str, Any]) -> tuple[int, int, int, int, float]:
        found = saving(r)
        amount = found[0] if found is not None else float("-inf")
        return (0 if is_applicable(r) else 1,
                0 if saves_memory(r) else 1,
                1 if r.get("technique") in MORE_HARDWARE else 0,
                cost_tiers.rank(str(r.get("cost", ""))),
                -amount)

    return sorted(records, key=key)


def options_text(options: Any) -> str:
    """``blocks=2 of 4 blocks`` (the list of modules is left to the hover: it is long)."""
    if isinstance(options, dict):
        return ", ".join(f"{k}={v}" for k, v in options.items() if k != "modules")
    return "" if options in (None, "", [], {}) else str(options)


def recommendation_table(
    records: list[dict[str, Any]], chosen: Recommendation | None = None
) -> dict[str, Any] | None:
    """The applicable rows as a table with the columns a person would write, sizes in
    units, in :func:`display_order`; ``how`` per row (how it was predicted) goes under the
    row's caveats, and ``chosen`` marks the row of the one recommendation (when it is a single
    row). Not-applicable rows become ``skipped``: one line each, with the reason."""
    ordered = display_order(records)
    usable = [r for r in ordered if is_applicable(r)]
    skipped = sorted({f"{r.get('technique')}: {r.get('reason') or 'not applicable'}"
                      for r in ordered if not is_applicable(r)})
    if not usable:
        return {"columns": [], "rows": [], "skipped": skipped} if skipped else None
    measured = any(_is_number(r.get("measured_peak_bytes")) for r in usable)
    columns = ["change", "peak after (predicted)", "saves"]
    numeric = [False, True, True]
    if measured:
        columns += ["peak after (measured)", "prediction off by", "loss drift", "step time"]
        numeric += [True, True, True, True]
    columns += ["cost to training", "caveats"]
    numeric += [False, False]
    body = []
    for r in usable:
        pct = r.get("saving_pct")
        saved = _size(r.get("predicted_saving_bytes"))
        if _is_number(pct):
            saved += f" ({pct:.0f}%)"
        cells = [f"{r.get('technique')} ({options_text(r.get('options'))})".replace(" ()", ""),
                 _size(r.get("predicted_peak_bytes")), saved]
        if measured:
            drift = (r.get("quality") or {}).get("loss_drift")
            ratio = r.get("step_time_ratio")
            cells += [_size(r.get("measured_peak_bytes")),
                      cell(r.get("error_pct"), "error_pct"),
                      "–" if not _is_number(drift) else f"{100 * drift:.2g}%",
                      "–" if not _is_number(ratio) else f"{ratio:.2f}×"]
        cells += [str(r.get("cost") or "–"), str(r.get("caveats") or "")]
        body.append({"cells": cells, "how": str(r.get("how") or ""),
                     "chosen": chosen is not None and describe(r) == chosen.change})
    return {"columns": columns, "numeric": numeric, "rows": body, "skipped": skipped}


def _size(value: Any) -> str:
    """A size whose number and unit stay on one line (a no-break space between them)."""
    return cell(value, "bytes").replace(" ", "\u00a0")


def plan_view(plan: dict[str, Any] | None) -> dict[str, Any] | None:
    """The budget plan as sentences: the budget, the verdict, and the measurement if any."""
    if not isinstance(plan, dict) or not plan:
        return None
    lines = [f"Budget: {plan.get('budget', '–')}."]
    explanation = str(plan.get("explanation") or "")
    if explanation:
        lines.append(explanation[:1].upper() + explanation[1:] + ".")
    if _is_number(plan.get("measured_peak_bytes")):
        verdict = "fits" if plan.get("measured_fits") else "does not fit"
        lines.append(f"Measured with the changes applied: "
                     f"{format_bytes(plan['measured_peak_bytes'])}, {verdict}.")
    elif plan.get("simulation"):
        lines.append(str(plan["simulation"]) + ".")
    return {"fits": bool(plan.get("fits")), "lines": lines}
