"""The pattern zoo (benchmarks/patterns.py) meets the issue's targets on its fast patterns:
no crash, the peak equal to the allocator's own events (events backend), persistent bytes equal
to a hand count, results bitwise unchanged, the model freed and no hook left."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.patterns import PATTERNS, advice_verdict, allocator_steps, check

pytestmark = pytest.mark.slow  # the pattern zoo, profiled on both backends

@pytest.fixture(autouse=True)
def _no_process_group_left() -> Iterator[None]:
    """The DDP pattern starts a one-rank gloo group and keeps it for the next DDP pattern (a
    benchmark run is one process); a test ends it, so later tests can start their own."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


FAST = ["sparse-embedding", "dead-branch", "gan-two-optimizers", "grad-accumulation",
        "chunked-loss"]


@pytest.mark.parametrize("name", FAST)
def test_a_pattern_meets_the_targets(name: str) -> None:
    pattern = next(p for p in PATTERNS if p.name == name)
    rows = check(pattern, 3, ["events", "dispatch"])
    assert [r["crash"] for r in rows] == ["no", "no"]
    for row in rows:
        assert row["persistent"] == row["hand"]
        assert row["bitwise"]
        assert row["freed"] == "yes"
        assert not row["hooks_left"]
        assert abs(row["peak_err_pct"]) <= (0.0 if row["backend"] == "events" else 0.1)


def _positional_convolution_backward_scratch() -> int:
    """Bytes the CPU kernel of wav2vec2's positional convolution backward (the CTC pattern's
    shapes: 64 channels, 2 groups, kernel 16, 399 frames) holds beyond its outputs, measured
    by running it once under the allocation recorder."""
    from memprof.tracking.kernel_corrections import KernelCorrections

    aten = torch.ops.aten
    args = (torch.zeros(2, 64, 400), torch.zeros(2, 64, 399), torch.zeros(64, 32, 16), [64],
            [1], [8], [1], False, [0], 2, [True, True, True])
    memory = KernelCorrections().memory(aten.convolution_backward.default, args, {})
    assert memory is not None
    return memory.transient


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers")
def test_ctc_on_the_dispatch_backend_misses_only_a_convolution_backwards_scratch() -> None:
    """Step 1's peak falls inside the positional convolution's backward, whose kernel scratch
    is no operator's output: the dispatch backend sees less by at most that scratch (the
    events backend, which reads the allocator, is exact)."""
    pattern = next(p for p in PATTERNS if p.name == "ctc-speech")
    events, dispatch = check(pattern, 3, ["events", "dispatch"])
    assert events["peak_err_bytes"] == 0
    assert dispatch["worst"] == 1
    scratch = _positional_convolution_backward_scratch()
    assert 0 < -dispatch["peak_err_bytes"] <= scratch
    assert dispatch["persistent"] == dispatch["hand"]
    assert dispatch["mode_pct"] == 0.0  # the mode does not change the run: memprof misses it


def test_the_reference_sees_the_free_of_a_block_made_before_the_steps() -> None:
    """GIVEN DDP, whose constructor makes the first gradient bucket and whose reducer frees it
    in step 1 when it rebuilds its buckets WHEN the allocator's events are read THEN that free
    counts (the event source reports no free of a block allocated before it started: step 1
    read 37,408 B high, which made the dispatch backend look 14.3% low) and the dispatch
    backend is exact to a scalar."""
    pattern = next(p for p in PATTERNS if p.name == "ddp-no-sync")
    truth = allocator_steps(pattern, 3)
    # equal to a scalar: once in CI, after other tests in the same process, step 1 held one
    # 4-byte tensor more (state some earlier test made lazily); the defect was 37,408 B
    assert abs(truth[1] - truth[2]) <= 16
    (dispatch,) = check(pattern, 3, ["dispatch"])
    assert abs(dispatch["peak_err_bytes"]) <= 16
    assert dispatch["persistent"] == dispatch["hand"]


def test_an_advice_row_is_within_explained_failed_or_off() -> None:
    """The --advice verdicts: a row off by more than 3% is explained only by its own reason
    (the fake run's gap to the profile), a raised simulation is a failure, not a reason."""
    from memprof.advisor import FAKE_BASELINE_GAP

    row = {"applicable": True, "predicted_peak_bytes": 103, "measured_peak_bytes": 100}
    assert advice_verdict({**row, "error_pct": 3.0})[0] == "within"
    assert advice_verdict({**row, "error_pct": 3.1})[0] == "off"
    gap = f"{FAKE_BASELINE_GAP} 5 MiB above the profiled one (+6.0%)"
    assert advice_verdict({**row, "error_pct": 6.0, "caveats": gap})[0] == "explained"
    failed = {**row, "caveats": "simulation failed: RuntimeError: boom"}
    assert advice_verdict(failed)[0] == "failed"
    assert advice_verdict({**row, "not_simulated": "no CUDA allocator"})[0] == "explained"
    assert advice_verdict({"applicable": False, "reason": "no Linear"})[0] == "explained"
    assert advice_verdict({"applicable": True})[0] == "off"
