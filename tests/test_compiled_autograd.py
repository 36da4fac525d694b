"""Compiled autograd (#25): a backward run by ``torch._dynamo.compiled_autograd`` ended the
user's training under memprof: the recorder's C++ hook on each module's output node raised
"compiled_args nyi" (events backend) and the Python hook's end-of-backward callback raised
"queue_callback() is only supported when Compiled Autograd is enabled with fullgraph=True"
(dispatch backend). Now no module backward start is marked under it, and the profile says so."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memprof
from memprof.tracking.compiled import COMPILED_AUTOGRAD_WARNING


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _train(model: nn.Module, where: str, steps: int = 3) -> list[torch.Tensor]:
    """Steps whose backward (``where="backward"``) or whole forward and backward
    (``where="step"``) run under compiled autograd; the losses."""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        with compiled_autograd._enable(torch.compile(backend="eager")) if where == "step" \
                else torch.enable_grad():
            loss = model(x).pow(2).mean()
            if where == "step":
                loss.backward()
        if where == "backward":
            with compiled_autograd._enable(torch.compile(backend="eager")):
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("where", ["step", "backward"])
@pytest.mark.parametrize("backend", ["events", "dispatch"])
def test_compiled_autograd_runs_unchanged_under_the_profiler(backend: str, where: str) -> None:
    """GIVEN steps whose backward runs under compiled autograd WHEN profiled THEN they run (they
    raised), with the unprofiled losses, and where the forward ran under it too, the profile
    says its backward is not split by module (a backward alone runs eagerly under the dispatch
    backend's mode, and the events backend's C++ hook is left out of the compiled graph)."""
    expected = _train(_model(), where)
    model = _model()
    with memprof.profile(model, backend=backend) as prof:
        losses = _train(model, where)
    assert all(torch.equal(a, b) for a, b in zip(losses, expected, strict=True))
    assert prof.profile.steps_stats
    if where == "step":
        assert COMPILED_AUTOGRAD_WARNING in prof.profile.warnings
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
