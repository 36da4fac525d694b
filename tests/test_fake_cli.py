"""Fake-run predictions behind the command line, as a user runs it (real subprocesses).

GIVEN tests/data/train_lm.py, a small language model whose loss (a label shift and a
cross-entropy over 2048-way logits it keeps in a variable) is computed by the script, outside
the model, WHEN ``memprof advise SCRIPT.py`` runs it, THEN every row a fake run can model is
predicted by one (``predicted_by == "fake run"``) and lands within 3% of the peak that
``--simulate`` measures with the change applied to the script; ``memprof run`` saves those
predictions in the profile and ``memprof advise FILE`` shows the same numbers;
``--no-fake-predictions`` turns them off.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from script_runs import OOM_SCRIPT

pytestmark = pytest.mark.slow  # fake runs from the CLI, in subprocesses

SCRIPT = Path(__file__).parent / "data" / "train_lm.py"
TIMEOUT = 1500


def memprof(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memprof", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=cwd)


def rows(data: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["technique"], json.dumps(r["options"], sort_keys=True)): r
            for r in data["recommendations"] if r["applicable"]}


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cwd = tmp_path_factory.mktemp("advise")
    result = memprof("advise", "--steps", "2", "--json", str(SCRIPT), cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(json.loads(result.stdout))


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cwd = tmp_path_factory.mktemp("simulate")
    result = memprof("advise", "--simulate", "--steps", "2", "--json", str(SCRIPT), cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(json.loads(result.stdout))


def test_advise_script_predicts_by_fake_runs(predicted: dict[str, Any]) -> None:
    faked = [r for r in rows(predicted).values() if r.get("predicted_by") == "fake run"]
    techniques = {r["technique"] for r in faked}
    assert {"mixed_precision", "optimizer", "checkpointing", "quantization"} <= techniques
    assert predicted["fake_prediction_s"] > 0
    # the unchanged step on fake tensors is the measured one (the script's own loss, and its
    # logits variable alive through the backward, are in it)
    fake, measured = predicted["fake_baseline_peak_bytes"], predicted["baseline_peak_bytes"]
    assert abs(fake - measured) / measured < 0.01
    # the ZeRO rows run as rank 0 of a fake process group; the CPU offload stays analytic
    sharded = [r for r in rows(predicted).values() if r["technique"] == "sharding"]
    assert {r["predicted_by"] for r in sharded if r["options"]["ranks"] > 1} == {"fake run"}
    assert {r["predicted_by"] for r in sharded if r["options"]["ranks"] == 1} == {"analytic"}


def test_fake_predictions_within_3_percent_of_simulation(
    predicted: dict[str, Any], simulated: dict[str, Any]
) -> None:
    measured = rows(simulated)
    compared = 0
    for key, row in rows(predicted).items():
        sim = measured.get(key)
        if row.get("predicted_by") != "fake run" or not sim or not sim["measured_peak_bytes"]:
            continue
        error = (row["predicted_peak_bytes"] - sim["measured_peak_bytes"]) / sim[
            "measured_peak_bytes"]
        assert abs(error) < 0.03, (key, row["predicted_peak_bytes"], sim["measured_peak_bytes"])
        # --simulate predicts the same way and says so
        assert sim["predicted_by"] == "fake run"
        assert sim["predicted_peak_bytes"] == row["predicted_peak_bytes"]
        compared += 1
    assert compared >= 8


def test_run_saves_fake_predictions_and_advise_file_shows_them(tmp_path: Path) -> None:
    result = memprof("run", "--steps", "2", "--no-html", "--budget", "1GiB", "--json", "-o",
                     "lm.json", str(SCRIPT), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    advice = json.loads(result.stdout)["advice"]
    assert advice["fake_prediction_s"] > 0
    # no operator trace unless asked (--op-trace): its dispatch mode would touch the steps
    assert json.loads((tmp_path / "lm.json").read_text()).get("op_trace") is None
    saved = rows(advice)
    assert sum(r.get("predicted_by") == "fake run" for r in saved.values()) >= 8

    shown = memprof("advise", "lm.json", "--budget", "1GiB", "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-3000:]
    data = json.loads(shown.stdout)
    assert data["fake_prediction_stored"] is True
    again = rows(data)
    for key, row in saved.items():
        if row.get("predicted_by") == "fake run":
            assert again[key]["predicted_by"] == "fake run"
            assert again[key]["predicted_peak_bytes"] == row["predicted_peak_bytes"]
    # the plan is made from the same numbers
    assert data["plan"]["predicted_peak_bytes"] == advice["plan"]["predicted_peak_bytes"]

    text = memprof("advise", "lm.json", cwd=tmp_path)
    assert "fake runs of the model (stored in the profile)" in text.stdout


def test_no_fake_predictions_is_analytic(tmp_path: Path) -> None:
    result = memprof("run", "--steps", "1", "--no-html", "--no-fake-predictions", "--op-trace",
                     "--json", "-o", "lm.json", str(SCRIPT), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    advice = json.loads(result.stdout)["advice"]
    assert "fake_prediction_s" not in advice
    by = {r.get("predicted_by") for r in rows(advice).values()}
    assert by == {"analytic", "trace replay"}
    # run --op-trace recorded the step's operator trace: the autocast rows replay it
    replayed = {r["options"].get("mode") for r in rows(advice).values()
                if r.get("predicted_by") == "trace replay"}
    assert replayed == {"autocast"}

    text = memprof("advise", "--no-fake-predictions", "--steps", "1", str(SCRIPT), cwd=tmp_path)
    assert text.returncode == 0, text.stderr[-3000:]
    assert "predicted from the profile alone (analytic)" in text.stdout


def test_gradient_accumulation_falls_back_with_the_reason(tmp_path: Path) -> None:
    result = memprof("advise", "--steps", "1", "--json", str(SCRIPT), "--accumulate", "2",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)
    assert "2 times before its first optimizer step" in data["fake_prediction_skipped"]
    assert {r.get("predicted_by") for r in rows(data).values()} == {"analytic"}


@pytest.mark.slow
def test_the_out_of_memory_plan_is_predicted_by_fake_runs(tmp_path: Path) -> None:
    import memprof as api

    # GIVEN a script whose backward cannot fit under its address-space cap
    (tmp_path / "train_oom.py").write_text(OOM_SCRIPT)
    # WHEN memprof runs it
    result = memprof("run", "--no-html", "train_oom.py", "backward", cwd=tmp_path)
    assert result.returncode == 1 and "can't allocate memory" in result.stderr
    # THEN the post-mortem's plan was made from fake runs of the model it had in hand (which
    # do not run out of memory: nothing is allocated)
    oom = api.load(tmp_path / "reports" / "train_oom.json").oom
    assert oom is not None and oom.plan is not None
    assert oom.plan["predicted_by"] == "fake run"
    assert "explanation" in oom.plan
