"""An optimizer that steps another inside its step (#25): ZeRO-1's ZeroRedundancyOptimizer
steps the optimizer it holds. Profiles listed each such optimizer twice (the wrapper with no
state, then the inner one), the inner step's end set the phase to "other" while the wrapper's
step still ran, and a profile that ends a step per optimizer step counted each step twice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memprof.tracking.session import Profiler


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.untyped_storage().nbytes() for state in optimizer.state.values()
               for v in state.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("backend", ["dispatch", "events"])
def test_zero1_is_one_optimizer_with_its_inner_optimizers_state(
    one_rank: None, backend: str
) -> None:
    """GIVEN ZeRO-1 over AdamW WHEN profiled, steps ended by the optimizer THEN one optimizer
    is listed (AdamW, wrapped by ZeroRedundancyOptimizer) with AdamW's state bytes, each
    step's peak is in the optimizer step, and 3 steps are 3 profiled steps."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW)
    x = torch.randn(8, 16)
    with Profiler(model, optimizer, backend=backend, step_on_optimizer=True) as prof:
        for _ in range(3):
            model(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    profile = prof.profile
    (listed,) = profile.optimizers
    assert listed["class"] == "AdamW"
    assert listed["wrapped_by"] == "ZeroRedundancyOptimizer"
    assert listed["state_bytes"] == _state_bytes(optimizer.optim) > 0
    assert len(profile.steps_stats) == 3
    assert [s.peak_phase for s in profile.steps_stats] == ["optimizer"] * 3
