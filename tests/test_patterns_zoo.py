"""The pattern zoo (benchmarks/patterns.py) meets the issue's targets on its fast patterns:
no crash, the peak equal to the allocator's own events (events backend), persistent bytes equal
to a hand count, results bitwise unchanged, the model freed and no hook left."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

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


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers")
def test_ctc_is_exact_on_both_backends_with_layerdrop_off() -> None:
    """The CTC pattern runs wav2vec2 with LayerDrop off (with it on, 0.1 by default, each step
    skipped encoder layers at random, so the real peak depended on the draws and no estimate
    could match it). Every step now peaks in attention's forward; with LayerDrop on, step 1
    skipped layers and peaked inside the positional convolution's backward, whose kernel
    scratch no dispatch-level profiler sees (-16.8% on the dispatch backend, a test bounded it
    by that scratch). Both backends now measure the allocator's peak to a scalar."""
    pattern = next(p for p in PATTERNS if p.name == "ctc-speech")
    events, dispatch = check(pattern, 3, ["events", "dispatch"])
    assert events["peak_err_bytes"] == 0
    assert abs(dispatch["peak_err_bytes"]) <= 16
    assert dispatch["persistent"] == dispatch["hand"]


def test_the_reference_sees_the_free_of_a_block_made_before_the_steps() -> None:
    """GIVEN DDP, whose constructor makes the first gradient bucket and whose reducer frees it
    in step 1 when it rebuilds its buckets WHEN the allocator's events are read THEN that free
    counts (the event source reports no free of a block allocated before it started: step 1
    read 37,408 B high, which made the dispatch backend look 14.3% low) and both backends are
    exact to a scalar."""
    pattern = next(p for p in PATTERNS if p.name == "ddp-no-sync")
    truth = allocator_steps(pattern, 3)
    # Equal to a few bytes: the first DDP loop built after a torch.compile'd run in the same
    # process (tests/test_advisor_patterns.py's compiled-model test) holds 20 B more at step 1
    # (102,984 B against 102,964 B; once in CI 4 B), then never again: the allocator's own
    # events, in no operator's output (a logging dispatch mode saw the same operators and
    # shapes both times), so memory a kernel or DDP's C++ reducer takes below the operators,
    # once; not identified further. The defect this test guards was 37,408 B.
    assert abs(truth[1] - truth[2]) <= 32
    # (the events backend too: it read the bucket's 37,408 B high at step 1, #25)
    for row in check(pattern, 3, ["events", "dispatch"]):
        assert abs(row["peak_err_bytes"]) <= 32
        assert row["persistent"] == row["hand"]


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
