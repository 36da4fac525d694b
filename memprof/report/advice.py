"""The advisor's output as the report shows it: whatever shape it has, or its absence.

The advisor saves a JSON-ready dict (``Profile.advice``, or ``Advice.to_dict()``). The report
reads the rows of ``recommendations`` (a list of dicts with the columns of ``Advice.table()``)
and a ``plan``, and shows every other key as it is, so new fields appear without a change here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from memprof.units import format_bytes

#: Keys of the advice dict that hold the recommendation rows, in order of preference.
ROW_KEYS = ("recommendations", "rows", "table")
PLAN_KEYS = ("plan", "budget_plan")
#: Columns shown first in the recommendations table (any others follow).
LEADING_COLUMNS = (
    "technique", "options", "applicable", "baseline_peak_bytes", "predicted_peak_bytes",
    "predicted_saving_bytes", "saving_pct", "measured_peak_bytes", "error_pct", "quality",
    "step_time_ratio", "caveats", "how",
)


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


def best(advice: dict[str, Any] | None) -> dict[str, Any] | None:
    """The applicable row that saves the most (a measured saving beats a predicted one),
    from the first tier of training cost (the rows' ``cost``) that reaches the advice's usable
    budget; without a budget, or when no tier reaches it, the first tier with any saving."""
    from memprof.advisor import cost as cost_tiers

    candidates = [(saving(r), r) for r in rows(advice) if is_applicable(r)]
    scored = [(s[0], r) for s, r in candidates if s is not None and s[0] > 0]
    if not scored:
        return None
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
    options = row.get("options")
    if isinstance(options, dict) and options:
        name += " (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"
    elif options not in (None, "", [], {}):
        name += f" ({options})"
    return name


def display(value: Any, key: str = "") -> Any:
    """A tree the template renders: ``{"kind": "text"|"kv"|"table"|"list", ...}``.

    Integers under keys ending in ``bytes`` become IEC sizes; percentages get a ``%``.
    Everything stays a string for the template, which escapes it.
    """
    if isinstance(value, dict):
        return {"kind": "kv", "items": [(str(k), display(v, str(k))) for k, v in value.items()]}
    if isinstance(value, list | tuple):
        if value and all(isinstance(v, dict) for v in value):
            columns = _columns(list(value))
            return {
                "kind": "table",
                "columns": columns,
                "rows": [[cell(r.get(c), c) for c in columns] for r in value],
            }
        if all(not isinstance(v, dict | list | tuple) for v in value):
            return {"kind": "text", "text": ", ".join(cell(v, key) for v in value)}
        return {"kind": "list", "items": [display(v, key) for v in value]}
    return {"kind": "text", "text": cell(value, key)}


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


def _columns(records: list[dict[str, Any]]) -> list[str]:
    present: dict[str, None] = {}
    for r in records:
        present.update(dict.fromkeys(r))
    lead = [c for c in LEADING_COLUMNS if c in present]
    return lead + [c for c in present if c not in lead]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value
