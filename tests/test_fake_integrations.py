"""The Trainer and Lightning callbacks predict their advice by fake runs of the model, batch and
loss they saw in the first profiled step, and ``prediction="analytic"`` turns that off."""

from __future__ import annotations

from pathlib import Path

import pytest
from frameworks import hf_trainer, lightning_fit
from torch.utils._python_dispatch import _get_current_dispatch_mode

pytestmark = pytest.mark.slow  # HF Trainer and Lightning runs with fake-run advice


def fake_rows(advice: dict) -> list[dict]:
    return [r for r in advice["recommendations"]
            if r["applicable"] and r.get("predicted_by") == "fake run"]


def test_hf_trainer_advice_is_predicted_by_fake_runs(tmp_path: Path) -> None:
    from memprof.integrations.transformers import MemprofCallback

    # GIVEN a Trainer whose callback advises on steps 2 and 3
    callback = MemprofCallback(steps=[2, 3], html=False)
    trainer = hf_trainer(tmp_path, callback)
    # WHEN it trains
    trainer.train()
    profile = callback.profile
    assert profile is not None and profile.advice is not None
    # THEN the rows a fake run can model were predicted by one, timed
    advice = profile.advice
    assert {"mixed_precision", "optimizer"} <= {r["technique"] for r in fake_rows(advice)}
    assert advice["fake_prediction_s"] > 0
    # AND the unchanged step on fake tensors is the step the Trainer ran
    measured = profile.peak().total_bytes
    assert abs(advice["fake_baseline_peak_bytes"] - measured) / measured < 0.03
    # AND no hook, patch or dispatch mode of the capture is left behind
    assert _get_current_dispatch_mode() is None


def test_lightning_advice_is_predicted_by_fake_runs_or_analytic(tmp_path: Path) -> None:
    pytest.importorskip("lightning.pytorch")
    from memprof.integrations.lightning import MemprofCallback

    callback = MemprofCallback(steps=[2, 3], html=False, output_dir=tmp_path / "fake")
    lightning_fit(tmp_path, callback)
    assert callback.profile is not None and callback.profile.advice is not None
    advice = callback.profile.advice
    assert fake_rows(advice)
    # on this 16 KiB toy the fake step misses only Lightning's own bookkeeping of the loss
    # (its detached copies and logged metrics), a few KiB the model's step does not scale
    measured = callback.profile.peak().total_bytes
    assert 0 <= measured - advice["fake_baseline_peak_bytes"] < 4096

    analytic = MemprofCallback(steps=[2, 3], html=False, output_dir=tmp_path / "analytic",
                               prediction="analytic")
    lightning_fit(tmp_path, analytic)
    assert analytic.profile is not None and analytic.profile.advice is not None
    assert not fake_rows(analytic.profile.advice)
    assert analytic.profile.advice["fake_prediction_skipped"] == "turned off"
    with pytest.raises(ValueError, match="prediction must be"):
        MemprofCallback(prediction="exact")
