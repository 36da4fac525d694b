"""Every zoo model (benchmarks/zoo.py) builds and trains one real step under memprof.profile,
with parameters, gradients and optimizer state equal to a count of their storages."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from models import storage_bytes

import memprof

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.zoo import ZOO, by_name

pytestmark = pytest.mark.slow  # the model zoo, profiled against hand counts

NAMES = [entry.name for entry in ZOO]


def test_the_zoo_covers_the_families_the_issue_names() -> None:
    families = {entry.family for entry in ZOO}
    assert len(ZOO) >= 12
    assert len(set(NAMES)) == len(NAMES)
    assert {"decoder LM", "encoder", "encoder-decoder", "vision", "recurrent",
            "plain torch"} <= families
    with pytest.raises(KeyError, match="the zoo has"):
        by_name("no-such-model")


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    tensors = [v for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor)]
    return storage_bytes(tensors)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_a_zoo_model_trains_under_the_profiler_with_exact_persistent_bytes(name: str) -> None:
    entry = by_name(name)
    if not entry.available():
        pytest.skip(f"{name} needs {entry.needs}")
    w = entry.build()
    assert w.optimizer is not None
    params = list(w.model.parameters())
    before = [p.detach().clone() for p in params]
    with memprof.profile(w.model, w.optimizer) as prof:
        for _ in range(2):
            loss = w.loss(w.model, w.batch)
            loss.backward()
            w.optimizer.step()
            w.optimizer.zero_grad(set_to_none=True)
            prof.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))  # it trained

    root = prof.profile.modules().set_index("module").loc[""]
    unique = storage_bytes(params)
    assert root["parameter_total"] == unique
    # every trained parameter gets a gradient of its size (Whisper freezes its positions)
    assert root["gradient_total"] == storage_bytes([p for p in params if p.requires_grad])
    assert root["optimizer_state_total"] == _state_bytes(w.optimizer)
    assert root["buffer_total"] == storage_bytes(list(w.model.buffers()))
    peak = prof.profile.peak()
    assert peak.by_category["parameter"] == unique
    assert peak.total_bytes >= unique + _state_bytes(w.optimizer)


@pytest.mark.parametrize("name", ["nn-transformer", "lstm-tied", "mha-checkpointed", "gru"])
def test_a_plain_torch_zoo_model_gives_the_advisor_its_outputs(name: str) -> None:
    # the advisor's drift check calls model(batch[0]); nn-transformer took two arguments
    w = by_name(name).build()
    with torch.no_grad():
        out = w.outputs(w.model, w.batch)
    assert out.shape[0] == 4 and torch.isfinite(out).all()
