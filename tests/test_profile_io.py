"""Saving and loading profiles: round trips, refusal to overwrite, and one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import make_mlp, train_step

import memprof
from memprof.profile import SCHEMA_VERSION


@pytest.fixture(scope="module")
def profile() -> memprof.Profile:
    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    with memprof.profile(model, optimizer) as prof:
        for _ in range(2):
            train_step(model, optimizer, torch.randn(16, 64))
            prof.step()
    return prof.profile


def test_round_trip_keeps_every_table(profile: memprof.Profile, tmp_path: Path) -> None:
    path = profile.save(tmp_path / "run.json")
    again = memprof.load(path)
    assert again.peak() == profile.peak()
    assert again.modules().equals(profile.modules())
    assert again.timeline().equals(profile.timeline())
    assert again.steps().equals(profile.steps())
    assert again.device == profile.device


def test_refuses_to_overwrite(profile: memprof.Profile, tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text("precious")
    with pytest.raises(memprof.OutputExistsError):
        profile.save(path)
    assert path.read_text() == "precious"
    profile.save(path, overwrite=True)
    assert memprof.load(path).peak() == profile.peak()
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary left behind


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ('{"schema": "memprof-profile", "version": 1, "modu', "truncated"),
        ("hello, world", "not valid JSON"),
        ('{"schema": "something-else", "version": 1}', "not a memprof profile"),
        ('[1, 2, 3]', "not a memprof profile"),
        (json.dumps({"schema": "memprof-profile", "version": SCHEMA_VERSION + 1}), "newer"),
        (json.dumps({"schema": "memprof-profile", "version": 1}), "damaged"),
    ],
)
def test_load_errors_are_one_line(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "p.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(memprof.ProfileLoadError, match=message) as info:
        memprof.load(path)
    assert "\n" not in str(info.value)


def test_load_a_directory(tmp_path: Path) -> None:
    with pytest.raises(memprof.ProfileLoadError, match="directory"):
        memprof.load(tmp_path)


@pytest.mark.parametrize("inside_a_profile", [False, True])
def test_deeply_nested_json_is_one_line_from_the_cli(tmp_path: Path,
                                                     inside_a_profile: bool) -> None:
    """GIVEN a file of deeply nested JSON arrays (alone, or as a field of a profile header)
    WHEN ``memprof report`` reads it THEN one line says it is not a profile, with a non-zero
    exit and no traceback (it ended with a RecursionError traceback)."""
    import subprocess
    import sys

    nested = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "deep.json"
    path.write_text(nested if not inside_a_profile else
                    f'{{"schema": "memprof-profile", "version": 1, "steps": {nested}}}')
    with pytest.raises(memprof.ProfileLoadError) as info:
        memprof.load(path)
    assert "\n" not in str(info.value)
    proc = subprocess.run([sys.executable, "-m", "memprof", "report", str(path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "deep.json" in lines[0], proc.stderr[-500:]


def test_repr_is_one_short_line(profile: memprof.Profile, tmp_path: Path) -> None:
    text = repr(profile)
    peak = profile.peak()
    assert "\n" not in text and len(text) < 200
    assert text == (
        f"Profile(model=Sequential, device={profile.device.name!r}, peak="
        f"{memprof.format_bytes(peak.total_bytes)} at step {peak.step}, {peak.phase} in "
        f"{peak.module!r}, steps=2)"
    )
    assert repr(memprof.load(profile.save(tmp_path / "run.json"))) == text
