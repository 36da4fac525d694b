"""The advisor's answer: recommendation rows, a budget plan, and their JSON form."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from memprof import hooks
from memprof.advisor.rows import AdviceRow
from memprof.hooks import plugged
from memprof.units import format_bytes

#: Columns of :meth:`Advice.table`, in order.
COLUMNS = (
    "technique",
    "options",
    "applicable",
    "reason",
    "baseline_peak_bytes",
    "predicted_peak_bytes",
    "predicted_saving_bytes",
    "saving_pct",
    "measured_peak_bytes",
    "error_pct",
    "quality",
    "step_time_ratio",
    "caveats",
    "how",
)
ADVICE_VERSION = 1


def saving_words(pct: float | None) -> str:
    """A row's saving as words: "12.5% saved", "3.0% more", or "no change" where it rounds to
    zero (a tiny cost printed as "-0.0% saved" read as a saving)."""
    if pct is None:
        return "saving unknown"
    if round(pct, 1) == 0:
        return "no change"
    return f"{pct:.1f}% saved" if pct > 0 else f"{-pct:.1f}% more"


@dataclass
class Advice:
    """Recommendations ranked by saving, and (with a budget) the plan that fits.

    ``table()`` columns: ``technique``; ``options`` (dict); ``applicable`` and ``reason`` (why
    not); ``baseline_peak_bytes`` (the profile's step peak); ``predicted_peak_bytes``,
    ``predicted_saving_bytes`` and ``saving_pct`` (of the baseline); when simulated,
    ``measured_peak_bytes``, ``error_pct`` (|predicted - measured| / measured, in %),
    ``quality`` (``output_drift``: relative L2 change of the outputs on the same batch before
    training; ``loss_drift``: relative change of the loss after the simulated steps) and
    ``step_time_ratio`` (against the unchanged model, both profiled); ``caveats``; ``how``
    (how the prediction was derived).

    ``rows`` are :class:`~memprof.advisor.rows.AdviceRow` records, best first (each also
    reads as the dict of its columns); dicts given in the file's form are read into them.
    """

    rows: list[AdviceRow]
    plan: dict[str, Any] | None = None
    baseline_peak_bytes: int = 0
    simulated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rows = [r if isinstance(r, AdviceRow) else AdviceRow.from_dict(r)
                     for r in self.rows]

    def __repr__(self) -> str:
        """One line: ``Advice(baseline=1.2 GiB, rows=14 (9 applicable), best=checkpointing
        (blocks=2) 35.0% saved, plan=fits)`` (the dataclass's own spelled out every row)."""
        applicable = sum(1 for r in self.rows if r["applicable"])
        best = self.best()
        best_text = "none" if best is None else (
            f"{best['technique']} ({_options_text(best['options'])}) "
            f"{saving_words(best.get('saving_pct'))}")
        plan = "none" if not self.plan else ("fits" if self.plan.get("fits") else "does not fit")
        return (f"Advice(baseline={format_bytes(self.baseline_peak_bytes)}, "
                f"rows={len(self.rows)} ({applicable} applicable), best={best_text}, "
                f"plan={plan})")

    def table(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows)
        for c in COLUMNS:
            if c not in frame.columns:
                frame[c] = None
        return frame[[*COLUMNS, *[c for c in frame.columns if c not in COLUMNS]]]

    def best(self) -> AdviceRow | None:
        ok = [
            r for r in self.rows if r["applicable"] and (r.get("predicted_saving_bytes") or 0) > 0
        ]
        return ok[0] if ok else None

    def summary(self, *, top: int = 3) -> str:
        lines = [f"baseline step peak {format_bytes(self.baseline_peak_bytes)}"]
        for r in [r for r in self.rows if r["applicable"]][:top]:
            opts = _options_text(r["options"])
            saving = r.get("predicted_saving_bytes")
            if saving is None:
                continue
            line = (
                f"  {r['technique']} ({opts}): predicted {format_bytes(r['predicted_peak_bytes'])}"
                f" ({saving_words(r['saving_pct'])})"
            )
            if r.get("measured_peak_bytes") is not None:
                line += f", measured {format_bytes(r['measured_peak_bytes'])}"
            lines.append(line)
        if self.plan:
            lines.append(f"plan: {self.plan.get('explanation', '')}")
            lines.extend(f"  {part}" for part in self._plan_breakdowns())
        return "\n".join(lines)

    def _plan_breakdowns(self) -> list[str]:
        """What the plan's rows say their peak holds (LoRA/QLoRA: parameters with the adapters,
        gradients, optimizer state, activations), as the analytic rewrite of each row sees it."""
        marker = "at the predicted peak"
        out = []
        for change in (self.plan or {}).get("changes") or []:
            for r in self.rows:
                how = str(r.get("how") or "")
                if (r["technique"], r["options"]) == (change.get("technique"),
                                                      change.get("options")) and marker in how:
                    out.append(f"{r['technique']} (analytic breakdown) "
                               f"{how[how.index(marker):]}")
                    break
        return out

    def _repr_html_(self) -> str:
        """Jupyter's view: the recommendation table and the plan (memprof.report.notebook)."""
        return plugged(hooks.advice_html, "advice_html")(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": ADVICE_VERSION,
            "baseline_peak_bytes": self.baseline_peak_bytes,
            "simulated": self.simulated,
            "recommendations": [dict(r) for r in self.rows],
            "plan": self.plan,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Advice:
        known = {"version", "baseline_peak_bytes", "simulated", "recommendations", "plan"}
        return cls(
            rows=[AdviceRow.from_dict(r) for r in data.get("recommendations", [])],
            plan=data.get("plan"),
            baseline_peak_bytes=int(data.get("baseline_peak_bytes", 0)),
            simulated=bool(data.get("simulated", False)),
            extra={k: v for k, v in data.items() if k not in known},
        )


def _options_text(options: Mapping[str, Any]) -> str:
    """A row's options as ``k=v, ...`` (the module list left out: it can be long)."""
    return ", ".join(f"{k}={v}" for k, v in options.items() if k != "modules")


def row_key(technique: str, options: dict[str, Any]) -> tuple[str, str]:
    """A row's identity across a save and a load (options as their JSON text)."""
    return technique, json.dumps(options, sort_keys=True, default=str)


def stored_fake_peaks(data: dict[str, Any] | None) -> dict[tuple[str, str], int]:
    """The peaks a saved advice (:meth:`Advice.to_dict`) predicted by fake runs, by
    :func:`row_key`: what a profile file carries from when its model was at hand."""
    out: dict[tuple[str, str], int] = {}
    for row in (data or {}).get("recommendations") or []:
        peak = row.get("predicted_peak_bytes")
        if row.get("predicted_by") == "fake run" and row.get("applicable") and peak is not None:
            out[row_key(str(row.get("technique")), dict(row.get("options") or {}))] = int(peak)
    return out


def stored_search_rows(data: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The rows of a saved advice that fake runs made without a change of their own (the batch
    rows: a fake run at another batch, the largest batch that fits): a file alone cannot
    make them again, so they are carried over as they were."""
    return [dict(row) for row in (data or {}).get("recommendations") or []
            if row.get("technique") == "batch" and row.get("predicted_by") == "fake run"]
