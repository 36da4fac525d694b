"""``memprof estimate --lora/--qlora``: the fine-tuning step estimated on fake tensors against
the same step run for real (peft adapters on the advisor's targets, NF4 bases for QLoRA)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from workloads import estimate_shaped_peak

from memprof.advisor.finetune import FinetuneSetup
from memprof.estimate import estimate

pytestmark = pytest.mark.slow  # real and fake GPT-2 steps with peft (and torchao) adapters

needs_finetune = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("peft", "torchao", "transformers")),
    reason="needs memprof[finetune] (peft, torchao) and transformers")

VOCAB, SEQ, BATCH = 256, 32, 2


def _gpt2() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB,
                                     n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


@needs_finetune
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_finetuning_estimate_is_the_real_finetuning_step(method: str) -> None:
    """GIVEN a small GPT-2, WHEN its LoRA (QLoRA) step is estimated on fake tensors and run
    for real with the same set-up, THEN the peaks agree within 1%, the optimizer holds the
    adapters' state only, and the set-up says what it adapted."""
    setup = FinetuneSetup(method, 8)
    profile = estimate(_gpt2, batch=_batch, prepare=setup, dtype="fp32", device="cpu")
    assert setup.targets and len(setup.targets) == 8  # c_attn, c_proj, c_fc, c_proj x 2 blocks
    adapters = 8 * sum(i + o for i, o in ((64, 192), (64, 64), (64, 256), (256, 64))) * 2
    assert profile.optimizers[0]["parameter_bytes"] == 4 * adapters
    real = FinetuneSetup(method, 8)(_gpt2())
    truth = estimate_shaped_peak(real, _batch())
    estimated = profile.peak().total_bytes
    assert abs(estimated - truth) <= 0.01 * truth, (estimated, truth)
    full = estimate(_gpt2, batch=_batch, dtype="fp32", device="cpu").peak().total_bytes
    assert estimated < full


@needs_finetune
@pytest.mark.parametrize(("args", "needle"), [
    (["--lora", "8", "--qlora", "8"], "not both"),
    (["--lora", "8", "--inference"], "training step"),
])
def test_bad_finetuning_options_are_one_line(args: list[str], needle: str) -> None:
    done = subprocess.run([sys.executable, "-m", "memprof", "estimate", "gpt2", *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and needle in done.stderr
    assert "Traceback" not in done.stderr
