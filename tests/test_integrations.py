"""The training-loop callbacks on real trainers: a Hugging Face ``Trainer`` training a tiny BERT
built from a config, and a Lightning ``Trainer.fit``, on CPU.

GIVEN a trainer with memprof's callback, WHEN it trains a few steps, THEN the chosen steps are
profiled, the files land in the trainer's output folder without replacing any, the trainer's
log gets the peak, and the optimizer state equals a hand count.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from frameworks import hf_trainer, lightning_fit
from torch import nn

import memprof

pytestmark = pytest.mark.slow  # HF Trainer and Lightning runs


def adamw_state_bytes(params: list[torch.Tensor]) -> int:
    """AdamW's state by hand: exp_avg and exp_avg_sq the size of each fp32 parameter, and one
    float32 ``step`` scalar per parameter tensor."""
    return sum(2 * p.numel() * 4 + 4 for p in params)


def state_storage_bytes(optimizer: torch.optim.Optimizer) -> int:
    seen: dict[int, int] = {}
    for values in optimizer.state.values():
        for v in values.values():
            if isinstance(v, torch.Tensor):
                st = v.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def test_import_memprof_imports_no_framework() -> None:
    code = ("import sys, memprof, memprof.integrations; "
            "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------------ Hugging Face


def test_hf_trainer_profiles_the_chosen_steps(tmp_path: Path) -> None:
    from memprof.integrations.transformers import MemprofCallback

    # GIVEN a Trainer with the callback on steps 2 and 3 of 4
    callback = MemprofCallback(steps=[2, 3], advise=False)
    trainer = hf_trainer(tmp_path, callback)
    # WHEN it trains
    trainer.train()
    profile = callback.profile
    assert profile is not None
    # THEN two steps were profiled, written into the Trainer's output_dir
    assert [s.step for s in profile.steps_stats] == [0, 1]
    assert profile.meta["integration"] == {"framework": "transformers", "steps": [2, 3],
                                           "first_step": 2}
    assert callback.paths == {".json": tmp_path / "memprof_steps2-3.json",
                              ".html": tmp_path / "memprof_steps2-3.html"}
    assert memprof.load(callback.paths[".json"]).peak().total_bytes == profile.peak().total_bytes
    # AND the optimizer state is AdamW's by hand (every parameter of the model is trained)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    expected = adamw_state_bytes(params)
    assert state_storage_bytes(trainer.optimizer.optimizer) == expected
    assert profile.peak().by_category["optimizer_state"] == expected
    root = profile.modules().set_index("module").loc[""]
    assert root["optimizer_state_total"] == expected
    assert root["parameter_total"] == sum(p.numel() * 4 for p in params)
    # AND the log history has the peak and its categories, at the last profiled step
    (entry,) = [e for e in trainer.state.log_history if "memprof/peak_bytes" in e]
    assert entry["step"] == 3
    assert entry["memprof/peak_bytes"] == profile.peak().total_bytes
    assert entry["memprof/peak_optimizer_state_bytes"] == expected
    assert entry["memprof/profiled_steps"] == 2


def test_hf_trainer_never_overwrites_an_earlier_profile(tmp_path: Path) -> None:
    from memprof.integrations.transformers import MemprofCallback

    (tmp_path / "memprof_steps1.json").write_text("an earlier file")
    callback = MemprofCallback(steps=1, advise=False, html=False)
    hf_trainer(tmp_path, callback).train()
    assert (tmp_path / "memprof_steps1.json").read_text() == "an earlier file"
    assert callback.paths == {".json": tmp_path / "memprof_steps1_2.json"}
    assert memprof.load(tmp_path / "memprof_steps1_2.json").steps_stats


def test_hf_callback_rejects_bad_steps() -> None:
    pytest.importorskip("transformers")
    from memprof.integrations.transformers import MemprofCallback

    with pytest.raises(ValueError, match="at least 1"):
        MemprofCallback(steps=0)
    with pytest.raises(ValueError, match="numbered from 1"):
        MemprofCallback(steps=[0, 1])


# ------------------------------------------------------------------ Lightning


def test_lightning_fit_profiles_the_chosen_steps(tmp_path: Path) -> None:
    pytest.importorskip("lightning.pytorch")
    from memprof.integrations.lightning import MemprofCallback

    callback = MemprofCallback(steps=[2, 3], advise=False)
    trainer, module = lightning_fit(tmp_path, callback)
    profile = callback.profile
    assert profile is not None
    assert len(profile.steps_stats) == 2
    assert callback.paths == {".json": tmp_path / "memprof_steps2-3.json",
                              ".html": tmp_path / "memprof_steps2-3.html"}
    params = list(module.parameters())
    expected = adamw_state_bytes(params)
    assert state_storage_bytes(trainer.optimizers[0]) == expected
    assert profile.peak().by_category["optimizer_state"] == expected
    frame = profile.modules().set_index("module")
    assert frame.loc["net.0", "optimizer_state"] == 2 * 4 * (16 * 32 + 32) + 2 * 4
    assert frame.loc["net.2", "parameter"] == 4 * (32 + 1)
    # the peak went to Lightning's metrics and to the callback's history
    (entry,) = callback.history
    assert entry["step"] == 3 and entry["memprof/peak_bytes"] == profile.peak().total_bytes
    logged = trainer.callback_metrics["memprof/peak_optimizer_state_bytes"]
    assert float(logged) == expected


def test_lightning_exception_closes_the_profile_and_its_hooks(tmp_path: Path) -> None:
    pytest.importorskip("lightning.pytorch")
    from memprof.integrations.lightning import MemprofCallback
    from memprof.tracking.session import Profiler

    class Boom(RuntimeError):
        pass

    class Failing(MemprofCallback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            super().on_train_batch_end(trainer, *args)
            if trainer.global_step == 2:
                raise Boom("stop")

    callback = Failing(steps=3, advise=False, html=False)
    with pytest.raises(Boom):
        lightning_fit(tmp_path, callback, max_steps=5)
    assert Profiler._active is None  # every hook removed
    assert callback.profile is not None and callback.profile.meta["interrupted"] is True
    assert callback.paths[".json"].exists()
    # and a new profile can start at once
    with memprof.profile() as prof:
        nn.Linear(2, 2)(torch.ones(1, 2))
        prof.step()


def test_callback_files_are_free_and_rank_tagged_under_torchrun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memprof.integrations._window import free_path

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    first = free_path(tmp_path, "memprof_steps1-3", (".json", ".html"))
    assert first == {".json": tmp_path / "memprof_steps1-3.rank1.json",
                     ".html": tmp_path / "memprof_steps1-3.rank1.html"}
    first[".html"].write_text("taken")  # one of the pair taken: both move on
    assert free_path(tmp_path, "memprof_steps1-3", (".json", ".html"))[".json"] == \
        tmp_path / "memprof_steps1-3_2.rank1.json"
