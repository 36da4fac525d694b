"""GIVEN batch tensors handed to the profiled model as keyword arguments (``model(**batch)``:
labels, attention masks), THEN they are ``input``, whether autograd saves them or not, on both
backends, to the byte."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memprof


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 8)

    def forward(
        self, x: torch.Tensor, *, mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        out = self.linear(x) + mask.sum()  # the mask is read, never saved
        return nn.functional.cross_entropy(out, labels.roll(1))  # a copy of labels is saved


@pytest.mark.parametrize("backend", ["dispatch", "events"])
def test_keyword_inputs_the_model_never_saves_are_input(backend: str) -> None:
    torch.manual_seed(0)
    model = _Masked()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, mask = torch.randn(32, 64), torch.ones(32, 100)
    labels = torch.randint(0, 8, (32,))
    with memprof.profile(model, opt, backend=backend) as prof:  # type: ignore[arg-type]
        for _ in range(2):
            model(x, mask=mask, labels=labels).backward()
            opt.step()
            opt.zero_grad()
            prof.step()
    peak = prof.profile.peak()
    # x (32x64 fp32) + mask (32x100 fp32) + labels (32 int64); on main only x: 8192
    assert peak.by_category["input"] == 32 * 64 * 4 + 32 * 100 * 4 + 32 * 8 == 21248
    shapes = sorted(t.shape for t in peak.top_tensors if t.category == "input")
    assert shapes == [[32], [32, 64], [32, 100]]
