"""The pattern zoo's targets table (benchmarks/patterns.py): each target's verdict per pattern
from its rows, and a one-line reason for every pattern ``estimate`` cannot run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.patterns import PATTERNS, target_verdicts


def _row(backend: str, **changes: Any) -> dict[str, Any]:
    row = {"pattern": "p", "backend": backend, "crash": "no", "peak_err_pct": 0.0,
           "peak_err_bytes": 0, "worst": 1, "persistent": 100, "hand": 100, "bitwise": True,
           "freed": "yes", "hooks_left": False, "peak_total": 1000}
    row.update(changes)
    return row


def test_each_target_says_ok_or_what_misses() -> None:
    """GIVEN an events row within every target but its estimate (2% over the run, 0.99% over
    the run under a dispatch mode) and a dispatch row 0.2% above the allocator at step 2 (as
    much as a no-op dispatch mode changes the run), 4 bytes over the hand count and not
    bitwise, as under a no-op dispatch mode WHEN judged THEN each verdict names the backend,
    the figure and the mode where it explains it."""
    rows = [_row("events", estimate=1020),
            _row("dispatch", peak_err_pct=0.2, peak_err_bytes=2, worst=2, persistent=104,
                 bitwise=False, bitwise_as_mode=True, mode_pct=0.2, peak_total=1010)]
    v = target_verdicts(rows)
    assert v == {
        "crash": "ok",
        "peak": "dispatch +0.200% (+2 B, step 2), as a no-op dispatch mode changes the run",
        "persistent": "dispatch +4 B", "alive": "ok",
        "bitwise": "dispatch NO (as a no-op dispatch mode's run)",
        "estimate": "MISS +2.000% (vs the run under a dispatch mode, as the estimate's: "
                    "+0.990%)"}
    assert target_verdicts([_row("events", estimate=1009.9)])["estimate"] == "ok +0.990%"


def test_a_crash_an_alive_model_and_a_left_hook_are_misses() -> None:
    rows = [_row("events", freed="ALIVE", hooks_left=True, estimate="refused: why"),
            {"pattern": "p", "backend": "dispatch", "crash": "RuntimeError: boom"}]
    v = target_verdicts(rows)
    assert v["crash"] == "dispatch: RuntimeError: boom"
    assert v["alive"] == "events ALIVE, hooks LEFT"
    assert v["estimate"] == "refused: why"
    assert target_verdicts([_row("events", freed="gc (as unprofiled)")])["alive"] == "ok"


def test_every_pattern_estimate_cannot_run_says_why() -> None:
    """GIVEN the patterns that build without optional packages WHEN their loops are built THEN
    each either gives estimate its batch and loss, or a reason (it said "the loop's step is
    not estimate's (see _simple)" for seven of them)."""
    for pattern in PATTERNS:
        if pattern.needs or pattern.name == "ddp-no-sync":  # a gloo group of its own
            continue
        estimate = pattern.build().estimate
        assert isinstance(estimate, dict) or ("estimate" in estimate and len(estimate) > 30), (
            pattern.name, estimate)
