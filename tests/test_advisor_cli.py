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

pytestmark = pytest.mark.slow  # memprof advise runs in subprocesses


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


TINY = str(Path(__file__).parent / "data" / "train_tiny.py")
INFER = str(Path(__file__).parents[1] / "examples" / "infer.py")


def test_simulate_measures_each_technique_on_the_script(tmp_path: Path) -> None:
    out = tmp_path / "tiny.json"
    result = run("--simulate", "--steps", "2", "--json", "-o", str(out), TINY, "--steps", "5")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["script"] == TINY and data["profile"] == str(out)
    rows = [r for r in data["recommendations"] if r["measured_peak_bytes"] is not None]
    assert {r["technique"] for r in rows} >= {"mixed_precision", "optimizer", "quantization"}
    sgd = next(r for r in rows if r["options"].get("to") == "SGD")
    assert sgd["measured_peak_bytes"] < data["baseline_peak_bytes"]
    assert sgd["quality"]["loss_drift"] is not None and sgd["step_time_ratio"] > 0
    # one progress bar per run, labelled with the technique, on stderr
    assert "unchanged" in result.stderr and "optimizer (from=AdamW, to=SGD)" in result.stderr
    # the script's own prints do not end up in the JSON
    assert "loss" not in result.stdout.split("{", 1)[0]
    saved = memprof.load(out)
    assert saved.advice is not None and saved.advice["simulated"] is True


def test_simulate_an_inference_script_marks_training_rows() -> None:
    result = run("--simulate", "--json", INFER, "--batches", "2", "--batch", "8")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["recommendations"]
    quant = [r for r in rows if r["technique"] == "quantization" and r["applicable"]]
    assert quant and all(r["measured_peak_bytes"] for r in quant)
    optimizer_rows = [r for r in rows if r["technique"] == "optimizer"]
    assert optimizer_rows and not any(r["applicable"] for r in optimizer_rows)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--simulate", TINY, "--raise-at", "0"], "failed in its unchanged run"),
        (["--simulate", "--save", TINY], "with a script use -o"),
        (["--simulate", "no_such_script.py"], "no such script"),
        (["-m", "no_such_module_here"], "no module named no_such_module_here"),
        (["--no-fake-predictions", "profile.json"], "--no-fake-predictions goes with a script"),
        ([], "give one PROFILE.json"),
    ],
)
def test_simulate_bad_input_is_one_line(args: list[str], needle: str) -> None:
    result = run(*args)
    assert result.returncode != 0
    assert needle in result.stderr and "Traceback" not in result.stderr


FILE_ONLY_IMPORTS = """
import sys
from memprof.cli import main
sys.argv = ["memprof", "advise", sys.argv[1], "--json"]
try:
    main()
finally:
    print("fsdp loaded:", "torch.distributed.fsdp" in sys.modules, file=sys.stderr)
"""


def test_advise_file_does_not_import_fsdp(saved: Path) -> None:
    """The sharding rows of a file are analytic: looking for FSDP2 must not import it (most of
    a second of the 3 s that ``memprof advise FILE`` may take)."""
    result = subprocess.run([sys.executable, "-c", FILE_ONLY_IMPORTS, str(saved)],
                            capture_output=True, text=True, timeout=120)
    assert "fsdp loaded: False" in result.stderr, result.stderr[-2000:]
    rows = json.loads(result.stdout)["recommendations"]
    sharding = [r for r in rows if r["technique"] == "sharding"]
    assert sharding and all(r["predicted_saving_bytes"] > 0 for r in sharding)
