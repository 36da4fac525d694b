"""The plan an advice carries for a budget: the cheapest combination of changes that fits,
checked.

:func:`memprof.advisor.planner.candidates` gives the combinations predicted to fit, in the
order it prefers them; :func:`plan_for` runs them as a whole on fake tensors when the model is
at hand (:func:`plan_runner`) and keeps the first whose run fits, then measures it when a
simulator is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from memprof.advisor import planner
from memprof.advisor.core import Change, Facts
from memprof.advisor.workload import Measurement, Workload, seeded
from memprof.units import format_bytes

if TYPE_CHECKING:
    from memprof.advisor import Simulator


#: Combinations the planner runs as a whole on fake tensors before it gives up: each run of a
#: 7B-shaped model costs seconds.
MAX_PLAN_RUNS = 4

#: Runs a combination of changes on fake tensors and returns its step peak (raises
#: :class:`~memprof.advisor.fake_prediction.FakeRunError` when it cannot run).
PlanRunner = Callable[[tuple[Change, ...]], int]


def plan_for(
    facts: Facts,
    changes: list[Change],
    resolved: tuple[int, str],
    simulator: Simulator | None,
    ref: Measurement | None,
    runner: PlanRunner | None = None,
) -> dict[str, Any]:
    """The cheapest combination that fits ``resolved``'s usable bytes.

    With a ``runner`` (the model is at hand) the planner's preferred combinations are run as a
    whole on fake tensors, in its order, up to :data:`MAX_PLAN_RUNS`; the plan is the first whose
    run fits, and ``fits`` is that run's verdict, never the composed prediction's. ``runs`` lists
    each combination run (``predicted_bytes``: the planner's prediction, see
    :func:`planner.candidates`; the run's peak, whether it fit, or why it could not run).
    Without a runner the plan is the first prediction that fits, ``checked_by``
    ``"analytic"``."""
    from memprof.advisor.fake_prediction import FakeRunError

    usable, text = resolved
    counter = [0]
    result: dict[str, Any] = {
        "budget": text,
        "usable_bytes": usable,
        "baseline_peak_bytes": facts.peak_bytes,
    }
    runs: list[dict[str, Any]] = []
    chosen: tuple[tuple[Change, ...], int, str] | None = None
    unrunnable: tuple[tuple[Change, ...], int, str] | None = None
    for combo, predicted in planner.candidates(facts, changes, usable, tried=counter):
        if not combo:  # the profiled step itself fits: it is its own run
            chosen = (combo, facts.peak_bytes, "the profile")
            break
        if runner is None:
            if predicted <= usable:
                chosen = (combo, predicted, "analytic")
                break
            continue
        if len(runs) >= MAX_PLAN_RUNS:
            break
        record: dict[str, Any] = {
            "changes": [planner.to_row(c) for c in combo],
            "predicted_bytes": predicted,
        }
        runs.append(record)
        try:
            if any(c.apply is None for c in combo):
                raise FakeRunError(", ".join(planner.describe(c) for c in combo if c.apply is None)
                                   + " cannot be applied to a copy")
            peak = runner(combo)
        except FakeRunError as exc:
            record["error"] = str(exc)
            if unrunnable is None:
                unrunnable = (combo, predicted, str(exc))
            continue
        record["fake_run_peak_bytes"] = peak
        record["fits"] = peak <= usable
        if peak <= usable:
            chosen = (combo, peak, "fake run")
            break
    result["combinations_tried"] = counter[0]
    if runner is not None:
        result["runs"] = runs
    if chosen is None:
        result.update(fits=False, changes=[], predicted_peak_bytes=None,
                      explanation=no_plan_explanation(facts, changes, text, runs, unrunnable))
        return result
    combo, peak, checked_by = chosen
    result.update(
        fits=True,
        checked_by=checked_by,
        changes=[planner.to_row(c) for c in combo],
        predicted_peak_bytes=peak,
        explanation=planner.explain(combo, peak, usable, facts.peak_bytes)
        + ("" if checked_by != "fake run"
           else "; the combination was run as a whole on fake tensors")
        + ("; composed from the rows' predictions, not run (no model at hand)"
           if checked_by == "analytic" else ""),
    )
    if simulator is not None and ref is not None and combo:
        if all(c.apply is not None for c in combo):
            m = simulator.measure(list(combo), ref)
            if isinstance(m, str):
                result["simulation"] = m
            else:
                result["measured_peak_bytes"] = m.peak_bytes
                result["measured_fits"] = m.peak_bytes <= usable
                result["quality"] = {"output_drift": m.output_drift, "loss_drift": m.loss_drift}
                result["step_time_ratio"] = (
                    m.step_time_s / ref.step_time_s if ref.step_time_s else None
                )
        else:
            result["simulation"] = (
                "not simulated: "
                + ", ".join(planner.describe(c) for c in combo if c.apply is None)
                + " cannot run here"
            )
    return result


def no_plan_explanation(
    facts: Facts, changes: list[Change], text: str, runs: list[dict[str, Any]],
    unrunnable: tuple[tuple[Change, ...], int, str] | None,
) -> str:
    best = min(
        (c for c in changes if c.applicable and c.predicted_peak is not None),
        key=lambda c: c.predicted_peak or 0,
        default=None,
    )
    parts = [f"no combination of the techniques fits {text}"]
    ran = [r for r in runs if "fake_run_peak_bytes" in r]
    if ran:
        low = min(ran, key=lambda r: r["fake_run_peak_bytes"])
        names = " + ".join(
            planner.describe_row(r) for r in low["changes"]) or "the unchanged step"
        parts.append(
            f"{len(ran)} predicted to fit were run as a whole on fake tensors and did not "
            f"(lowest: {names} at {format_bytes(low['fake_run_peak_bytes'])}, predicted "
            f"{format_bytes(low['predicted_bytes'])})")
    if unrunnable is not None:
        combo, predicted, why = unrunnable
        parts.append(
            f"{' + '.join(planner.describe(c) for c in combo)} is predicted at "
            f"{format_bytes(predicted)} but was not run ({why}), so it is not a plan that fits")
    parts.append(
        f"the lowest single prediction is {planner.describe(best) if best else 'none'}"
        + (f" at {format_bytes(best.predicted_peak)}" if best and best.predicted_peak else ""))
    return "; ".join(parts)


def plan_runner(
    model: Workload, options: dict[str, Any], ran: dict[tuple[int, ...], int] | None = None
) -> PlanRunner:
    """Runs a combination on fake tensors; ``ran``: the peaks of combinations already run with
    the same options (by their changes' ids), returned without running them again."""
    from memprof.advisor.fake_prediction import fake_peak

    def run(combo: tuple[Change, ...]) -> int:
        known = (ran or {}).get(tuple(id(c) for c in combo))
        if known is not None:
            return known
        with seeded():
            return fake_peak(model, [c.apply for c in combo if c.apply is not None], **options)

    return run

