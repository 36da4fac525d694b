"""``memprof advise`` as a user runs it: a real subprocess on a saved profile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import memprof


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4)
    )
    opt = torch.optim.AdamW(model.parameters())
    with memprof.profile(model, opt) as prof:
        for _ in range(2):
            x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            prof.step()
    return prof.profile.save(tmp_path_factory.mktemp("p") / "train.json")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memprof", "advise", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_json_has_rows_and_a_plan(saved: Path) -> None:
    result = run(str(saved), "--budget", "24GiB", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["plan"]["fits"] is True
    techniques = {r["technique"] for r in data["recommendations"]}
    assert {"mixed_precision", "optimizer", "checkpointing", "sharding", "pruning"} <= techniques
    prune = next(
        r for r in data["recommendations"] if r["options"].get("state") == "before prune.remove"
    )
    assert prune["predicted_saving_bytes"] < 0


def test_text_output_and_save(saved: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.json"
    copy.write_text(saved.read_text())
    result = run(str(copy), "--gpu", "T4", "--save")
    assert result.returncode == 0, result.stderr
    assert "baseline step peak" in result.stdout and "plan:" in result.stdout
    assert memprof.load(copy).advice is not None


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--budget", "24 gigs"], "24 gigs"),
        (["--gpu", "A100 4GB"], "A100 40GB"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(saved: Path, args: list[str], needle: str) -> None:
    result = run(str(saved), *args)
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr
