"""The pattern zoo (benchmarks/patterns.py) meets the issue's targets on its fast patterns:
no crash, the peak equal to the allocator's own events (events backend), persistent bytes equal
to a hand count, results bitwise unchanged, the model freed and no hook left."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.patterns import PATTERNS, check

pytestmark = pytest.mark.slow  # the pattern zoo, profiled on both backends

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
