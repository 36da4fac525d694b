"""The advice's batch rows: twice the batch, half the batch with two accumulation steps, and
(from a measured two-point fit) the largest batch that fits the budget.

Each is predicted by a fake run at its own batch when the model is at hand, else by the
per-phase lines of :class:`memprof.advisor.batch.BatchFit`; with a simulation's unchanged run
each is measured too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from memprof.advisor import batch
from memprof.advisor.rows import AdviceRow, measured_columns
from memprof.advisor.workload import Measurement, Workload, seeded, simulate


def resize_apply(target: int, size: int) -> Callable[[Any], None]:
    def apply(state: Any) -> None:
        state.batch = batch.resize(state.batch, target, size)

    return apply


def fake_runs(model: Workload, fake: dict[str, Any]) -> dict[int, Callable[[], int]]:
    """The fake runs :func:`advice_rows` makes with ``fake`` (fake_peak's options), by batch
    size: for the advisor to run them beside the other rows' (advisor.parallel) and hand their
    outcomes to :func:`advice_rows`; none where the batch has no leading batch dimension."""
    size = batch.batch_size(model.batch)
    if size is None:
        return {}

    def fake_run(target: int) -> int:
        from memprof.advisor.fake_prediction import fake_peak

        assert size is not None
        with seeded():
            return fake_peak(model, [resize_apply(target, size)], **fake)

    return {target: _bound(fake_run, target) for target, _ in _targets(size)}


def _targets(size: int) -> list[tuple[int, dict[str, Any]]]:
    """Twice the batch; half of it with two accumulation steps (where half is 1 or more)."""
    targets: list[tuple[int, dict[str, Any]]] = [(2 * size, {"batch": 2 * size})]
    half = size // 2
    if half >= 1:
        targets.append((half, {"batch": size, "micro_batch": half, "accumulation": 2}))
    return targets


def advice_rows(
    workload: Workload, ref: Measurement | None, base: int, resolved: tuple[int, str] | None,
    *, fake: dict[str, Any] | None = None, model: Workload | None = None,
    fake_outcomes: dict[int, Any] | None = None,
) -> list[AdviceRow]:
    """Rows for twice the batch and for half the batch with two accumulation steps.

    With ``fake`` (fake_peak's options: the model is at hand) each row is predicted by a fake
    run of the step at its own batch, so a peak that is not linear in the batch (a contrastive
    loss's batch x batch logits, attention, an LSTM) is what the model's own code makes.
    Without it (no fake runs) the rows come from per-phase lines through the peaks measured at
    half the batch and at the batch (:class:`batch.BatchFit`), and with a budget a row gives
    the largest batch that line fits (with fake runs that is the bisection's row, #26). With
    ``ref`` (a simulation's unchanged run) each row is also measured (on ``workload``; the
    fake runs use ``model`` when given, else ``workload``). ``fake_outcomes``: the outcomes of
    :func:`fake_runs`, where the caller made them already."""
    model = model or workload
    size = batch.batch_size(model.batch)
    if size is None or (size < 2 and fake is None):
        return [AdviceRow(
            technique="batch", options={}, applicable=False,
            reason=("the batch has no leading batch dimension" if size is None else
                    "the batch has no leading batch dimension of 2 or more to fit from"),
            baseline_peak_bytes=base, how="needs two batch sizes",
        )]
    targets = _targets(size)
    half = size // 2

    def measure(target: int) -> Measurement:
        assert ref is not None
        with seeded():
            return simulate(workload, [], ref, batch=batch.resize(workload.batch, target, size))

    fit: batch.BatchFit | None = None
    small: Measurement | None = None
    peaks: dict[int, int] = {}
    if fake is not None:
        from memprof.advisor import parallel
        from memprof.advisor.fake_prediction import FakeRunError

        try:  # both sizes at once where there are cores for it (advisor.parallel)
            if fake_outcomes is None or set(fake_outcomes) != {t for t, _ in targets}:
                runs = fake_runs(model, fake)
                fake_outcomes = dict(zip(runs, parallel.run_all(list(runs.values())),
                                         strict=True))
            outcomes = [fake_outcomes[target] for target, _ in targets]
            for (target, _), outcome in zip(targets, outcomes, strict=True):
                if isinstance(outcome, FakeRunError):
                    raise outcome
                peaks[target] = outcome
            how = "a fake run of the step at this batch (the model's own code, nothing allocated)"
            by = "fake run"
        except FakeRunError as exc:
            if ref is None or size < 2:
                return [AdviceRow(
                    technique="batch", options={}, applicable=False,
                    reason=f"the batch rows are predicted by fake runs: {exc}",
                    baseline_peak_bytes=base, how="a fake run at each batch",
                )]
            fake, peaks = None, {}
    if fake is None:
        assert ref is not None
        small = measure(half)
        fit = batch.BatchFit.from_profiles((half, small.profile), (size, ref.profile))
        peaks = {target: fit.peak(target) for target, _ in targets}
        how = (f"per-phase lines through the peaks measured at batch {half} and {size}: "
               f"{fit.to_dict()['per_sample_bytes']} bytes per sample")
        by = "measured simulation"
    rows = []
    for target, options in targets:
        predicted = peaks[target]
        row = AdviceRow(
            technique="batch",
            options=options,
            applicable=True,
            reason=None,
            baseline_peak_bytes=base,
            predicted_peak_bytes=predicted,
            predicted_saving_bytes=base - predicted,
            saving_pct=100.0 * (base - predicted) / base if base else 0.0,
            predicted_by=by,
            caveats=(
                "gradient accumulation keeps the effective batch; steps take about as long in total"
                if "accumulation" in options
                else "a larger batch changes optimization (scale the learning rate)"
            ),
            how=how,
        )
        if ref is not None:
            if target == half and small is not None:
                row = dataclasses.replace(row, **measured_columns(predicted, small, ref))
                row = row.with_caveat("measured at the fit's own point (not independent)")
            else:
                row = dataclasses.replace(
                    row, **measured_columns(predicted, measure(target), ref))
        rows.append(row)
    if resolved is not None and fit is not None:
        # with fake runs the largest batch is found by bisection of fake runs elsewhere (the
        # max_batch row, #26); here only the simulated two-point fit gives one
        rows.append(largest_batch_row(resolved[0], base, fit, how))
    return rows


def largest_batch_row(
    usable: int, base: int, fit: batch.BatchFit, how: str
) -> AdviceRow:
    largest = fit.largest_fitting(usable)
    predicted = fit.peak(largest) if largest else None
    return AdviceRow(
        technique="batch",
        options={"largest_batch_that_fits": largest},
        applicable=largest > 0,
        reason=None if largest else "batch 1 does not fit",
        baseline_peak_bytes=base,
        predicted_peak_bytes=predicted,
        predicted_saving_bytes=base - predicted if predicted is not None else None,
        saving_pct=None,
        caveats="extrapolated from the two-point fit",
        predicted_by="measured simulation",
        how=how,
    )


def _bound(run: Callable[[int], int], value: int) -> Callable[[], int]:
    return lambda: run(value)

