"""The optimizer rows beyond SGD: Adafactor and the per-tensor loop instead of foreach.

GIVEN a profile, WHEN the advisor predicts Adafactor's factored state or the foreach -> loop
scratch from it, THEN the simulated step agrees within the issue's 5%, at the step's peak and
in the optimizer phase itself (where these changes act)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from workloads import gpt2_workload, measured, mlp_workload

from memprof.advisor import Workload, changes_for, read_facts
from memprof.advisor.core import Change
from memprof.advisor.optimizer import adafactor_state_bytes
from memprof.advisor.workload import Measurement, seeded, simulate

pytestmark = pytest.mark.slow  # simulations of every optimizer change


def params_workload() -> Workload:
    """Parameter-heavy (batch 4): the step's peak stays in the optimizer phase, where these
    changes act, so the peak checks their state and scratch models."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(4):
        layers += [torch.nn.Linear(512, 512), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Workload(model, opt, (torch.randn(4, 512), torch.randn(4, 512)), steps=2)


def _foreach(factory: Any) -> Workload:
    w: Workload = factory()
    w.optimizer = torch.optim.AdamW(w.model.parameters(), lr=1e-3, foreach=True)
    return w


FACTORIES = {
    "mlp": mlp_workload,
    "gpt2": gpt2_workload,
    "params": params_workload,
    "params-foreach": lambda: _foreach(params_workload),
    "mlp-foreach": lambda: _foreach(mlp_workload),
    "gpt2-foreach": lambda: _foreach(gpt2_workload),
}


def _measured(name: str) -> tuple[Workload, Measurement]:
    return measured(f"optimizer-{name}", FACTORIES[name])


def _row(ref: Measurement, to: str) -> Change:
    return next(c for c in changes_for(read_facts(ref.profile))
                if c.technique == "optimizer" and c.options.get("to") == to)


def test_adafactor_state_is_rows_plus_columns_per_matrix() -> None:
    # a 256 x 64 matrix: 256 + 64 floats; a 3 x 8 x 16 tensor: 3 x (8 + 16); a 256-vector in
    # full; 4 bytes of step each
    shapes = [[256, 64], [3, 8, 16], [256]]
    assert adafactor_state_bytes(shapes, 4) == 4 * (320 + 72 + 256) + 3 * 4


@pytest.mark.parametrize("model", ["params", "mlp", "gpt2"])
def test_adafactor_within_5pct(model: str) -> None:
    w, ref = _measured(model)
    change = _row(ref, "Adafactor")
    assert change.applicable and change.apply is not None and change.predicted_peak is not None
    with seeded():
        m = simulate(w, [change.apply], ref)
    assert abs(change.predicted_peak - m.peak_bytes) / m.peak_bytes <= 0.05
    if model == "params":  # the peak is the step's scratch: the state and scratch model
        assert m.profile.peak().phase == "optimizer"
    state = m.profile.optimizers[0]["state_bytes"]
    assert state < 0.05 * ref.profile.optimizers[0]["state_bytes"]  # factored: tiny vs Adam's
    assert m.loss_drift is not None


@pytest.mark.parametrize("model", ["params-foreach", "mlp-foreach", "gpt2-foreach"])
def test_foreach_to_per_tensor_loop_within_5pct(model: str) -> None:
    w, ref = _measured(model)
    assert ref.profile.optimizers[0]["defaults"]["foreach"] is True  # what the group ran
    change = _row(ref, "AdamW foreach=False")
    assert change.applicable and change.apply is not None and change.predicted_peak is not None
    with seeded():
        m = simulate(w, [change.apply], ref)
    assert m.profile.optimizers[0]["defaults"]["foreach"] is False
    assert abs(change.predicted_peak - m.peak_bytes) / m.peak_bytes <= 0.05
    if model == "params-foreach":
        assert m.profile.peak().phase == ref.profile.peak().phase == "optimizer"
        # foreach's scratch spans all 4 weights, the loop's two of one: about 2 weights saved
        assert ref.peak_bytes - m.peak_bytes > 1.5 * 512 * 512 * 4
    assert m.loss_drift is not None and m.loss_drift < 1e-4  # same algorithm


def test_per_tensor_loop_row_is_not_applicable_where_it_already_runs() -> None:
    _w, ref = _measured("mlp")  # CPU, foreach unset: torch runs the per-tensor loop
    change = _row(ref, "AdamW foreach=False")
    assert not change.applicable
    assert change.reason is not None and "per-tensor loop" in change.reason


def _lowbit_workload() -> Workload:
    """Tensors of every kind the 8-bit layout tells apart: several chunks (1024 x 512), one
    chunk, under 4096 elements (biases) and not a whole number of blocks (300 x 30)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 300),
        torch.nn.ReLU(), torch.nn.Linear(300, 30),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Workload(model, opt, (torch.randn(8, 512), torch.randn(8, 30)), steps=2)


def test_8bit_state_has_torchaos_layout_in_bytes() -> None:
    # GIVEN the 8-bit row applied to a real copy, WHEN its steps run
    from memprof.advisor.optimizer import BLOCK, CHUNK, QMAP_ENTRIES, AdamW8bit

    w = _lowbit_workload()
    big = w.model[0].weight
    assert big.numel() == 8 * CHUNK
    opt = AdamW8bit(w.model.parameters())
    w.loss(w.model, w.batch).backward()
    opt.step()
    # THEN each tensor's state is torchao's: 1 B codes + a 4 B scale per 256 elements + a
    # 1 KiB map per moment where quantized, two fp32 moments otherwise, and a 4 B step
    for p in w.model.parameters():
        state = opt.state[p]
        nbytes = sum(t.untyped_storage().nbytes() for t in state.values())
        n = p.numel()
        if n >= 4096 and n % BLOCK == 0:
            expected = 2 * (n + 4 * n // BLOCK + 4 * QMAP_ENTRIES) + 4
        else:
            expected = 2 * 4 * n + 4
        assert nbytes == expected, tuple(p.shape)
    assert not all(n % BLOCK == 0 for n in (p.numel() for p in w.model.parameters()))


def test_8bit_state_bytes_match_torchaos_own_buffers() -> None:
    torchao_optim = pytest.importorskip("torchao.optim")
    from memprof.advisor.optimizer import lowbit_layout

    w = _lowbit_workload()
    opt = torchao_optim.AdamW8bit(w.model.parameters())
    for p in w.model.parameters():
        ours = lowbit_layout(p)
        theirs = [opt._new_buffer(p, True), opt._new_buffer(p, False)]
        theirs_bytes = sum(
            sum(getattr(t, a).untyped_storage().nbytes() for a in ("codes", "scale", "qmap"))
            if hasattr(t, "codes") else t.untyped_storage().nbytes() for t in theirs
        )
        ours_bytes = sum(t.untyped_storage().nbytes() for k, t in ours.items() if k != "step")
        assert ours_bytes == theirs_bytes, tuple(p.shape)


def test_8bit_fake_run_equals_its_simulation_and_runs_one_chunk_per_tensor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from memprof.advisor import fake_prediction
    from memprof.advisor.fake_prediction import fake_peak

    w, reference = measured("lowbit", _lowbit_workload)
    [change] = [c for c in changes_for(read_facts(reference.profile))
                if c.options.get("to") == "AdamW8bit"]
    assert change.apply is not None
    with seeded():
        predicted = fake_peak(w, [change.apply])
    with seeded():
        real = simulate(w, [change.apply], reference)
    assert abs(predicted - real.peak_bytes) / real.peak_bytes < 0.001
    # the fake step runs one chunk of the eight-chunk weight: the same peak as every chunk
    monkeypatch.setattr(fake_prediction, "is_fake", lambda t: False)
    with seeded():
        assert fake_peak(w, [change.apply]) == predicted
