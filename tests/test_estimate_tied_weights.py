"""``memprof.estimate`` keeps transformers' tied weights tied where the model ties them (#25).

The estimate skips weight initialisation under fake tensors; transformers' ``init_weights``
also ties the weights, so a transformers model held below the model's root (a wrapper module,
a loss module around it) was estimated with its tied embedding and output layer as separate
parameters, each with gradients and AdamW state: +4.6% to +13.1% on the zoo's gpt2, bert, t5,
bart and whisper."""

from __future__ import annotations

import pytest
import torch
from models import make_gpt2
from torch import nn

import memprof


class _Wrapper(nn.Module):
    """A transformers model below the root, returning the loss as a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = make_gpt2()

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.inner(input_ids=input_ids, labels=input_ids).loss}


def _untied() -> nn.Module:
    """A GPT-2 whose factory unties its output layer on purpose after it is built."""
    model = make_gpt2()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def _ids() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids}


def _parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # distinct ones


@pytest.mark.parametrize("factory", [_Wrapper, make_gpt2, _untied],
                         ids=["below-the-root", "root", "untied-by-the-factory"])
def test_estimate_ties_weights_as_the_built_model_does(factory: type[nn.Module]) -> None:
    """GIVEN a transformers model with tied embeddings, at the root, below it, or untied by the
    factory WHEN estimated THEN its parameters, gradients and AdamW state are the real model's
    (below the root the tied weight was counted three times over, and a factory's untying was
    undone by tying at the root)."""
    pytest.importorskip("transformers")
    real_bytes = _parameter_bytes(factory())
    batch = _ids()
    if factory is not _Wrapper:
        batch["labels"] = batch["input_ids"]
    profile = memprof.estimate(factory, batch=batch, optimizer="adamw", dtype="fp32",
                               device="cpu", steps=2)
    info = profile.meta["estimate"]
    assert info["parameter_bytes"] == real_bytes
    by_category = profile.peak().by_category
    assert by_category["parameter"] == real_bytes
    count = len(list(factory().parameters()))
    assert by_category["optimizer_state"] == 2 * real_bytes + 4 * count  # moments, fp32 step
