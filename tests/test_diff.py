"""Comparing two runs: ``memprof.compare`` and ``memprof diff``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import memprof
from memprof.compare import parse_threshold

BATCH, WIDTH = 128, 256


def _mlp(extra: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH),
                               nn.GELU(), nn.Linear(WIDTH, 10)]
    if extra:
        layers.append(nn.Linear(10, 10))
    return nn.Sequential(*layers)


def _profile(*, autocast: bool = False, batch: int = BATCH, extra: bool = False) -> memprof.Profile:
    model = _mlp(extra)
    opt = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(batch, 64), torch.randint(0, 10, (batch,))
    with memprof.profile(model, opt) as prof:
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            prof.step()
    return prof.profile


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("profiles")
    paths = {}
    for name, kwargs in {"fp32": {}, "bf16": {"autocast": True}, "big": {"batch": 4 * BATCH},
                         "extra": {"extra": True}}.items():
        paths[name] = _profile(**kwargs).save(root / f"{name}.json")  # type: ignore[arg-type]
    return paths


def _cell(frame: object, section: str, name: str, category: str) -> object:
    import pandas as pd

    assert isinstance(frame, pd.DataFrame)
    rows = frame[(frame.section == section) & (frame.name == name) & (frame.category == category)]
    assert len(rows) == 1, (section, name, category)
    return rows.iloc[0]


def test_a_profile_against_itself_is_zero_everywhere(profiles: dict[str, Path]) -> None:
    a = memprof.load(profiles["fp32"])
    frame = memprof.compare(a, memprof.load(profiles["fp32"]))
    assert set(frame.section) == {"peak", "peak_module", "module", "phase", "step"}
    assert (frame.delta_bytes == 0).all()
    assert (frame.delta_pct == 0).all()
    assert (frame.present == "both").all()
    assert (frame.a_bytes == frame.b_bytes).all()
    assert _cell(frame, "peak", "", "total").a_bytes == a.peak().total_bytes
    assert len(frame[frame.section == "step"]) == 2


def test_autocast_changes_activations_and_temporaries_per_module(
    profiles: dict[str, Path],
) -> None:
    # GIVEN fp32 (A) and bf16-autocast (B) runs of the same MLP
    frame = memprof.compare(memprof.load(profiles["fp32"]), memprof.load(profiles["bf16"]))
    fp32_hidden = BATCH * WIDTH * 4  # a hidden activation in fp32; half of it in bf16
    # THEN each GELU saves its input in bf16 instead of fp32, and its output halves too
    for gelu in ("1", "3"):
        act = _cell(frame, "module", gelu, "activation")
        assert (act.a_bytes, act.delta_bytes) == (fp32_hidden, -fp32_hidden // 2)
        assert act.delta_pct == pytest.approx(-50.0)
        assert _cell(frame, "module", gelu, "temporary_peak").delta_bytes == -fp32_hidden // 2
    # AND each Linear saves its bf16 input plus the bf16 copy of its weight autocast made
    first = _cell(frame, "module", "0", "activation")
    assert (first.a_bytes, first.b_bytes) == (0, BATCH * 64 * 2)  # the batch is an input in fp32
    assert math.isnan(first.delta_pct)
    middle = _cell(frame, "module", "2", "activation")
    assert middle.b_bytes == fp32_hidden // 2 + WIDTH * WIDTH * 2
    assert middle.delta_bytes == WIDTH * WIDTH * 2 - fp32_hidden // 2
    last = _cell(frame, "module", "4", "activation")
    assert last.delta_bytes == (fp32_hidden // 2 + 10 * WIDTH * 2) - fp32_hidden
    # AND the parameters did not change (autocast keeps fp32 weights)
    assert (frame[(frame.section == "module") & (frame.category == "parameter")]
            .delta_bytes == 0).all()


def test_profiles_of_different_models_compare(profiles: dict[str, Path]) -> None:
    frame = memprof.compare(memprof.load(profiles["fp32"]), memprof.load(profiles["extra"]))
    new = frame[(frame.section == "module") & (frame.name == "5")]
    assert set(new.present) == {"b only"}
    param = _cell(frame, "module", "5", "parameter")
    assert (param.a_bytes, param.b_bytes) == (0, (10 * 10 + 10) * 4)
    assert set(frame[(frame.section == "module") & (frame.name == "2")].present) == {"both"}
    back = memprof.compare(memprof.load(profiles["extra"]), memprof.load(profiles["fp32"]))
    assert set(back[(back.section == "module") & (back.name == "5")].present) == {"a only"}


def test_thresholds() -> None:
    assert parse_threshold("5%").limit(1000) == 1050
    assert parse_threshold("1KiB").limit(1000) == 2024
    assert parse_threshold("10 %").exceeded(100, 111)
    assert not parse_threshold("10%").exceeded(100, 110)
    with pytest.raises(ValueError, match="threshold"):
        parse_threshold("five percent")


# ------------------------------------------------------------------ the command
def _cli(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memprof", "diff", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_diff_command_fail_over_exit_codes(profiles: dict[str, Path], tmp_path: Path) -> None:
    a, big = profiles["fp32"], profiles["big"]
    same = _cli(a, a, "--fail-over", "0%", cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    assert "peak" in same.stdout and "(0 B, +0.0%)" in same.stdout
    grew = _cli(a, big, "--fail-over", "5%", "--json", cwd=tmp_path)
    assert grew.returncode == 5, grew.stderr
    data = json.loads(grew.stdout)
    assert data["fail_over"]["exceeded"] is True
    assert data["peak"]["b_bytes"] > data["peak"]["a_bytes"] * 1.05
    assert "exceeds" in grew.stderr and len(grew.stderr.strip().splitlines()) == 1
    assert {"a", "b", "peak", "rows", "fail_over", "report"} <= set(data)
    shrank = _cli(big, a, "--fail-over", "5%", cwd=tmp_path)
    assert shrank.returncode == 0, shrank.stderr
    allowed = _cli(a, big, "--fail-over", "1GiB", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr


@pytest.mark.slow
def test_diff_command_bad_input_is_one_line(profiles: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for args in ([profiles["fp32"], bad], [profiles["fp32"], tmp_path / "missing.json"],
                 [profiles["fp32"], profiles["fp32"], "--fail-over", "lots"]):
        proc = _cli(*args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("memprof: error:")
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_diff_command_writes_the_html_and_never_replaces_it(
    profiles: dict[str, Path], tmp_path: Path,
) -> None:
    out = tmp_path / "diff.html"
    proc = _cli(profiles["fp32"], profiles["bf16"], "-o", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    html = out.read_text()
    assert '"chart-diff-timeline"' in html and '"chart-diff-peak"' in html
    assert "fp32.json total" in html and "bf16.json total" in html
    assert "http://" not in html.split("<script>")[0] and 'id="diff-modules"' in html
    out.write_text("mine")
    again = _cli(profiles["fp32"], profiles["bf16"], "-o", out, cwd=tmp_path)
    assert again.returncode == 3 and out.read_text() == "mine"
    forced = _cli(profiles["fp32"], profiles["bf16"], "-o", out, "--force", cwd=tmp_path)
    assert forced.returncode == 0 and out.read_text() != "mine"
