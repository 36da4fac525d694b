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


def test_reprs_are_one_short_line(prof: memprof.Profiler) -> None:
    """GIVEN a finished profile, its peak and its advice WHEN printed at a prompt THEN each is
    one line with its figures (before: the dataclass reprs of Advice and Peak spelled out every
    row, module and tensor, thousands of characters; the Profiler's said nothing)."""
    from memprof.units import format_bytes

    advice = memprof.advise(prof, prediction="analytic")
    best = advice.best()
    assert best is not None
    applicable = sum(1 for r in advice.rows if r["applicable"])
    texts = {
        "profile": repr(prof.profile),
        "profiler": repr(prof),
        "advice": repr(advice),
        "peak": repr(prof.peak()),
    }
    for text in texts.values():
        assert "\n" not in text and len(text) < 300, text
    assert format_bytes(prof.peak().total_bytes) in texts["profile"]
    assert texts["profiler"] == f"Profiler(finished: {texts['profile']})"
    peak = prof.peak()
    assert texts["peak"].startswith(f"Peak({format_bytes(peak.total_bytes)} at step {peak.step}")
    assert f"parameter {format_bytes(peak.by_category['parameter'])}" in texts["peak"]
    assert texts["peak"].endswith(f"; {len(peak.top_tensors)} top tensors)")
    assert texts["advice"].startswith(
        f"Advice(baseline={format_bytes(advice.baseline_peak_bytes)}, "
        f"rows={len(advice.rows)} ({applicable} applicable), best={best['technique']} (")
    assert texts["advice"].endswith("plan=none)")
    model = nn.Linear(4, 4)
    running = memprof.profile(model)
    assert repr(running) == "Profiler(not started)"
    with running:
        model(torch.randn(2, 4)).sum().backward()
        running.step()
        assert repr(running).startswith("Profiler(running: step 1, backend ")


LIGHT_IMPORT = """
import json, sys
import memprof
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "memprof")
print(json.dumps({"loaded": loaded, "pandas": "pandas" in sys.modules,
                  "dynamo": "torch._dynamo" in sys.modules}))
"""

COMPILED_INSIDE = """
import json, sys
import torch
from torch import nn
import memprof
model = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
seen = {"dynamo_at_start": "torch._dynamo" in sys.modules}
with memprof.profile(model, backend="events") as prof:
    model(torch.randn(2, 8)).sum().backward()
    prof.step()
    seen["dynamo_after_plain_step"] = "torch._dynamo" in sys.modules
    run = torch.compile(model, backend="eager")
    run(torch.randn(2, 8)).sum().backward()
    from torch._inductor import config
    seen["pass_while_compiled"] = type(config.post_grad_custom_post_pass).__name__
    prof.step()
seen["pass_after"] = repr(config.post_grad_custom_post_pass)
print(json.dumps(seen))
"""

FIRST_USE = """
import json, sys
import memprof
import memprof.report, memprof.compare, memprof.estimate  # the submodules, by their names
from memprof.advisor import advise
print(json.dumps({
    "report": memprof.report.__name__, "compare": memprof.compare.__name__,
    "estimate": memprof.estimate.__name__, "advise": memprof.advise is advise,
    "profile": memprof.profile.__name__, "load_snapshot": memprof.load_snapshot.__module__,
    "classes": [memprof.Advice.__name__, memprof.Workload.__name__, memprof.EstimateError.__name__],
    "all_in_dir": sorted(set(memprof.__all__) - set(dir(memprof))),
    "advisor": memprof.advisor.__name__, "gpus": memprof.gpus.__name__,
}))
"""


def _python(code: str) -> dict[str, object]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=300).stdout
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def test_import_memprof_loads_only_the_measurement() -> None:
    result = _python(LIGHT_IMPORT)
    loaded = result["loaded"]
    assert isinstance(loaded, list)
    for heavy in ("memprof.advisor", "memprof.report", "memprof.estimate", "memprof.compare",
                  "memprof.snapshot"):
        assert not [m for m in loaded if m == heavy or m.startswith(heavy + ".")], heavy
    assert "memprof.tracking.session" in loaded
    assert result["pandas"] is False
    assert result["dynamo"] is False  # torch.compile's inductor and dynamo: ~1 s on top of torch


def test_the_compile_pass_is_installed_only_once_compile_is_in_use() -> None:
    """GIVEN a profile started before anything loaded torch.compile WHEN a plain step runs and
    then a model compiled inside the block THEN dynamo stays unloaded for the plain step and the
    pass that reads compiled graphs' modules is in place once the compiled model runs (it was
    installed, importing inductor, at every profile's start), and removed with the profile."""
    result = _python(COMPILED_INSIDE)
    assert result == {"dynamo_at_start": False, "dynamo_after_plain_step": False,
                      "pass_while_compiled": "_OwnersPass", "pass_after": "None"}


def test_public_names_resolve_on_first_use() -> None:
    result = _python(FIRST_USE)
    # The functions keep their names even once their namesake submodules are loaded.
    assert result["report"] == "write_report"
    assert result["compare"] == "compare"
    assert result["estimate"] == "estimate"
    assert result["profile"] == "profile"
    assert result["advise"] is True
    assert result["load_snapshot"] == "memprof.snapshot.load"
    assert result["classes"] == ["Advice", "Workload", "EstimateError"]
    assert result["all_in_dir"] == []
    assert result["advisor"] == "memprof.advisor"
    assert result["gpus"] == "memprof.gpus"


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        memprof.nothing_here  # noqa: B018


@pytest.mark.parametrize(
    ("old_home", "name", "exit_code"),
    [("memprof.estimate", "EstimateError", 2), ("memprof.snapshot.memory_viz", "ExportError", 2),
     ("memprof.report.ranks", "RanksError", 1), ("memprof.commands.common", "CommandError", 2)],
)
def test_errors_live_in_one_module_and_keep_their_old_names(old_home: str, name: str,
                                                             exit_code: int) -> None:
    import importlib

    import memprof.errors

    error = getattr(memprof.errors, name)
    assert getattr(importlib.import_module(old_home), name) is error
    assert issubclass(error, memprof.MemprofError)
    assert error.exit_code == exit_code
    assert memprof.EstimateError is memprof.errors.EstimateError
    assert issubclass(memprof.EstimateError, ValueError)
