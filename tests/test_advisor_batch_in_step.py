"""Pure bf16 on a batch the loop makes in its step (a script's), issue #24: the cast copy is
made in the step beside the held fp32 batch, which the fake run now counts."""

from __future__ import annotations

import copy

import torch
from torch import nn

import memprof
from memprof.advisor.fake_prediction import fake_peak
from memprof.advisor.mixed_precision import _apply_pure_bf16
from memprof.advisor.workload import Workload

BATCH = (8, 3, 32, 32)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 32 * 32, 10))


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).float().pow(2).mean()


def test_pure_bf16_counts_the_held_fp32_batch_beside_its_cast_copy() -> None:
    """GIVEN a loop that makes an fp32 batch each step and, with pure bf16, casts it at the
    model's call (as ``memprof advise --simulate`` runs a script with the change) WHEN the
    change is predicted by a fake run of a Workload whose batch is made in the step THEN the
    prediction is the loop's peak: the fake batch was cast once before the steps, so only its
    bf16 copy was counted (-3.9% on examples/train_cnn.py)."""
    model = _cnn()
    changed = copy.deepcopy(model).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(changed.parameters())
    with memprof.profile(changed, optimizer, backend="dispatch") as prof:
        for step in range(3):
            x = torch.randn(*BATCH, generator=torch.Generator().manual_seed(step))
            loss = _loss(changed, x.to(torch.bfloat16))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            del loss
            prof.step()
    measured = prof.profile.peak().total_bytes
    held = torch.randn(*BATCH)
    fp32_batch = held.numel() * 4
    in_step = Workload(model, torch.optim.AdamW(model.parameters()), held, step_fn=_loss,
                       batch_in_step=True)
    predicted = fake_peak(in_step, [_apply_pure_bf16])
    assert abs(predicted - measured) <= measured // 1000
    # a Workload of a fixed batch casts it once, before the steps: the fp32 batch is not
    # the step's, and it is not counted
    fixed = Workload(model, torch.optim.AdamW(model.parameters()), held, step_fn=_loss)
    assert abs(fake_peak(fixed, [_apply_pure_bf16]) + fp32_batch - measured) <= measured // 1000
