"""The advisor: what to change so a training step fits, predicted from a profile and checked.

``advise(profile)`` predicts, for each technique and option, the step peak the change would
give, from the profile's own numbers (see :mod:`memprof.advisor.core`). With a ``workload``
it also applies each change to deep copies of the model and optimizer, runs a few steps under
:func:`memprof.profile` and fills the measured columns. With a ``budget`` it plans the
cheapest combination that fits: with the model at hand the combination is run as a whole on
fake tensors and said to fit only when that run fits (and, with a workload, it is simulated).
The budget's usable bytes come from :func:`memprof.gpus.budget_of`, the figure a ``memprof
estimate`` fit verdict prints too.

Example::

    advice = memprof.advise(prof.profile, budget="24GiB",
                            workload=Workload(model, optimizer, (x, y)))
    print(advice.table()[["technique", "options", "predicted_peak_bytes", "error_pct"]])
    prof.profile.advice = advice.to_dict()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from memprof import cost_tiers as cost
from memprof.advisor import (
    allocator_conf,
    batch,
    checkpointing,
    lora,
    master_weights,
    max_batch,
    mixed_precision,
    offload,
    optimizer,
    planner,
    pruning,
    qlora,
    quantization,
    sharding,
    zero_grad,
)
from memprof.advisor.advice import Advice, row_key, stored_fake_peaks, stored_search_rows
from memprof.advisor.core import Change, Facts, predict_peak, read_facts
from memprof.advisor.workload import Measurement, Workload, baseline, seeded, simulate
from memprof.errors import first_line
from memprof.gpus import budget_of, replay_cached_bytes
from memprof.profile import Profile, as_profile
from memprof.units import format_bytes

if TYPE_CHECKING:
    from memprof.tracking.session import Profiler


def changes_for(facts: Facts) -> list[Change]:
    """Every technique's candidate changes for this profile, with predicted peaks set."""
    out: list[Change] = []
    techniques = (
        mixed_precision, master_weights, quantization, pruning, checkpointing, optimizer,
        zero_grad, sharding, allocator_conf, lora, qlora, offload,
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
    """(usable bytes, description) of :func:`memprof.gpus.budget_of`, the one budget function
    the fit verdict and the text use too."""
    if budget is None:
        return None
    b = budget_of(budget, cached_bytes=cached_bytes)
    return b.usable_bytes, b.describe()


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
            first = first_line(exc)
            return f"simulation failed: {type(exc).__name__}: {first}"


def advise(
    profile: Profile | Profiler,
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
    the plan); the autocast rows of a profile that carries an operator trace are replayed
    from it (``"trace replay"``, :mod:`memprof.advisor.trace_replay`; ``prediction="trace"``
    asks for that alone); the others are analytic.

    ``profile`` may be the Profiler of a finished ``with memprof.profile(...) as prof`` block.
    """
    profile = as_profile(profile)
    if workload is not None and simulator is not None:
        raise ValueError("give a workload or a simulator, not both")
    model_at_hand = fake_model or workload
    prediction_given = prediction
    if prediction is None:
        prediction = "fake" if model_at_hand is not None else "analytic"
    if prediction not in ("fake", "analytic", "trace"):
        raise ValueError(
            f"prediction must be 'fake', 'analytic' or 'trace', not {prediction!r}")
    if prediction == "fake" and model_at_hand is None:
        raise ValueError("prediction='fake' needs the model: pass a workload or fake_model")
    facts = read_facts(profile)
    kept = zero_grad.gradient_use(facts).zeroed_in_place  # gradients never freed
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
    runner: PlanRunner | None = None
    options: dict[str, Any] = {}
    if prediction == "fake" and model_at_hand is not None:
        options = fake_options(profile)
        extra["fake_baseline_peak_bytes"] = fake_predict(model_at_hand, changes, faked,
                                                         **options)
        if extra["fake_baseline_peak_bytes"] is not None:  # fake runs work for this model
            # a plan of one change is that change's row: its run is not repeated
            ran: dict[tuple[int, ...], int] = {
                (id(c),): c.predicted_peak for c in changes
                if id(c) in faked and faked[id(c)] is None and c.predicted_peak is not None}
            runner = _plan_runner(model_at_hand, options, ran)
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
    traced = set()
    if prediction == "trace" or (prediction_given is None and prediction == "analytic"):
        for c in changes:  # replayed from the profile's operator trace, where it has one
            if c.applicable and c.trace_peak is not None and id(c) not in faked:
                c.predicted_peak = c.trace_peak
                traced.add(id(c))
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
            "trace replay" if id(c) in traced else
            "analytic" if c.predicted_peak is not None else None)
        if failure is not None:
            row["caveats"] = "; ".join(x for x in (row["caveats"], failure) if x)
    if facts.has_optimizer and (runner is not None or (workload is not None
                                                       and reference is not None)):
        real = workload if workload is not None else model_at_hand
        assert real is not None
        try:
            rows.extend(_batch_rows(real, reference if workload is not None else None, base,
                                    resolved, model=model_at_hand,
                                    fake=options if runner is not None else None))
        except Exception as exc:  # the batch rows' simulations fail alone, with their reason
            first = first_line(exc)
            rows.append({
                "technique": "batch", "options": {}, "applicable": False,
                "reason": f"simulation failed at another batch size: {type(exc).__name__}: "
                          f"{first} (do all the batch's tensors lead with the batch dimension?)",
                "baseline_peak_bytes": base, "how": "needs two measured batch sizes",
            })
    if prediction == "fake" and model_at_hand is not None and resolved is not None and (
            facts.has_optimizer):
        try:
            rows.append(max_batch.advice_row(model_at_hand, resolved, base, **options))
        except Exception as exc:  # the search fails alone, with its reason
            first = first_line(exc)
            rows.append({
                "technique": "batch", "options": {"largest_batch_that_fits": None},
                "applicable": False, "baseline_peak_bytes": base, "predicted_by": "fake run",
                "reason": f"the largest-batch search failed: {type(exc).__name__}: {first}",
                "how": "fake runs at doubling batch sizes, then bisection",
            })
    if extra.get("fake_prediction_stored"):
        rows.extend(stored_search_rows(profile.advice))
    gap_note = fake_baseline_gap(extra.get("fake_baseline_peak_bytes"), base)
    for row in rows:
        for key in ROW_KEYS:  # rows made outside _row (batch, largest batch) have every column
            row.setdefault(key, None)
        if gap_note and row["predicted_by"] == "fake run":
            row["caveats"] = "; ".join(x for x in (row["caveats"], gap_note) if x)
        row["cost"] = cost.cost_of(row["technique"], row.get("options"))
    rows.sort(key=_rank)
    plan = None
    if resolved is not None:
        plan = _plan(facts, changes, resolved, simulator, reference, runner)
        extra["budget"] = resolved[1]
        extra["usable_bytes"] = resolved[0]
    return Advice(
        rows=rows, plan=plan, baseline_peak_bytes=base, simulated=simulator is not None,
        extra=extra,
    )


#: How a row whose fake run cannot match the profile says so (see :func:`fake_baseline_gap`).
FAKE_BASELINE_GAP = "the fake run of the unchanged step peaks"


def fake_baseline_gap(fake_baseline: int | None, profiled: int) -> str | None:
    """Why fake-run predictions are off, when the fake run of the unchanged step peaks more
    than 1% away from the profiled peak (each such row carries the same difference); None
    when it does not. The known cause: under any dispatch mode (fake tensors run under one)
    autograd sums the gradients a tensor gets from several uses out of place, keeping one more
    buffer (a Mamba's scan: +5.7%, tests/test_tracking_patterns.py)."""
    if fake_baseline is None or not profiled or abs(fake_baseline - profiled) * 100 <= profiled:
        return None
    gap = fake_baseline - profiled
    return (f"{FAKE_BASELINE_GAP} {format_bytes(abs(gap))} {'above' if gap > 0 else 'below'} "
            f"the profiled one ({100.0 * gap / profiled:+.1f}%), and this prediction with it: "
            "a fake run runs under a dispatch mode, which changes some steps (autograd then "
            "sums a tensor's gradients from several uses out of place)")


def fake_options(profile: Profile) -> dict[str, Any]:
    """How fake runs must profile to compare with ``profile``: a ``memprof estimate`` of a CUDA
    step charges 512-byte blocks and models ``cuda``; a measured profile needs nothing."""
    device = profile.device
    if device.kind != "fake":
        return {}
    return {"round_to": max(1, int(device.allocation_rounding or 1)),
            "device": "cuda" if "cuda" in device.name else "cpu"}


def _plan_runner(
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


def _bound(run: Callable[[int], int], value: int) -> Callable[[], int]:
    return lambda: run(value)


def fake_predict(
    model: Workload, changes: list[Change], faked: dict[int, str | None], **options: Any
) -> int | None:
    """Set each applicable change's ``predicted_peak`` from a fake run of it; ``faked`` gets,
    per change tried, None or why its fake run failed. Returns the unchanged fake run's peak
    (None when even that fails: every row then stays analytic, with that reason)."""
    from memprof.advisor import parallel
    from memprof.advisor.fake_prediction import FakeRunError, fake_peak

    try:
        with seeded():
            reference = fake_peak(model, **options)
    except FakeRunError as exc:  # every row stays analytic, and says why
        for c in changes:
            if c.applicable and c.apply is not None:
                faked[id(c)] = f"no fake run of this step ({exc}); predicted analytically"
        return None
    tried = [c for c in changes if c.applicable and c.apply is not None]

    def run_of(change: Change) -> Callable[[], int]:
        def run() -> int:
            with seeded():
                return fake_peak(model, [change.apply], **options)
        return run

    # the rows are independent: on several cores where that is safe (advisor.parallel)
    outcomes = parallel.run_all([run_of(c) for c in tried])
    for c, outcome in zip(tried, outcomes, strict=True):
        if isinstance(outcome, FakeRunError):
            faked[id(c)] = f"{outcome}; predicted analytically"
        else:
            c.predicted_peak, faked[id(c)] = outcome, None
    return reference


#: The columns every advice row has (None where a row has nothing to say).
ROW_KEYS = (
    "technique", "options", "applicable", "reason", "baseline_peak_bytes",
    "predicted_peak_bytes", "predicted_saving_bytes", "saving_pct", "measured_peak_bytes",
    "error_pct", "quality", "step_time_ratio", "caveats", "how", "analytic_peak_bytes",
    "predicted_by", "not_simulated",
)


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


def _resize_apply(target: int, size: int) -> Callable[[Any], None]:
    def apply(state: Any) -> None:
        state.batch = batch.resize(state.batch, target, size)

    return apply


def _batch_rows(
    workload: Workload, ref: Measurement | None, base: int, resolved: tuple[int, str] | None,
    *, fake: dict[str, Any] | None = None, model: Workload | None = None,
) -> list[dict[str, Any]]:
    """Rows for twice the batch and for half the batch with two accumulation steps.

    With ``fake`` (fake_peak's options: the model is at hand) each row is predicted by a fake
    run of the step at its own batch, so a peak that is not linear in the batch (a contrastive
    loss's batch x batch logits, attention, an LSTM) is what the model's own code makes.
    Without it (no fake runs) the rows come from per-phase lines through the peaks measured at
    half the batch and at the batch (:class:`batch.BatchFit`), and with a budget a row gives
    the largest batch that line fits (with fake runs that is the bisection's row, #26). With
    ``ref`` (a simulation's unchanged run) each row is also measured (on ``workload``; the
    fake runs use ``model`` when given, else ``workload``)."""
    model = model or workload
    size = batch.batch_size(model.batch)
    if size is None or (size < 2 and fake is None):
        return [{
            "technique": "batch", "options": {}, "applicable": False,
            "reason": ("the batch has no leading batch dimension" if size is None else
                       "the batch has no leading batch dimension of 2 or more to fit from"),
            "baseline_peak_bytes": base, "how": "needs two batch sizes",
        }]
    targets: list[tuple[int, dict[str, Any]]] = [(2 * size, {"batch": 2 * size})]
    half = size // 2
    if half >= 1:
        targets.append((half, {"batch": size, "micro_batch": half, "accumulation": 2}))

    def fake_run(target: int) -> int:
        from memprof.advisor.fake_prediction import fake_peak

        with seeded():
            return fake_peak(model, [_resize_apply(target, size)], **(fake or {}))

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
            outcomes = parallel.run_all([_bound(fake_run, target) for target, _ in targets])
            for (target, _), outcome in zip(targets, outcomes, strict=True):
                if isinstance(outcome, FakeRunError):
                    raise outcome
                peaks[target] = outcome
            how = "a fake run of the step at this batch (the model's own code, nothing allocated)"
            by = "fake run"
        except FakeRunError as exc:
            if ref is None or size < 2:
                return [{
                    "technique": "batch", "options": {}, "applicable": False,
                    "reason": f"the batch rows are predicted by fake runs: {exc}",
                    "baseline_peak_bytes": base, "how": "a fake run at each batch",
                }]
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
        row: dict[str, Any] = {
            "technique": "batch",
            "options": options,
            "applicable": True,
            "reason": None,
            "baseline_peak_bytes": base,
            "predicted_peak_bytes": predicted,
            "predicted_saving_bytes": base - predicted,
            "saving_pct": 100.0 * (base - predicted) / base if base else 0.0,
            "predicted_by": by,
            "caveats": (
                "gradient accumulation keeps the effective batch; steps take about as long in total"
                if "accumulation" in options
                else "a larger batch changes optimization (scale the learning rate)"
            ),
            "how": how,
        }
        if ref is not None:
            if target == half and small is not None:
                _fill_measured(row, predicted, small, ref)
                row["caveats"] += "; measured at the fit's own point (not independent)"
            else:
                _fill_measured(row, predicted, measure(target), ref)
        rows.append(row)
    if resolved is not None and fit is not None:
        # with fake runs the largest batch is found by bisection of fake runs elsewhere (the
        # max_batch row, #26); here only the simulated two-point fit gives one
        rows.append(_largest_batch_row(resolved[0], base, fit, how))
    return rows


def _largest_batch_row(
    usable: int, base: int, fit: batch.BatchFit, how: str
) -> dict[str, Any]:
    largest = fit.largest_fitting(usable)
    predicted = fit.peak(largest) if largest else None
    return {
        "technique": "batch",
        "options": {"largest_batch_that_fits": largest},
        "applicable": largest > 0,
        "reason": None if largest else "batch 1 does not fit",
        "baseline_peak_bytes": base,
        "predicted_peak_bytes": predicted,
        "predicted_saving_bytes": base - predicted if predicted is not None else None,
        "saving_pct": None,
        "caveats": "extrapolated from the two-point fit",
        "predicted_by": "measured simulation",
        "how": how,
    }


#: Combinations the planner runs as a whole on fake tensors before it gives up: each run of a
#: 7B-shaped model costs seconds.
MAX_PLAN_RUNS = 4

#: Runs a combination of changes on fake tensors and returns its step peak (raises
#: :class:`~memprof.advisor.fake_prediction.FakeRunError` when it cannot run).
PlanRunner = Callable[[tuple[Change, ...]], int]


def _plan(
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
                      explanation=_no_plan(facts, changes, text, runs, unrunnable))
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


def _no_plan(
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


__all__ = ["Advice", "Simulator", "Workload", "WorkloadSimulator", "advise"]
