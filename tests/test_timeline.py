"""The timeline's samples are in time order within each step, the step's peak among them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memprof
from memprof.categories import CATEGORIES


@pytest.mark.parametrize("backend", ["dispatch", "events"])
def test_samples_are_in_time_order_with_the_peak_in_place(backend: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    with memprof.profile(model, opt, backend=backend) as prof:
        for _ in range(3):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            prof.step()
    timeline = prof.profile.timeline()
    for step, rows in timeline.groupby("step"):
        times = list(rows["time_s"])
        assert times == sorted(times), f"step {step}: samples out of time order"
        assert list(rows["seq"]) == sorted(rows["seq"])
    peak = prof.profile.peak()
    rows = timeline[timeline.step == peak.step]
    at_peak = rows[rows[list(CATEGORIES)].sum(axis=1) == peak.total_bytes]
    assert len(at_peak) >= 1
    # AdamW's first step allocates its state then its scratch: the peak is in the optimizer
    # phase, after every backward sample of its step
    first = at_peak.index[0]
    assert (rows.loc[:first, "phase"] == "backward").any()
    assert at_peak.iloc[0]["phase"] == peak.phase
