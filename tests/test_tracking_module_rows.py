"""GIVEN a module built anew inside each forward (transformers' per-call
``CrossEntropyLoss()``), THEN every step's instance maps to the same row."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memprof


class _LossInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.CrossEntropyLoss()(self.linear(x), y)  # a new module every call


@pytest.mark.parametrize("backend", ["dispatch", "events"])
def test_a_module_built_in_forward_keeps_one_row(backend: str) -> None:
    torch.manual_seed(0)
    model = _LossInside()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    with memprof.profile(model, opt, backend=backend) as prof:  # type: ignore[arg-type]
        for _ in range(3):
            model(x, y).backward()
            opt.step()
            opt.zero_grad()
            prof.step()
    names = list(prof.profile.modules()["module"])
    assert [n for n in names if "CrossEntropyLoss" in n] == ["CrossEntropyLoss"]  # main: #2, #3
    row = prof.profile.modules().set_index("module").loc["CrossEntropyLoss"]
    assert int(row["forward_calls"]) == 3
