"""The events replay's walk (issue #25's overhead): the C++ walk (memprof/tracking/walk.cpp)
and the Python one (events._Walk), each with the C++ or the Python allocator model, give the
same profile, byte for byte but for clock readings, on models whose transients make peaks in
the forward, the backward and the optimizer step."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

import memprof
from memprof.tracking import events, native, reserved

pytestmark = pytest.mark.skipif(native.load() is None, reason="memprof's recorder cannot build")


def _without_clocks(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _without_clocks(v)
            for k, v in value.items()
            if not (k.endswith("_s") or "time" in k or k == "created")
        }
    if isinstance(value, list):
        return [_without_clocks(v) for v in value]
    return value


def _conv_net() -> tuple[nn.Module, Any]:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10)
    )
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    return model, lambda: nn.functional.cross_entropy(model(x), y)


def _mlp() -> tuple[nn.Module, Any]:
    model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(6)])
    x = torch.randn(16, 64)
    return model, lambda: model(x).softmax(-1).pow(2).sum()


def _profile(build: Any) -> str:
    torch.manual_seed(0)
    model, loss = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with memprof.profile(model, optimizer, backend="events") as prof:
        for _ in range(3):
            loss().backward()
            optimizer.step()
            optimizer.zero_grad()
            prof.step()
    return json.dumps(_without_clocks(prof.profile.to_dict()), sort_keys=True, default=str)


@pytest.mark.parametrize("build", [_conv_net, _mlp])
def test_either_walk_with_either_allocator_model_gives_the_same_profile(
    build: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "PREFERRED_SOURCE", "recorder")
    made: list[str] = []
    real_walk = events._walk
    monkeypatch.setattr(
        events, "_walk", lambda raw, ledger: made.append("x") or real_walk(raw, ledger)
    )
    in_cpp = _profile(build)
    assert made, "the replay ran no walk"
    monkeypatch.setattr(
        events, "_walk", lambda raw, ledger: events._Walk(raw, ledger.entries, ledger.allocator)
    )
    in_python = _profile(build)
    monkeypatch.setattr(reserved, "USE_NATIVE", False)
    all_python = _profile(build)
    assert in_cpp == in_python == all_python
    assert '"peak"' in in_cpp


def test_the_cpp_walk_is_used_where_the_module_builds() -> None:
    ledger = memprof.tracking.ledger.StorageLedger(by_ptr=True)
    model = reserved.ReservedModel.create("")[0]
    assert model is not None
    ledger.allocator = model.model  # type: ignore[assignment]
    assert type(events._walk(b"", ledger)).__name__ == "Walk"
    ledger.allocator = None
    assert type(events._walk(b"", ledger)).__name__ == "Walk"
