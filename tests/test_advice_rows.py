"""Advice rows are typed records (issue #28): :class:`AdviceRow` builds each row,
``Advice.rows`` holds the records (each also the read-only dict of its columns) and the saved
advice their ``to_dict()``, with the columns they always had."""

from __future__ import annotations

import dataclasses
import json

import pytest
from workloads import mlp_workload

from memprof.advisor import advise
from memprof.advisor.core import Change
from memprof.advisor.rows import AdviceRow, change_row, measured_columns, rank
from memprof.advisor.workload import Measurement, baseline

#: Every column a row of ``Advice.rows`` has (the allocator row adds its reserved bytes).
COLUMNS = {
    "technique", "options", "applicable", "reason", "baseline_peak_bytes",
    "predicted_peak_bytes", "predicted_saving_bytes", "saving_pct", "measured_peak_bytes",
    "error_pct", "quality", "step_time_ratio", "caveats", "how", "analytic_peak_bytes",
    "predicted_by", "not_simulated", "cost",
}
RESERVED = {"baseline_reserved_bytes", "predicted_reserved_bytes"}


def _measurement(peak: int, step_time_s: float) -> Measurement:
    return Measurement(peak_bytes=peak, step_time_s=step_time_s, output_drift=0.25,
                       loss_drift=0.5, final_loss=None, profile=None)  # type: ignore[arg-type]


def test_a_change_s_row_has_its_saving_and_measured_error() -> None:
    # GIVEN a change predicted at 600 of a 1000-byte peak, simulated at 500 in twice the time
    change = Change("checkpointing", {"blocks": 2}, "recompute", caveats=["slower"],
                    predicted_peak=600)
    # WHEN its row is made
    row = change_row(change, 1000, _measurement(500, 2.0), _measurement(1000, 1.0))
    # THEN the saving is of the predicted peak and the error of the measured one
    assert (row.predicted_saving_bytes, row.saving_pct) == (400, 40.0)
    assert (row.measured_peak_bytes, row.error_pct, row.step_time_ratio) == (500, 20.0, 2.0)
    assert row.quality == {"output_drift": 0.25, "loss_drift": 0.5}
    assert row.caveats == "slower"
    assert "baseline_reserved_bytes" not in row.to_dict()


def test_an_allocator_row_saves_reserved_bytes_and_a_failed_simulation_is_a_caveat() -> None:
    # GIVEN a change on reserved memory only (80 -> 60 reserved), whose simulation failed
    change = Change("allocator", {}, "replay", caveats=["set it early"], predicted_peak=50,
                    reserved={"baseline": 80, "predicted": 60})
    # WHEN its row is made
    row = change_row(change, 50, "simulation failed: boom", None)
    # THEN its saving is in reserved bytes, and the failure joins its caveats
    assert (row.predicted_saving_bytes, row.saving_pct) == (20, 25.0)
    data = row.to_dict()
    assert (data["baseline_reserved_bytes"], data["predicted_reserved_bytes"]) == (80, 60)
    assert data["caveats"] == "set it early; simulation failed: boom"
    assert data["measured_peak_bytes"] is None


def test_measured_columns_leave_the_error_out_without_a_prediction() -> None:
    columns = measured_columns(None, _measurement(500, 3.0), _measurement(1000, 0.0))
    assert (columns["error_pct"], columns["step_time_ratio"]) == (None, None)


def test_rows_rank_applicable_then_cheaper_then_larger_saving() -> None:
    rows = [
        AdviceRow("a", {}, False, predicted_saving_bytes=900, cost="free"),
        AdviceRow("b", {}, True, predicted_saving_bytes=100, cost="free"),
        AdviceRow("c", {}, True, predicted_saving_bytes=300, cost="free"),
        AdviceRow("d", {}, True, predicted_saving_bytes=None, cost="free"),
    ]
    assert [r.technique for r in sorted(rows, key=rank)] == ["c", "b", "d", "a"]


def test_a_saved_row_reads_back_the_same_and_keeps_keys_it_does_not_know() -> None:
    # GIVEN a row as a file from another version holds it
    data = {**AdviceRow("batch", {"batch": 4}, True, predicted_peak_bytes=7).to_dict(),
            "future_column": [1, 2]}
    # WHEN it is read and written again
    row = AdviceRow.from_dict(data)
    # THEN it is the same row, key for key and in order
    assert row.predicted_peak_bytes == 7
    assert list(row.to_dict().items()) == list(data.items())
    assert row.with_caveat("one").with_caveat("two").caveats == "one; two"


def test_advise_returns_every_column_for_every_row() -> None:
    # GIVEN an MLP's profile WHEN it is advised analytically
    w = mlp_workload()
    profile = baseline(w).profile
    advice = advise(profile, budget=int(profile.peak().total_bytes * 0.8))
    # THEN each row has the columns rows always had, and is its typed record's dict
    assert advice.rows
    for row in advice.rows:
        extra = RESERVED if row["technique"] == "allocator" else set()
        assert set(row) == COLUMNS | extra, row["technique"]
        assert AdviceRow.from_dict(row).to_dict() == row
        assert not AdviceRow.from_dict(row).extra


def test_advice_rows_are_records_that_still_read_as_their_dicts() -> None:
    # GIVEN an MLP's advice (before: Advice.rows were plain dicts)
    from memprof.advisor.advice import Advice

    profile = baseline(mlp_workload()).profile
    advice = advise(profile, budget=int(profile.peak().total_bytes * 0.8))
    saved = advice.to_dict()["recommendations"]
    # THEN each row is its typed record, and reads as the saved dict, key for key
    assert advice.rows and all(isinstance(r, AdviceRow) for r in advice.rows)
    assert [r.technique for r in advice.rows] == [r["technique"] for r in saved]
    assert advice.rows == saved
    assert json.loads(json.dumps(advice.rows)) == json.loads(json.dumps(saved))
    assert all(type(r) is dict for r in saved)
    best = advice.best()
    assert best is not None and best.predicted_saving_bytes == best["predicted_saving_bytes"]
    with pytest.raises(TypeError, match="read-only"):
        advice.rows[0]["caveats"] = "changed"  # type: ignore[index]
    changed = dataclasses.replace(advice.rows[0], caveats="changed")
    assert changed["caveats"] == changed.caveats == "changed"
    # AND an Advice read back, or made from dict rows, holds records again
    again = Advice.from_dict(json.loads(json.dumps(advice.to_dict())))
    assert all(isinstance(r, AdviceRow) for r in again.rows) and again.rows == advice.rows
    made = Advice(rows=saved, baseline_peak_bytes=1)  # type: ignore[arg-type]
    assert all(isinstance(r, AdviceRow) for r in made.rows) and made.rows == saved


def test_the_summary_says_a_saving_a_cost_and_no_change_in_words() -> None:
    # GIVEN rows that save 12.5%, cost 3% and change 0.04% of a 1000-byte peak (the last printed
    # "-0.0% saved" for a llama-2-7b checkpointing row, which read as a saving)
    from memprof.advisor.advice import Advice

    def row(technique: str, peak: int) -> dict[str, object]:
        return {"technique": technique, "options": {}, "applicable": True,
                "predicted_peak_bytes": peak, "predicted_saving_bytes": 1000 - peak,
                "saving_pct": 100.0 * (1000 - peak) / 1000}

    advice = Advice(rows=[row("a", 875), row("b", 1030), row("c", 1000.4)],  # type: ignore[list-item]
                    baseline_peak_bytes=1000)
    # WHEN it is summarised
    lines = advice.summary(top=3).splitlines()[1:]
    # THEN each says what it does in words, with its own figure
    assert lines[0].endswith("(12.5% saved)")
    assert lines[1].endswith("(3.0% more)")
    assert lines[2].endswith("(no change)")
