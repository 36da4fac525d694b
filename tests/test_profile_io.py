"""Saving and loading profiles: round trips, refusal to overwrite, and one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_mlp, train_step

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
