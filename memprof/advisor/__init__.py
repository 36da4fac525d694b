"""The advisor: what to change so a training step fits, predicted from a profile and checked.

``advise(profile)`` predicts, for each technique and option, the step peak the change would
give, from the profile's own numbers (see :mod:`memprof.advisor.core`). With a ``workload``
it also applies each change to deep copies of the model and optimizer, runs a few steps under
:func:`memprof.profile` and fills the measured columns. With a ``budget`` it plans the
cheapest combination that fits (and, with a workload, simulates it).

Example::

    advice = memprof.advise(prof.profile, budget="24GiB",
                            workload=Workload(model, optimizer, (x, y)))
    print(advice.table()[["technique", "options", "predicted_peak_bytes", "error_pct"]])
    prof.profile.advice = advice.to_dict()
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from memprof.advisor import (
    allocator_conf,
    batch,
    checkpointing,
    cost,
    master_weights,
    mixed_precision,
    optimizer,
    planner,
    pruning,
    quantization,
    sharding,
    zero_grad,
)
from memprof.advisor.advice import Advice, row_key, stored_fake_peaks
from memprof.advisor.core import Change, Facts, predict_peak, read_facts
from memprof.advisor.workload import Measurement, Workload, baseline, seeded, simulate
from memprof.gpus import (
    FRAGMENTATION_FRACTION,
    replay_cached_bytes,
    resolve_budget,
    usable_bytes,
)
from memprof.profile import Profile
from memprof.units import format_bytes


def changes_for(facts: Facts) -> list[Change]:
    """Every technique's candidate changes for this profile, with predicted peaks set."""
    out: list[Change] = []
    techniques = (
        mixed_precision, master_weights, quantization, pruning, checkpointing, optimizer,
        zero_grad, sharding, allocator_conf,
    )
    for module in techniques:
        out.extend(module.predict(facts))
    for c in out:
        if c.applicable and c.transform is not None and c.predicted_peak is None:
            c.predicted_peak = predict_peak(facts, [c.transform])
    return out


def read_budget(
    budget: int | str | None, *, cached_bytes: int | None = None
) -> tuple[int, str] | None:
    """(usable bytes, description). A text budget (size or GPU) loses the CUDA context and the
    caching allocator's reserve: the profile's own (``cached_bytes``, reserved minus allocated
    in its allocator replay) when it has one, else a fixed share. An int is taken as bytes
    already free of the context and loses the fixed share."""
    if budget is None:
        return None
    if cached_bytes is None:
        reserve = f"{100 * FRAGMENTATION_FRACTION:.0f}% fragmentation reserve"
    else:
        reserve = (f"{format_bytes(cached_bytes)} the caching allocator keeps beyond the "
                   "tensors (its replay of this run)")
    if isinstance(budget, str):
        total, text = resolve_budget(budget)
        return usable_bytes(total, cached_bytes=cached_bytes), (
            f"{text}; usable after the CUDA context and {reserve}"
        )
    # Bytes given as a number stay as they always were: less the fixed share (a tiny budget
    # would otherwise be eaten by the replay's 2-20 MiB segment granularity).
    usable = int(int(budget) * (1 - FRAGMENTATION_FRACTION))
    return usable, f"{budget} bytes less {100 * FRAGMENTATION_FRACTION:.0f}% fragmentation reserve"


class Simulator(Protocol):
    """Measures the unchanged run and a run with changes applied (see
    :class:`WorkloadSimulator` and :class:`memprof.advisor.script.ScriptSimulator`)."""

    def reference(self) -> Measurement: ...

    def measure(self, changes: list[Change], reference: Measurement) -> Measurement | str: ...


class WorkloadSimulator:
    """Simulation on deep copies of a :class:`Workload` (the user's objects stay untouched)."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload

    def reference(self) -> Measurement:
        with seeded():
            baseline(self.workload)  # warm-up: the first run pays one-off costs (step time)
            return baseline(self.workload)

    def measure(self, changes: list[Change], reference: Measurement) -> Measurement | str:
        try:
            with seeded():
                applies = [c.apply for c in changes if c.apply is not None]
                return simulate(self.workload, applies, reference)
        except Exception as exc:  # one failing technique must not lose the others
            first = str(exc).splitlines()[0] if str(exc) else ""
            return f"simulation failed: {type(exc).__name__}: {first}"


def advise(
    profile: Profile,
    *,
    budget: int | str | None = None,
    workload: Workload | None = None,
    simulator: Simulator | None = None,
    reference: Measurement | None = None,
    prediction: str | None = None,
    simulate: bool = True,
    fake_model: Workload | None = None,
) -> Advice:
    """Recommendations for ``profile`` (see :class:`Advice` for the columns).

    With a ``workload`` (or any ``simulator``) every applicable change is also measured;
    ``reference`` is the simulator's unchanged run when the caller already has it.
    ``simulate=False`` skips those measurements (the predictions stay).

    ``prediction``: ``"fake"`` (the default when the model is at hand: a ``workload``, or
    ``fake_model``, a Workload used only to predict) runs each change on fake tensors
    (:mod:`memprof.advisor.fake_prediction`); ``"analytic"`` predicts from the profile alone.
    Each row's ``predicted_by`` says which ("fake run", "analytic", "measured simulation"), and
    ``analytic_peak_bytes`` keeps the analytic number; a failed fake run falls back to it with
    the reason in ``caveats``. With neither given and no model at hand, the fake-run
    predictions a saved profile carries (``profile.advice``) are used for their rows (and by
    the plan), the others are analytic.
    """
    if workload is not None and simulator is not None:
        raise ValueError("give a workload or a simulator, not both")
    model_at_hand = fake_model or workload
    prediction_given = prediction
    if prediction is None:
        prediction = "fake" if model_at_hand is not None else "analytic"
    if prediction not in ("fake", "analytic"):
        raise ValueError(f"prediction must be 'fake' or 'analytic', not {prediction!r}")
    if prediction == "fake" and model_at_hand is None:
        raise ValueError("prediction='fake' needs the model: pass a workload or fake_model")
    facts = read_facts(profile)
    kept = zero_grad.gradient_use(facts).kept
    if workload is not None:
        if workload.set_to_none and kept:
            # the profiled loop keeps its gradients between steps: so do the simulations
            workload = dataclasses.replace(workload, set_to_none=False)
        simulator = WorkloadSimulator(workload)
        if fake_model is None:
            model_at_hand = workload
    elif model_at_hand is not None and model_at_hand.set_to_none and kept:
        model_at_hand = dataclasses.replace(model_at_hand, set_to_none=False)  # and fake runs
    if not simulate:
        simulator = None
    changes = changes_for(facts)
    resolved = read_budget(budget, cached_bytes=replay_cached_bytes(profile.allocator))
    base = facts.peak_bytes
    measured: dict[int, Measurement | str] = {}
    extra: dict[str, Any] = {}
    analytic = {id(c): c.predicted_peak for c in changes}
    faked: dict[int, str | None] = {}
    if prediction == "fake" and model_at_hand is not None:
        extra["fake_baseline_peak_bytes"] = fake_predict(model_at_hand, changes, faked)
    elif prediction_given is None:  # a saved profile: its fake-run predictions, if it has them
        stored = stored_fake_peaks(profile.advice)
        for c in changes:
            peak = stored.get(row_key(c.technique, c.options)) if c.applicable else None
            if peak is not None:
                c.predicted_peak, faked[id(c)] = peak, None
        if faked:
            extra["fake_prediction_stored"] = True
            extra["fake_baseline_peak_bytes"] = (profile.advice or {}).get(
                "fake_baseline_peak_bytes")
    if simulator is not None:
        if reference is None:
            reference = simulator.reference()
        extra["measured_baseline_peak_bytes"] = reference.peak_bytes
        for c in changes:
            if c.applicable and c.apply is not None:
                measured[id(c)] = simulator.measure([c], reference)
    else:
        reference = None
    rows = [_row(c, base, measured.get(id(c)), reference) for c in changes]
    for c, row in zip(changes, rows, strict=True):
        row["analytic_peak_bytes"] = analytic[id(c)]
        failure = faked.get(id(c))
        row["predicted_by"] = "fake run" if id(c) in faked and failure is None else (
            "analytic" if c.predicted_peak is not None else None)
        if failure is not None:
            row["caveats"] = "; ".join(x for x in (row["caveats"], failure) if x)
    if workload is not None and reference is not None and facts.has_optimizer:
        rows.extend(_batch_rows(workload, reference, base, resolved))
    for row in rows:
        row["cost"] = cost.cost_of(row["technique"], row.get("options"))
    rows.sort(key=_rank)
    plan = None
    if resolved is not None:
        plan = _plan(facts, changes, resolved, simulator, reference)
        extra["budget"] = resolved[1]
        extra["usable_bytes"] = resolved[0]
    return Advice(
        rows=rows, plan=plan, baseline_peak_bytes=base, simulated=simulator is not None,
        extra=extra,
    )


def fake_predict(
    model: Workload, changes: list[Change], faked: dict[int, str | None]
) -> int | None:
    """Set each applicable change's ``predicted_peak`` from a fake run of it; ``faked`` gets,
    per change tried, None or why its fake run failed. Returns the unchanged fake run's peak
    (None when even that fails: every row then stays analytic)."""
    from memprof.advisor.fake_prediction import FakeRunError, fake_peak

    try:
        with seeded():
            reference = fake_peak(model)
    except FakeRunError:
        return None
    for c in changes:
        if not (c.applicable and c.apply is not None):
            continue
        try:
            with seeded():
                c.predicted_peak = fake_peak(model, [c.apply])
            faked[id(c)] = None
        except FakeRunError as exc:
            faked[id(c)] = f"{exc}; predicted analytically"
    return reference


def _row(
    c: Change, base: int, m: Measurement | str | None, ref: Measurement | None
) -> dict[str, Any]:
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
        _fill_measured(row, c.predicted_peak, m, ref)
    return row


def _fill_measured(
    row: dict[str, Any], predicted: int | None, m: Measurement, ref: Measurement
) -> None:
    row["measured_peak_bytes"] = m.peak_bytes
    if predicted is not None and m.peak_bytes:
        row["error_pct"] = 100.0 * abs(predicted - m.peak_bytes) / m.peak_bytes
    row["quality"] = {"output_drift": m.output_drift, "loss_drift": m.loss_drift}
    row["step_time_ratio"] = m.step_time_s / ref.step_time_s if ref.step_time_s else None


def _rank(row: dict[str, Any]) -> tuple[int, int, float]:
    """Applicable rows first, then by what they cost the training, then by saving."""
    saving = row.get("predicted_saving_bytes")
    return (0 if row["applicable"] else 1, cost.rank(str(row.get("cost", ""))),
            -(saving if saving is not None else float("-inf")))


def _batch_rows(
    workload: Workload, ref: Measurement, base: int, resolved: tuple[int, str] | None
) -> list[dict[str, Any]]:
    size = batch.batch_size(workload.batch)
    if size is None or size < 2:
        return [
            {
                "technique": "batch",
                "options": {},
                "applicable": False,
                "reason": "the batch has no leading batch dimension of 2 or more to fit from",
                "baseline_peak_bytes": base,
                "how": "needs two measured batch sizes",
            }
        ]
    half = size // 2
    with seeded():
        small = simulate(workload, [], ref, batch=batch.resize(workload.batch, half, size))
    fit = batch.BatchFit.from_profiles((half, small.profile), (size, ref.profile))
    how = (
        f"per-phase lines through the peaks measured at batch {half} and {size}: "
        f"{fit.to_dict()['per_sample_bytes']} bytes per sample"
    )
    rows = []
    for target, options in (
        (2 * size, {"batch": 2 * size}),
        (half, {"batch": size, "micro_batch": half, "accumulation": 2}),
    ):
        predicted = fit.peak(target)
        row: dict[str, Any] = {
            "technique": "batch",
            "options": options,
            "applicable": True,
            "reason": None,
            "baseline_peak_bytes": base,
            "predicted_peak_bytes": predicted,
            "predicted_saving_bytes": base - predicted,
            "saving_pct": 100.0 * (base - predicted) / base if base else 0.0,
            "predicted_by": "measured simulation",
            "caveats": (
                "gradient accumulation keeps the effective batch; steps take about as long in total"
                if "accumulation" in options
                else "a larger batch changes optimization (scale the learning rate)"
            ),
            "how": how,
        }
        if target == half:
            _fill_measured(row, predicted, small, ref)
            row["caveats"] = f"{row['caveats']}; measured at the fit's own point (not independent)"
        else:
            with seeded():
                m = simulate(workload, [], ref, batch=batch.resize(workload.batch, target, size))
            _fill_measured(row, predicted, m, ref)
        rows.append(row)
    if resolved is not None:
        largest = fit.largest_fitting(resolved[0])
        rows.append(
            {
                "technique": "batch",
                "options": {"largest_batch_that_fits": largest},
                "applicable": largest > 0,
                "reason": None if largest else "batch 1 does not fit",
                "baseline_peak_bytes": base,
                "predicted_peak_bytes": fit.peak(largest) if largest else None,
                "predicted_saving_bytes": base - fit.peak(largest) if largest else None,
                "saving_pct": None,
                "caveats": "extrapolated from the two-point fit",
                "predicted_by": "measured simulation",
                "how": how,
            }
        )
    return rows


def _plan(
    facts: Facts,
    changes: list[Change],
    resolved: tuple[int, str],
    simulator: Simulator | None,
    ref: Measurement | None,
) -> dict[str, Any]:
    usable, text = resolved
    combo, peak, tried = planner.plan(facts, changes, usable)
    result: dict[str, Any] = {
        "budget": text,
        "usable_bytes": usable,
        "baseline_peak_bytes": facts.peak_bytes,
        "combinations_tried": tried,
    }
    if combo is None:
        best = min(
            (c for c in changes if c.predicted_peak is not None),
            key=lambda c: c.predicted_peak or 0,
            default=None,
        )
        result.update(
            fits=False,
            changes=[],
            predicted_peak_bytes=None,
            explanation=(
                "no combination of the techniques fits "
                f"{text}; the lowest single prediction is "
                f"{planner.describe(best) if best else 'none'}"
            ),
        )
        return result
    if not combo:
        peak = facts.peak_bytes
    result.update(
        fits=True,
        changes=[planner.to_row(c) for c in combo],
        predicted_peak_bytes=peak,
        explanation=planner.explain(combo, peak, usable, facts.peak_bytes),
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


__all__ = ["Advice", "Simulator", "Workload", "WorkloadSimulator", "advise"]
