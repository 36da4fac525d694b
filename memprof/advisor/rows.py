"""The advice table's rows: the columns every row has, a change's row, its measured columns
and the order rows are listed in."""

from __future__ import annotations

from typing import Any

from memprof import cost_tiers as cost
from memprof.advisor.core import Change
from memprof.advisor.workload import Measurement

#: The columns every advice row has (None where a row has nothing to say).
ROW_KEYS = (
    "technique", "options", "applicable", "reason", "baseline_peak_bytes",
    "predicted_peak_bytes", "predicted_saving_bytes", "saving_pct", "measured_peak_bytes",
    "error_pct", "quality", "step_time_ratio", "caveats", "how", "analytic_peak_bytes",
    "predicted_by", "not_simulated",
)


def change_row(
    c: Change, base: int, m: Measurement | str | None, ref: Measurement | None
) -> dict[str, Any]:
    """The row of change ``c`` against the profiled peak ``base``; ``m``: its simulation (or
    why it failed), measured against ``ref``, the unchanged run."""
    row: dict[str, Any] = {
        "technique": c.technique,
        "options": dict(c.options),
        "applicable": c.applicable,
        "reason": c.reason or None,
        "baseline_peak_bytes": base,
        "predicted_peak_bytes": c.predicted_peak,
        "predicted_saving_bytes": None,
        "saving_pct": None,
        "measured_peak_bytes": None,
        "error_pct": None,
        "quality": None,
        "step_time_ratio": None,
        "caveats": "; ".join(c.caveats) or None,
        "how": c.how,
        "not_simulated": c.not_simulated or None,
    }
    if c.predicted_peak is not None:
        row["predicted_saving_bytes"] = base - c.predicted_peak
        row["saving_pct"] = 100.0 * (base - c.predicted_peak) / base if base else 0.0
    if c.reserved is not None:
        before, after = c.reserved["baseline"], c.reserved["predicted"]
        row["baseline_reserved_bytes"] = before
        row["predicted_reserved_bytes"] = after
        row["predicted_saving_bytes"] = before - after
        row["saving_pct"] = 100.0 * (before - after) / before if before else 0.0
    if isinstance(m, str):
        row["caveats"] = "; ".join([*c.caveats, m])
    elif m is not None and ref is not None:
        fill_measured(row, c.predicted_peak, m, ref)
    return row


def fill_measured(
    row: dict[str, Any], predicted: int | None, m: Measurement, ref: Measurement
) -> None:
    row["measured_peak_bytes"] = m.peak_bytes
    if predicted is not None and m.peak_bytes:
        row["error_pct"] = 100.0 * abs(predicted - m.peak_bytes) / m.peak_bytes
    row["quality"] = {"output_drift": m.output_drift, "loss_drift": m.loss_drift}
    row["step_time_ratio"] = m.step_time_s / ref.step_time_s if ref.step_time_s else None


def rank(row: dict[str, Any]) -> tuple[int, int, float]:
    """Applicable rows first, then by what they cost the training, then by saving."""
    saving = row.get("predicted_saving_bytes")
    return (0 if row["applicable"] else 1, cost.rank(str(row.get("cost", ""))),
            -(saving if saving is not None else float("-inf")))

