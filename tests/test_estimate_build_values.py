"""``memprof.estimate`` of a model whose constructor reads tensor values (#25): ConvNeXt, Swin
and timm's models take their drop-path rates from ``torch.linspace(...).tolist()``, which
failed under fake tensors ("the model factory failed: DataDependentOutputException")."""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from workloads import estimate_shaped_peak

from memprof.estimate import estimate_step
from memprof.estimate.fake_step import _build_model

WIDTH, DEPTHS, BATCH = 32, (2, 3), 8


class _Stages(nn.Module):
    """Blocks whose dropout rates come from a linspace split per stage (the timm pattern),
    with a buffer made from Python values alone."""

    def __init__(self) -> None:
        super().__init__()
        rates = [r.tolist() for r in torch.linspace(0, 0.2, sum(DEPTHS)).split(DEPTHS)]
        self.blocks = nn.Sequential(*(
            nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Dropout(rate))
            for stage in rates for rate in stage))
        self.register_buffer("scale", torch.arange(WIDTH, dtype=torch.float32))
        self.norm = nn.LayerNorm(WIDTH)
        self.rates = [rate for stage in rates for rate in stage]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.norm(self.blocks(x) * self.scale).pow(2).mean()}


def _batch() -> torch.Tensor:
    return torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(0))


def _real_peak() -> int:
    """Two real steps shaped as estimate's."""
    torch.manual_seed(0)
    return estimate_shaped_peak(_Stages(), _batch())


def test_a_constructor_reading_tensor_values_is_estimated() -> None:
    """GIVEN a model whose constructor reads a linspace's values WHEN estimated THEN it builds
    with the real rates, and peaks within 1% of two real steps."""
    step = estimate_step(_Stages, batch=_batch, optimizer="adamw", dtype="fp32",
                         device="cpu", steps=2)
    model = step.model
    assert isinstance(model, _Stages)
    assert model.rates == torch.linspace(0, 0.2, sum(DEPTHS)).tolist()
    real = _real_peak()
    assert abs(step.profile.peak().total_bytes - real) / real < 0.01


def test_values_made_while_building_are_not_kept_into_the_step() -> None:
    """GIVEN the same model WHEN built for an estimate THEN no parameter and no tensor of more
    than one element keeps a real value after the build (operations on them would bypass fake
    tensor mode's cache in every step)."""
    with FakeTensorMode():
        model = _build_model(_Stages, torch.float32)
    tensors = list(model.parameters()) + list(model.buffers())
    assert len(tensors) == 13
    assert all(isinstance(t, FakeTensor) and t.constant is None for t in tensors)
