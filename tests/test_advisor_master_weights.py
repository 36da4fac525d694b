"""bf16 weights with fp32 master weights: the prediction against the simulated step, and the
emulation itself (masters updated in fp32, copied back, listed as optimizer state)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from workloads import gpt2_workload, measured, mlp_workload, wide_mlp_workload

from memprof.advisor import Workload, changes_for, read_facts
from memprof.advisor.core import Change
from memprof.advisor.master_weights import OPTIONS
from memprof.advisor.workload import baseline, seeded, simulate, with_master_weights

pytestmark = pytest.mark.slow  # simulations of real models in 16 bits


def master_row(changes: list[Change]) -> Change:
    return next(c for c in changes if c.options == OPTIONS)


@pytest.mark.parametrize(
    ("name", "factory"),
    [("mlp", mlp_workload), ("wide", wide_mlp_workload), ("gpt2", gpt2_workload)],
)
def test_prediction_within_5pct(name: str, factory: Callable[[], Workload]) -> None:
    w, ref = measured(name, factory)
    change = master_row(changes_for(read_facts(ref.profile)))
    assert change.applicable and change.apply is not None and change.predicted_peak is not None
    with seeded():
        m = simulate(w, [change.apply], ref)
    assert abs(change.predicted_peak - m.peak_bytes) <= 0.05 * m.peak_bytes
    # the masters join the fp32 state: 4 more bytes per parameter
    params = sum(p.numel() for p in w.model.parameters())
    assert m.profile.optimizers[0]["state_bytes"] == ref.profile.optimizers[0]["state_bytes"] \
        + 4 * params
    assert m.loss_drift is not None and m.loss_drift < 0.01


def test_masters_step_in_fp32_and_are_copied_back() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 4).to(torch.bfloat16)
    opt = with_master_weights(
        [{"params": list(model.parameters())}], lambda g: torch.optim.AdamW(g, lr=1e-2)
    )
    masters = opt.param_groups[0]["params"]
    assert all(m.dtype == torch.float32 for m in masters)
    for _ in range(3):
        model(torch.randn(2, 8, dtype=torch.bfloat16)).float().sum().backward()
        opt.step()
        opt.zero_grad()
    for p, m in zip(model.parameters(), masters, strict=True):
        assert p.grad is None and m.grad is None
        assert torch.equal(p, m.to(torch.bfloat16))  # the weights are the rounded masters
        assert opt.state[m]["master"] is m and opt.state[m]["exp_avg"].dtype == torch.float32
    # the fp32 masters keep updates that bf16 weights alone would round away
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in masters)


def test_composes_with_an_optimizer_change() -> None:
    w, ref = measured("mlp", mlp_workload)
    changes = changes_for(read_facts(ref.profile))
    sgd = next(c for c in changes if c.options.get("to") == "SGD_momentum")
    master = master_row(changes)
    for order in ([sgd, master], [master, sgd]):
        with seeded():
            m = simulate(w, [c.apply for c in order if c.apply is not None], ref)
        assert [o["class"] for o in m.profile.optimizers] == ["SGD"]
        params = sum(p.numel() for p in w.model.parameters())
        # momentum (4 B) + master (4 B) per parameter, no step counters
        assert m.profile.optimizers[0]["state_bytes"] == 8 * params


def test_not_applicable_for_an_optimizer_without_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    w = Workload(model, torch.optim.SGD(model.parameters(), lr=0.1),
                 (torch.randn(8, 16), torch.randint(0, 2, (8,))), steps=2)
    with seeded():
        ref = baseline(w)
    row = master_row(changes_for(read_facts(ref.profile)))
    assert not row.applicable and "keeps no state" in row.reason
