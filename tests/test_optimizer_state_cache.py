"""The events backend replays a step's optimizer state only where it changed (issue #25's
overhead): state kept in place keeps its role, state replaced between steps gets it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memprof

F32 = 4


@pytest.mark.parametrize("backend", ["events", "dispatch"])
def test_optimizer_state_replaced_between_steps_is_state_again(backend: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(16, 32)
    weight = model[0].weight
    with memprof.profile(model, optimizer, backend=backend) as prof:  # type: ignore[arg-type]
        for step in range(4):
            model(x).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            state = optimizer.state[weight]
            if step == 1:  # a new tensor, made outside the optimizer step
                state["exp_avg"] = state["exp_avg"].clone()
            if step == 2:  # the same tensor, written in place
                with torch.no_grad():
                    state["exp_avg_sq"].mul_(1.0)
            prof.step()
    frame = prof.modules().set_index("module")
    for name in ("0", "2"):
        params = list(model.get_submodule(name).parameters())
        nbytes = sum(p.numel() * F32 for p in params)
        assert frame.loc[name, "optimizer_state"] == 2 * nbytes + F32 * len(params)
    assert prof.peak().by_category["optimizer_state"] == 2 * sum(
        p.numel() * F32 for p in model.parameters()
    ) + F32 * 4
