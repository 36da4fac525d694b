"""``memprof.estimate`` of a peft LoRA model, and of any factory that calls ``module.to()`` (#25).

PyTorch converts fake parameters by swapping them, which fake tensors (weakly referenced by
their mode) refuse: ``get_peft_model`` moves each adapter to its base layer's device and dtype,
so every peft model's estimate refused ("_apply(): Couldn't swap Linear.weight")."""

from __future__ import annotations

import pytest
import torch
from models import make_gpt2
from torch import nn
from workloads import estimate_shaped_peak

import memprof


def _lora_gpt2() -> nn.Module:
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(make_gpt2(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def test_estimate_of_a_peft_lora_model_is_the_real_runs() -> None:
    """GIVEN a GPT-2 wrapped by peft's get_peft_model (LoRA on c_attn) WHEN estimated THEN the
    estimate runs and its peak is within 1% of two real steps (it refused before)."""
    pytest.importorskip("transformers")
    profile = memprof.estimate(_lora_gpt2, batch=_batch(), optimizer="adamw", dtype="fp32",
                               device="cpu", steps=2)
    real = estimate_shaped_peak(_lora_gpt2(), _batch())
    assert abs(profile.peak().total_bytes - real) <= real // 100
    trained = sum(p.numel() for p in _lora_gpt2().parameters() if p.requires_grad)
    assert profile.meta["estimate"]["num_parameters"] > trained  # the frozen base is counted too


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(32))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids) * self.scale)


def _converted() -> nn.Module:
    """A factory that converts its model after building it, as user code does."""
    return _Tied().to(torch.float64).to("cpu").float()


def test_a_factorys_module_conversions_keep_tied_weights_tied() -> None:
    """GIVEN a factory that calls .to(float64), .to("cpu") and .float() on a model with tied
    weights and a buffer WHEN estimated THEN it builds (it raised) with one parameter and the
    buffer in the final dtype."""
    profile = memprof.estimate(_converted, batch=torch.randint(0, 64, (4, 8)),
                               optimizer="adamw", dtype="fp32", device="cpu", steps=1)
    info = profile.meta["estimate"]
    assert info["num_parameters"] == 64 * 32
    assert info["parameter_bytes"] == 64 * 32 * 4
