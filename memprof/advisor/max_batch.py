"""The largest batch (or sequence length) that fits a budget, found by fake runs.

Like accelerate's ``find_executable_batch_size`` without its crashes: the step is run on fake
tensors (nothing is allocated, see :mod:`memprof.advisor.fake_prediction` and
:func:`memprof.estimate.estimate`) at sizes doubling from 1 until one does not fit, then the
last gap is bisected. The peak is taken to grow with the size (activations, inputs and the
step's scratch do), so the answer is the largest size whose fake peak fits; a size whose fake
run fails for another reason than memory (a sequence longer than the model's positions) ends
the search below it, and the result says why.

A real run bisected under the same limit finds the same size, or one more: a fake run charges
the CPU kernels' scratch as memprof models it, so it can be a few bytes over the real peak at
the boundary (tests/test_advisor_max_batch.py checks it on a real CPU bisection).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from memprof.advisor import batch as batch_sizes
from memprof.advisor.rows import AdviceRow
from memprof.advisor.workload import Workload
from memprof.errors import first_line

#: The search stops here (a size this large that still fits is reported as "at least").
DEFAULT_CAP = 1 << 16


@dataclass(frozen=True)
class Largest:
    """The search's answer: ``size`` fits (0 when even 1 does not), ``size + 1`` does not
    unless ``capped`` (the cap fits) or ``stopped`` (why larger sizes could not be tried)."""

    size: int
    peak_bytes: int | None
    limit_bytes: int
    tried: dict[int, int | None] = field(default_factory=dict)  # size -> peak (None: failed)
    capped: bool = False
    stopped: str | None = None

    @property
    def runs(self) -> int:
        return len(self.tried)

    def describe(self, what: str = "batch") -> str:
        if self.size == 0:
            return f"{what} 1 failed to run: {self.stopped}" if self.stopped else (
                f"{what} 1 does not fit")
        text = f"largest {what} that fits: {self.size}"
        if self.capped:
            text = f"{what} {self.size} fits (the search stops there)"
        if self.stopped:
            text += f" (larger ones not run: {self.stopped})"
        return f"{text}; {self.runs} fake runs"


def search(measure: Callable[[int], tuple[bool, int]], limit: int, *,
           start: int = 1, cap: int = DEFAULT_CAP) -> Largest:
    """The largest n in [1, cap] that ``measure(n)`` says fits (it returns whether it fits and
    the peak): doubling from ``start`` while it fits, then bisection of the last gap.
    ``measure`` raising stops the search below that size (the reason is kept). ``limit`` is
    recorded for the answer's reader."""
    tried: dict[int, int | None] = {}
    stopped: str | None = None

    def fits(n: int) -> bool:
        nonlocal stopped
        try:
            ok, tried[n] = measure(n)
        except Exception as exc:  # not memory: a size the model cannot run
            tried[n] = None
            first = first_line(exc)
            stopped = f"size {n}: {type(exc).__name__}: {first}"[:300]
            return False
        return ok

    low, high = 0, max(1, min(start, cap))  # low fits (0: nothing yet), high is to try
    while high <= cap and fits(high):
        low, high = high, high * 2
    if high > cap:  # everything tried up to the cap fits
        if low < cap and fits(cap):
            low = cap
        return Largest(low, tried[low], limit, tried, capped=low == cap, stopped=stopped)
    while high - low > 1:  # low fits, high does not
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    if tried.get(high) is not None:
        stopped = None  # the search ended on memory, not on a failure further up
    return Largest(low, tried.get(low) if low else None, limit, tried, stopped=stopped)


def resize_sequence(data: Any, length: int, original: int) -> Any:
    """``data`` cut or tiled along dim 1 to ``length`` where dim 1 is ``original`` long
    (token ids, labels, attention masks of a (batch, sequence) batch)."""
    if isinstance(data, torch.Tensor):
        if data.dim() < 2 or data.shape[1] != original:
            return data
        reps = -(-length // original)
        tiled = data.repeat(1, reps, *([1] * (data.dim() - 2))) if reps > 1 else data
        return tiled[:, :length].clone()
    if isinstance(data, dict):
        return {k: resize_sequence(v, length, original) for k, v in data.items()}
    if isinstance(data, tuple | list):
        return type(data)(resize_sequence(v, length, original) for v in data)
    return data


def sequence_length(data: Any) -> int | None:
    """Dim 1 of the batch's first integer tensor of two or more dims (token ids)."""
    if isinstance(data, torch.Tensor):
        return int(data.shape[1]) if data.dim() >= 2 and not data.is_floating_point() else None
    values = data.values() if isinstance(data, dict) else data if isinstance(
        data, tuple | list) else ()
    for v in values:
        found = sequence_length(v)
        if found is not None:
            return found
    return None


def resized(workload: Workload, n: int, *, along: str = "batch") -> Workload:
    """The workload with its batch resized to ``n`` rows (``along="batch"``) or tokens
    (``along="sequence"``)."""
    if along == "batch":
        size = batch_sizes.batch_size(workload.batch)
        if size is None:
            raise ValueError("the batch has no leading batch dimension")
        return dataclasses.replace(workload, batch=batch_sizes.resize(workload.batch, n, size))
    if along == "sequence":
        length = sequence_length(workload.batch)
        if length is None:
            raise ValueError("the batch has no (batch, sequence) integer tensor")
        return dataclasses.replace(workload, batch=resize_sequence(workload.batch, n, length))
    raise ValueError(f"along must be 'batch' or 'sequence', not {along!r}")


def largest_for_workload(
    workload: Workload, limit: int, *, along: str = "batch", start: int = 1,
    cap: int = DEFAULT_CAP, applies: list[Any] | None = None, **fake_options: Any,
) -> Largest:
    """The largest batch (or sequence length) of ``workload`` whose fake-run peak is at most
    ``limit`` bytes (``applies``: changes' ``apply`` run on each fake copy, e.g. LoRA;
    ``fake_options``: :func:`~memprof.advisor.fake_prediction.fake_peak`'s rounding and device,
    as the advisor's other fake runs use them)."""
    from memprof.advisor.fake_prediction import fake_peak
    from memprof.advisor.workload import seeded

    resized(workload, 1, along=along)  # says now when the batch cannot be resized

    def measure(n: int) -> tuple[bool, int]:
        with seeded():
            peak = fake_peak(resized(workload, n, along=along), applies, **fake_options)
        return peak <= limit, peak

    return search(measure, limit, start=start, cap=cap)


def largest_for_estimate(
    spec: Any, *, gpu: str, batch_size: int, seq_len: int, along: str = "batch",
    cap: int = DEFAULT_CAP, **options: Any,
) -> tuple[Largest, Any]:
    """The largest batch (the sequence length fixed at ``seq_len``) or sequence length
    (``along="sequence"``, the batch fixed at ``batch_size``) whose :func:`memprof.estimate.
    estimate` fits ``gpu`` (its fit verdict: the tensors within what the GPU leaves usable),
    and the profile of that size (None when none fits). ``options`` go to ``estimate``."""
    from memprof.estimate import estimate
    from memprof.gpus import resolve_budget

    resolve_budget(gpu)  # a bad name is the user's error, not a size that does not fit
    fitting: dict[str, Any] = {}

    def measure(n: int) -> tuple[bool, int]:
        b, s = (n, seq_len) if along == "batch" else (batch_size, n)
        profile = estimate(spec, batch=lambda: spec.make_batch(b, s), gpu=gpu, **options)
        fit = profile.meta["estimate"]["fit"]
        if fit["fits"] and n > fitting.get("size", 0):
            fitting.update(size=n, profile=profile, usable=int(fit["usable_bytes"]))
        fitting.setdefault("first_usable", int(fit["usable_bytes"]))
        return bool(fit["fits"]), int(profile.peak().total_bytes)

    result = search(measure, 0, start=batch_size if along == "batch" else seq_len, cap=cap)
    # what the GPU leaves usable depends a little on each run's allocator replay: the answer
    # keeps the one of the size found
    usable = fitting.get("usable", fitting.get("first_usable", 0))
    return dataclasses.replace(result, limit_bytes=int(usable)), fitting.get("profile")


def advice_row(workload: Workload, resolved: tuple[int, str], baseline: int,
               **fake_options: Any) -> AdviceRow:
    """The advisor's row: the largest batch whose fake run fits the budget's usable bytes,
    searched from the workload's own batch size (``fake_options`` as the other rows' runs)."""
    usable, text = resolved
    size = batch_sizes.batch_size(workload.batch)
    how = "fake runs at doubling batch sizes, then bisection"
    if size is None:
        return AdviceRow(
            technique="batch", options={"largest_batch_that_fits": None}, applicable=False,
            reason="the batch has no leading batch dimension to resize",
            baseline_peak_bytes=baseline, predicted_by="fake run", how=how)
    found = largest_for_workload(workload, usable, start=size, cap=max(64 * size, 1024),
                                 **fake_options)
    peak = found.peak_bytes
    return AdviceRow(
        technique="batch",
        options={"largest_batch_that_fits": found.size, "found_by": "fake runs"},
        applicable=found.size > 0,
        reason=None if found.size else f"batch 1 does not fit {text}",
        baseline_peak_bytes=baseline,
        predicted_peak_bytes=peak,
        predicted_saving_bytes=baseline - peak if peak is not None else None,
        saving_pct=None,
        caveats="; ".join(x for x in (
            found.describe(), found.stopped and "larger sizes failed to run",
            "a larger batch changes optimization (scale the learning rate)") if x),
        predicted_by="fake run",
        how=how,
    )
