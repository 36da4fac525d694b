"""The public facade: what ``import memprof`` gives, and what its functions accept.

GIVEN the object of ``with memprof.profile(...) as prof`` (a Profiler), WHEN it is passed to
a function that reads a profile, THEN it reads the Profiler's finished ``.profile``; anything
else is a TypeError that says what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import memprof
from memprof.snapshot.chrome_trace import to_trace
from memprof.snapshot.memory_viz import to_snapshot


def _run(width: int = 64) -> memprof.Profiler:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 4))
    opt = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
    with memprof.profile(model, opt) as prof:
        for _ in range(2):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            prof.step()
    return prof


@pytest.fixture(scope="module")
def prof() -> memprof.Profiler:
    return _run()


def test_advise_takes_the_profiler(prof: memprof.Profiler) -> None:
    from_profiler = memprof.advise(prof, prediction="analytic")
    from_profile = memprof.advise(prof.profile, prediction="analytic")
    columns = ["technique", "options", "predicted_peak_bytes"]
    assert len(from_profiler.rows) > 0
    assert from_profiler.table()[columns].equals(from_profile.table()[columns])


def test_report_takes_the_profiler(prof: memprof.Profiler, tmp_path: Path) -> None:
    written = memprof.report(prof, tmp_path / "run.html")
    assert written == tmp_path / "run.html"
    text = written.read_text(encoding="utf-8")
    assert text == memprof.report(prof.profile, tmp_path / "same.html").read_text(encoding="utf-8")
    assert "<html" in text


def test_compare_takes_profilers(prof: memprof.Profiler) -> None:
    wider = _run(width=256)
    table = memprof.compare(prof, wider)
    same = memprof.compare(prof.profile, wider.profile)
    assert table.equals(same)
    peak = table[(table.section == "peak") & (table.category == "total")]
    assert int(peak.delta_bytes.iloc[0]) > 0  # the wider model peaks higher
    mixed = memprof.compare(prof, prof.profile)
    assert (mixed.delta_bytes == 0).all()


def test_exports_take_the_profiler(prof: memprof.Profiler) -> None:
    assert json.dumps(to_trace(prof)) == json.dumps(to_trace(prof.profile))
    assert to_snapshot(prof) == to_snapshot(prof.profile)


@pytest.mark.parametrize("value", ["reports/run.json", None, {"peak": 1}])
def test_anything_else_is_a_type_error(value: object, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="must be a memprof Profile"):
        memprof.advise(value)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a memprof Profile"):
        memprof.report(value, tmp_path / "x.html")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^b must be a memprof Profile"):
        memprof.compare(_run().profile, value)  # type: ignore[arg-type]
    assert not (tmp_path / "x.html").exists()


def test_inside_the_block_the_profile_is_not_ready() -> None:
    model = nn.Linear(4, 4)
    with memprof.profile(model) as prof:
        model(torch.randn(2, 4)).sum().backward()
        with pytest.raises(RuntimeError, match="ready when"):
            memprof.advise(prof)
