"""The advice table's rows: :class:`AdviceRow` (the columns every row has), a change's row, its
measured columns and the order rows are listed in."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from memprof import cost_tiers as cost
from memprof.advisor.core import Change
from memprof.advisor.workload import Measurement
from memprof.dict_record import DictRecord

#: Columns a row has only when it says something in them (the allocator rows' reserved bytes).
_ONLY_WHEN_SET = frozenset({"baseline_reserved_bytes", "predicted_reserved_bytes"})


@dataclass(frozen=True, eq=False)
class AdviceRow(DictRecord):
    """One recommendation (the columns are :class:`~memprof.advisor.advice.Advice`'s; None
    where a row has nothing to say). ``Advice.rows`` holds these; the saved advice holds their
    :meth:`to_dict`, whose keys are the file format. A row is also the read-only dict of those
    keys (``row["saving_pct"]`` is ``row.saving_pct``), as the rows were before the record."""

    technique: str
    options: dict[str, Any]
    applicable: bool
    reason: str | None = None
    baseline_peak_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    predicted_saving_bytes: int | None = None
    saving_pct: float | None = None
    measured_peak_bytes: int | None = None
    error_pct: float | None = None
    quality: dict[str, Any] | None = None
    step_time_ratio: float | None = None
    caveats: str | None = None
    how: str | None = None
    not_simulated: str | None = None
    baseline_reserved_bytes: int | None = None
    predicted_reserved_bytes: int | None = None
    analytic_peak_bytes: int | None = None
    predicted_by: str | None = None
    cost: str | None = None
    #: Keys of a saved row that this version does not know, carried over as they were.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The row's JSON form: every column, the reserved bytes only where set, then
        :attr:`extra`."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (f.name in _ONLY_WHEN_SET and value is None):
                continue
            out[f.name] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdviceRow:
        """The row :meth:`to_dict` wrote (a saved advice's row)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in data.items() if k in known},
            extra={k: v for k, v in data.items() if k not in known},
        )

    def with_caveat(self, caveat: str | None) -> AdviceRow:
        """This row with ``caveat`` appended to its caveats."""
        return dataclasses.replace(
            self, caveats="; ".join(x for x in (self.caveats, caveat) if x) or None)


def change_row(c: Change, base: int, m: Measurement | str | None, ref: Measurement | None
               ) -> AdviceRow:
    """The row of change ``c`` against the profiled peak ``base``; ``m``: its simulation (or
    why it failed), measured against ``ref``, the unchanged run."""
    saving: int | None = None
    saving_pct: float | None = None
    if c.predicted_peak is not None:
        saving = base - c.predicted_peak
        saving_pct = 100.0 * (base - c.predicted_peak) / base if base else 0.0
    before = after = None
    if c.reserved is not None:
        before, after = c.reserved["baseline"], c.reserved["predicted"]
        saving = before - after
        saving_pct = 100.0 * (before - after) / before if before else 0.0
    row = AdviceRow(
        technique=c.technique,
        options=dict(c.options),
        applicable=c.applicable,
        reason=c.reason or None,
        baseline_peak_bytes=base,
        predicted_peak_bytes=c.predicted_peak,
        predicted_saving_bytes=saving,
        saving_pct=saving_pct,
        caveats="; ".join(c.caveats) or None,
        how=c.how,
        not_simulated=c.not_simulated or None,
        baseline_reserved_bytes=before,
        predicted_reserved_bytes=after,
    )
    if isinstance(m, str):
        return dataclasses.replace(row, caveats="; ".join([*c.caveats, m]))
    if m is not None and ref is not None:
        return dataclasses.replace(row, **measured_columns(c.predicted_peak, m, ref))
    return row


def measured_columns(predicted: int | None, m: Measurement, ref: Measurement) -> dict[str, Any]:
    """The measured columns of a row predicted at ``predicted`` and simulated as ``m`` (``ref``:
    the unchanged run)."""
    return {
        "measured_peak_bytes": m.peak_bytes,
        "error_pct": (100.0 * abs(predicted - m.peak_bytes) / m.peak_bytes
                      if predicted is not None and m.peak_bytes else None),
        "quality": {"output_drift": m.output_drift, "loss_drift": m.loss_drift},
        "step_time_ratio": m.step_time_s / ref.step_time_s if ref.step_time_s else None,
    }


def rank(row: AdviceRow) -> tuple[int, int, float]:
    """Applicable rows first, then by what they cost the training, then by saving."""
    saving = row.predicted_saving_bytes
    return (0 if row.applicable else 1, cost.rank(str(row.cost or "")),
            -(saving if saving is not None else float("-inf")))
