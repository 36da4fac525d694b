"""memprof on models sharded with torch.distributed (FSDP2's ``fully_shard``), on CPU with gloo.

GIVEN a model whose parameters are DTensors (wrapper tensors that own no storage), WHEN it is
profiled, THEN each parameter, gradient and optimizer state is counted by its local shard.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memprof

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # pragma: no cover - torch before FSDP2
    pytest.skip("this torch has no torch.distributed.fsdp.fully_shard", allow_module_level=True)


@pytest.mark.parametrize("backend", ["dispatch", "events"])
def test_fsdp2_parameters_states_and_gradients_count_their_local_shards(
    one_rank: None, backend: str
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    assert type(model[0].weight).__name__ == "DTensor"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(32, 64)
    with memprof.profile(model, opt, backend=backend) as prof:  # type: ignore[arg-type]
        for _ in range(2):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            prof.step()
    frame = prof.modules().set_index("module")
    for name, (fan_in, fan_out) in (("0", (64, 128)), ("2", (128, 8))):
        weights = 4 * (fan_in * fan_out + fan_out)  # one rank: the shard is the whole tensor
        assert frame.loc[name, "parameter"] == weights
        assert frame.loc[name, "gradient"] == weights
        # AdamW: exp_avg and exp_avg_sq the size of the weights, and a float32 step a tensor
        assert frame.loc[name, "optimizer_state"] == 2 * weights + 2 * 4
    assert prof.profile.optimizers[0]["parameter_bytes"] == 4 * (64 * 128 + 128 + 128 * 8 + 8)
