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
    batch_rows,
    budget_plan,
    checkpointing,
    lora,
    master_weights,
    max_batch,
    mixed_precision,
    offload,
    optimizer,
    pruning,
    qlora,
    quantization,
    sharding,
    zero_grad,
)
from memprof.advisor.advice import Advice, row_key, stored_fake_peaks, stored_search_rows
from memprof.advisor.core import Change, Facts, predict_peak, read_facts
from memprof.advisor.rows import AdviceRow, change_row, rank
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
    resolved = read_budget(budget, cached_bytes=replay_cached_bytes(profile.allocator_summary()))
    base = facts.peak_bytes
    measured: dict[int, Measurement | str] = {}
    extra: dict[str, Any] = {}
    analytic = {id(c): c.predicted_peak for c in changes}
    faked: dict[int, str | None] = {}
    runner: budget_plan.PlanRunner | None = None
    options: dict[str, Any] = {}
    batch_outcomes: dict[int, Any] = {}
    if prediction == "fake" and model_at_hand is not None:
        options = fake_options(profile)
        # the batch rows' fake runs (twice the batch, half of it) share out with the others
        batch_runs = (batch_rows.fake_runs(model_at_hand, options) if facts.has_optimizer
                      else {})
        extra["fake_baseline_peak_bytes"] = fake_predict(
            model_at_hand, changes, faked, more=batch_runs, more_outcomes=batch_outcomes,
            **options)
        if extra["fake_baseline_peak_bytes"] is not None:  # fake runs work for this model
            # a plan of one change is that change's row: its run is not repeated
            ran: dict[tuple[int, ...], int] = {
                (id(c),): c.predicted_peak for c in changes
                if id(c) in faked and faked[id(c)] is None and c.predicted_peak is not None}
            runner = budget_plan.plan_runner(model_at_hand, options, ran)
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
    rows: list[AdviceRow] = []
    for c in changes:
        failure = faked.get(id(c))
        row = dataclasses.replace(
            change_row(c, base, measured.get(id(c)), reference),
            analytic_peak_bytes=analytic[id(c)],
            predicted_by="fake run" if id(c) in faked and failure is None else (
                "trace replay" if id(c) in traced else
                "analytic" if c.predicted_peak is not None else None))
        rows.append(row.with_caveat(failure) if failure is not None else row)
    if facts.has_optimizer and (runner is not None or (workload is not None
                                                       and reference is not None)):
        real = workload if workload is not None else model_at_hand
        assert real is not None
        try:
            rows.extend(batch_rows.advice_rows(
                real, reference if workload is not None else None, base, resolved,
                model=model_at_hand, fake=options if runner is not None else None,
                fake_outcomes=batch_outcomes or None))
        except Exception as exc:  # the batch rows' simulations fail alone, with their reason
            first = first_line(exc)
            rows.append(AdviceRow(
                technique="batch", options={}, applicable=False,
                reason=f"simulation failed at another batch size: {type(exc).__name__}: "
                       f"{first} (do all the batch's tensors lead with the batch dimension?)",
                baseline_peak_bytes=base, how="needs two measured batch sizes",
            ))
    if prediction == "fake" and model_at_hand is not None and resolved is not None and (
            facts.has_optimizer):
        try:
            rows.append(max_batch.advice_row(model_at_hand, resolved, base, **options))
        except Exception as exc:  # the search fails alone, with its reason
            first = first_line(exc)
            rows.append(AdviceRow(
                technique="batch", options={"largest_batch_that_fits": None},
                applicable=False, baseline_peak_bytes=base, predicted_by="fake run",
                reason=f"the largest-batch search failed: {type(exc).__name__}: {first}",
                how="fake runs at doubling batch sizes, then bisection",
            ))
    if extra.get("fake_prediction_stored"):
        rows.extend(AdviceRow.from_dict(row) for row in stored_search_rows(profile.advice))
    gap_note = fake_baseline_gap(extra.get("fake_baseline_peak_bytes"), base)
    if gap_note:
        rows = [row.with_caveat(gap_note) if row.predicted_by == "fake run" else row
                for row in rows]
    rows = [dataclasses.replace(row, cost=cost.cost_of(row.technique, row.options))
            for row in rows]
    rows.sort(key=rank)
    plan = None
    if resolved is not None:
        plan = budget_plan.plan_for(facts, changes, resolved, simulator, reference, runner)
        extra["budget"] = resolved[1]
        extra["usable_bytes"] = resolved[0]
    return Advice(
        rows=rows, plan=plan, baseline_peak_bytes=base,
        simulated=simulator is not None, extra=extra,
    )


#: How a row whose fake run cannot match the profile says so (see :func:`fake_baseline_gap`).
FAKE_BASELINE_GAP = "the fake run of the unchanged step peaks"


def fake_baseline_gap(fake_baseline: int | None, profiled: int) -> str | None:
    """Why fake-run predictions are off, when the fake run of the unchanged step peaks more
    than 1% away from the profiled peak (each such row carries the same difference); None
    when it does not. Known causes: a profile by the dispatch backend, whose run under a
    dispatch mode has autograd sum a tensor's gradients out of place (fake runs sum them in
    place where a real run would: memprof.estimate.grad_accumulation); sizes that depend on
    values; kernel scratch the fake run does not model."""
    if fake_baseline is None or not profiled or abs(fake_baseline - profiled) * 100 <= profiled:
        return None
    gap = fake_baseline - profiled
    return (f"{FAKE_BASELINE_GAP} {format_bytes(abs(gap))} {'above' if gap > 0 else 'below'} "
            f"the profiled one ({100.0 * gap / profiled:+.1f}%), and this prediction with it "
            "(sizes that depend on values, kernel scratch not modelled, or a profile by the "
            "dispatch backend, whose mode makes autograd sum gradients out of place)")


def fake_options(profile: Profile) -> dict[str, Any]:
    """How fake runs must profile to compare with ``profile``: a ``memprof estimate`` of a CUDA
    step charges 512-byte blocks and models ``cuda``; a measured profile needs nothing."""
    device = profile.device
    if device.kind != "fake":
        return {}
    return {"round_to": max(1, int(device.allocation_rounding or 1)),
            "device": "cuda" if "cuda" in device.name else "cpu"}


#: A technique's fake run against the unchanged one's, about (benchmarks/fake_speed.py's rows on
#: GPT-2 small and Llama-2-7B: QLoRA quantizes every target to NF4, LoRA and sharding wrap
#: every layer): the costliest runs are shared out first (:func:`parallel.run_all`).
FAKE_RUN_COST = {"qlora": 4.0, "lora": 2.0, "sharding": 2.0}
#: Modules a technique's fake run imports (see :func:`parallel.run_all`'s ``imports``).
FAKE_RUN_IMPORTS = {"lora": ("peft",), "qlora": ("peft",)}
#: A row composed in the shared run of the unchanged step (fake_prediction.fake_peaks: its
#: optimizer's state and step alone) against a whole run, about (GPT-2 small: 7 rows 0.9 s
#: beside the unchanged run's 0.45 s).
SHARED_ROW_COST = 0.3


def _leaves_step_unchanged(change: Change, model: Workload) -> bool:
    """Whether ``change`` says it leaves ``model``'s step as it was (:attr:`Change
    .unchanged_step`); a check that cannot tell (a name the workload's model lacks) says no,
    and the change's own run then says what fails."""
    if change.unchanged_step is None:
        return False
    try:
        return bool(change.unchanged_step(model))
    except Exception:
        return False


def fake_predict(
    model: Workload, changes: list[Change], faked: dict[int, str | None], *,
    more: dict[Any, Callable[[], int]] | None = None,
    more_outcomes: dict[Any, Any] | None = None, **options: Any
) -> int | None:
    """Set each applicable change's ``predicted_peak`` from a fake run of it; ``faked`` gets,
    per change tried, None or why its fake run failed. Returns the unchanged fake run's peak
    (None when even that fails: every row then stays analytic, with that reason). ``more``:
    other fake runs (the batch rows'), run beside the rows', their outcomes put in
    ``more_outcomes`` by the same keys."""
    from memprof.advisor import parallel
    from memprof.advisor.fake_prediction import (
        FakeRunError,
        fake_peak,
        fake_peaks,
        optimizer_only_rows,
    )

    tried = [c for c in changes if c.applicable and c.apply is not None]
    # a change that leaves the step as it was (Change.unchanged_step) has the unchanged run's
    # peak: it is not run again
    same = [c for c in tried if _leaves_step_unchanged(c, model)]
    tried = [c for c in tried if not any(c is s for s in same)]
    # the rows that change the optimizer alone share the unchanged run's forward and backward:
    # one run (the first, made here), beside the other rows' own runs
    grouped = set(optimizer_only_rows(model, [[c.apply] for c in tried]))
    group = [c for i, c in enumerate(tried) if i in grouped]
    alone = [c for i, c in enumerate(tried) if i not in grouped]

    def shared_run() -> tuple[int | None, ...]:
        with seeded():
            reference, peaks = fake_peaks(model, [[c.apply] for c in group], **options)
        return (reference, *peaks)

    def run_of(change: Change) -> Callable[[], int]:
        def run() -> int:
            with seeded():
                return fake_peak(model, [change.apply], **options)
        return run

    def costs(changes: list[Change]) -> list[float]:
        return [FAKE_RUN_COST.get(c.technique, 1.0) for c in changes]

    # the runs are independent: on several cores where that is safe (advisor.parallel)
    extra = list((more or {}).items())
    runs: list[Callable[[], parallel.Peaks]] = [shared_run, *(run_of(c) for c in alone),
                                                *(run for _, run in extra)]
    imports = sorted({name for c in alone for name in FAKE_RUN_IMPORTS.get(c.technique, ())})
    outcomes = parallel.run_all(runs, costs=[1.0 + SHARED_ROW_COST * len(group), *costs(alone),
                                             *(1.0 for _ in extra)], imports=imports)
    if extra:
        if more_outcomes is not None:
            more_outcomes.update(zip((key for key, _ in extra), outcomes[-len(extra):],
                                     strict=True))
        outcomes = outcomes[:-len(extra)]
    first = outcomes[0]
    if isinstance(first, FakeRunError):  # every row stays analytic, and says why
        for c in [*tried, *same]:
            faked[id(c)] = f"no fake run of this step ({first}); predicted analytically"
        return None
    assert isinstance(first, tuple) and isinstance(first[0], int)
    reference, peaks = first[0], first[1:]
    for c in same:
        c.predicted_peak, faked[id(c)] = reference, None
    for c, peak in zip(group, peaks, strict=True):
        if peak is not None:
            c.predicted_peak, faked[id(c)] = peak, None
    left = [c for c, peak in zip(group, peaks, strict=True) if peak is None]
    ran = list(zip(alone, outcomes[1:], strict=True))
    if left:  # rows the shared run could not compose: each its own run
        ran += zip(left, parallel.run_all([run_of(c) for c in left], costs=costs(left)),
                   strict=True)
    for c, outcome in ran:
        if isinstance(outcome, FakeRunError):
            faked[id(c)] = f"{outcome}; predicted analytically"
        else:
            assert isinstance(outcome, int)
            c.predicted_peak, faked[id(c)] = outcome, None
    return reference


__all__ = ["Advice", "Simulator", "Workload", "WorkloadSimulator", "advise"]
