"""Mixed precision (memprof.advisor.mixed_precision): what autocast and pure bf16 keep in fp32,
read from the fp32 profile, and the fp16 + GradScaler row simulated (Workload and script).

GIVEN a small real model profiled in fp32, WHEN a precision change's prediction is compared
with the peak measured after applying it to a copy, THEN they agree within 5%.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn
from workloads import gpt2_workload, wide_mlp_workload

from memprof.advisor import Workload, changes_for, cpu_kernels, read_facts
from memprof.advisor import mixed_precision as mp
from memprof.advisor.core import Change, Facts
from memprof.advisor.script import ScriptSimulator
from memprof.advisor.workload import Measurement, baseline, seeded, simulate

pytestmark = pytest.mark.slow  # simulations of every precision change

SCRIPT = Path(__file__).parent / "data" / "train_tiny.py"


def mlp_workload() -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Workload(model, opt, (torch.randn(128, 64), torch.randint(0, 10, (128,))), steps=2)


def dropout_workload() -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Dropout(0.5), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Workload(model, opt, (torch.randn(256, 32), torch.randint(0, 4, (256,))), steps=2)


def conv_workload() -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Workload(model, opt, (torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))), steps=2)


@pytest.fixture(autouse=True)
def _model_at_hand() -> Any:
    """These analytic predictions are made with the model at hand: they may measure this
    CPU's 16-bit layer scratch (advice from a profile alone runs no kernel)."""
    with cpu_kernels.measuring():
        yield


MODELS: dict[str, Callable[[], Workload]] = {
    "mlp": mlp_workload,
    "wide": wide_mlp_workload,
    "gpt2": gpt2_workload,
    "dropout": dropout_workload,
    "conv": conv_workload,
}
_CACHE: dict[str, tuple[Workload, Measurement]] = {}


def measured(name: str) -> tuple[Workload, Measurement]:
    if name not in _CACHE:
        w = MODELS[name]()
        with seeded():
            _CACHE[name] = (w, baseline(w))
    return _CACHE[name]


def facts_of(name: str) -> Facts:
    return read_facts(measured(name)[1].profile)


def pick(changes: list[Change], **options: Any) -> Change:
    return next(
        c
        for c in changes
        if c.technique == "mixed_precision"
        and all(c.options.get(k) == v for k, v in options.items())
    )


def check(name: str, **options: Any) -> tuple[Change, Measurement, float]:
    w, ref = measured(name)
    change = pick(changes_for(read_facts(ref.profile)), **options)
    assert change.apply is not None and change.predicted_peak is not None
    with seeded():
        m = simulate(w, [change.apply], ref)
    error = abs(change.predicted_peak - m.peak_bytes) / m.peak_bytes
    assert error <= 0.05, (
        f"{options}: predicted {change.predicted_peak}, measured {m.peak_bytes} "
        f"({100 * error:.1f}%)"
    )
    return change, m, error


# ------------------------------------------------------------------ predictions vs measured
@pytest.mark.parametrize("model", ["mlp", "wide", "gpt2", "dropout"])
def test_pure_bf16_within_5pct(model: str) -> None:
    check(model, mode="pure")


@pytest.mark.parametrize("model", ["mlp", "wide", "gpt2", "dropout"])
def test_autocast_bf16_within_5pct(model: str) -> None:
    check(model, mode="autocast", dtype="bf16")


@pytest.mark.parametrize("model", ["mlp", "wide", "gpt2", "dropout"])
def test_autocast_fp16_with_grad_scaler_within_5pct(model: str) -> None:
    _change, m, _ = check(model, mode="autocast", dtype="fp16", grad_scaler=True)
    # the steps were taken (a step skipped for overflowing gradients creates no state)
    if measured(model)[1].profile.peak().by_category.get("optimizer_state", 0):
        assert m.profile.peak().by_category.get("optimizer_state", 0) > 0


# ------------------------------------------------------------------ what the model reads
def test_the_loss_is_what_the_activation_rises_by_after_the_models_forward() -> None:
    # Hugging Face computes the loss inside the root module's forward: its own activation
    facts = facts_of("gpt2")
    root = next(r for r in facts.module_rows() if r["module"] == "")
    assert mp.pure_layout(facts, "cpu").loss_bytes == root["activation"]
    # the Workload's cross-entropy runs outside the model: fp32 log-probabilities of the logits
    wide = mp.pure_layout(facts_of("wide"), "cpu")
    assert 1024 * 10 * 4 <= wide.loss_bytes < 1024 * 10 * 4 + 64


def test_autocast_keeps_layer_norms_and_the_loss_in_fp32() -> None:
    facts = facts_of("gpt2")
    types = {r["module"]: r["type"] for r in facts.module_rows()}
    layout = mp.autocast_layout(facts, "cpu")
    norms = [s for s in layout.segments if types.get(s.module) == "LayerNorm"]
    assert len(norms) == 5 and all(s.changed == s.baseline for s in norms)
    everything = layout.model_bytes + layout.loss_bytes
    assert layout.activation(everything) - layout.activation(layout.model_bytes) == (
        layout.loss_bytes
    )


def test_autocast_first_layer_saves_a_16bit_copy_of_the_float_input() -> None:
    layout = mp.autocast_layout(facts_of("wide"), "cpu")
    first = layout.segments[0]
    # the input x (1024 x 128 fp32) was no activation in fp32; the 16-bit copy is, and the
    # first Linear keeps no weight copy (its input needs no gradient)
    assert (first.module, first.baseline, first.changed) == ("0.0", 0.0, 1024 * 128 * 2)
    # every later Linear keeps its weight's 16-bit copy (weight and bias: 128 x 129 x 2 B)
    copies = [s for s in layout.segments[1:] if s.baseline == 0]
    assert [s.module for s in copies] == ["1.0", "2.0", "3.0", "4"]
    assert copies[0].changed == 128 * 129 * 2


def test_a_head_tied_to_the_embedding_copies_the_embeddings_weight() -> None:
    facts = facts_of("gpt2")
    wte = next(r for r in facts.module_rows() if r["module"] == "transformer.wte")
    assert mp._weights(facts)["lm_head"] == wte["parameter"]


def test_activation_rewrites_the_first_saved_bytes_first() -> None:
    layout = mp.ForwardLayout(
        [mp.Segment("a", 100.0, 50.0), mp.Segment("b", 0.0, 7.0), mp.Segment("c", 100.0, 100.0)],
        model_bytes=200.0,
        loss_bytes=40.0,
    )
    assert layout.activation(0) == 0
    assert layout.activation(50) == 25  # half of a's segment
    assert layout.activation(100) == 50  # b's copy comes with what is saved after it
    assert layout.activation(150) == 50 + 7 + 50
    assert layout.activation(240) == 50 + 7 + 100 + 40  # the loss stays as it was
    assert not layout.loss_live(200) and layout.loss_live(201)


@pytest.mark.parametrize("onednn", [False, True])
def test_slow_path_convolutions_are_named_in_the_caveats(
    monkeypatch: pytest.MonkeyPatch, onednn: bool
) -> None:
    monkeypatch.setattr(cpu_kernels, "mkldnn_runs", lambda dtype: onednn)
    columns = 4 * 3 * 9 * 8 * 8 * 2  # batch x in_channels x 3*3 x 8*8 outputs x 2 bytes
    changes = mp.predict(facts_of("conv"))
    assert len(changes) >= 3  # autocast, pure bf16, master weights: none may pass unchecked
    for change in changes:
        named = [c for c in change.caveats if "columns buffer" in c]
        assert len(named) == (0 if onednn else 1)
        assert all(f"largest {columns} B" in c for c in named)


def test_dropout_masks_follow_the_device() -> None:
    _, ref = measured("dropout")
    on_cpu = read_facts(ref.profile)
    data = ref.profile.to_dict()
    data["device"] = {**data["device"], "kind": "cuda", "name": "NVIDIA H100"}
    on_cuda = read_facts(type(ref.profile).from_dict(data))
    assert mp.target_device(on_cpu) == "cpu" and mp.target_device(on_cuda) == "cuda"

    def dropout_bytes(layout: mp.ForwardLayout) -> tuple[float, float]:
        seg = next(s for s in layout.segments if s.module == "1")
        return seg.baseline, seg.changed

    # CPU's dropout saves ``input * noise`` in the input's dtype: it halves with the input;
    # CUDA's saves a bool mask: the same bytes in any precision
    base, changed = dropout_bytes(mp.pure_layout(on_cpu, "cpu"))
    assert base > 0 and changed == base / 2
    assert dropout_bytes(mp.pure_layout(on_cuda, "cuda")) == (base, base)
    assert dropout_bytes(mp.autocast_layout(on_cuda, "cuda")) == (base, base)
    # under autocast on CPU the dropout runs on the first Linear's 16-bit output
    assert dropout_bytes(mp.autocast_layout(on_cpu, "cpu")) == (base, base / 2)


# ------------------------------------------------------------------ the GradScaler runs
class _CountingScaler(torch.amp.GradScaler):
    calls: ClassVar[dict[str, int]] = {}

    def scale(self, outputs: Any) -> Any:
        _CountingScaler.calls["scale"] = _CountingScaler.calls.get("scale", 0) + 1
        return super().scale(outputs)

    def step(self, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        _CountingScaler.calls["step"] = _CountingScaler.calls.get("step", 0) + 1
        return super().step(optimizer, *args, **kwargs)

    def update(self, new_scale: Any = None) -> None:
        _CountingScaler.calls["update"] = _CountingScaler.calls.get("update", 0) + 1
        super().update(new_scale)


def test_workload_steps_through_a_grad_scaler(monkeypatch: pytest.MonkeyPatch) -> None:
    w, ref = measured("mlp")
    change = pick(changes_for(read_facts(ref.profile)), dtype="fp16", grad_scaler=True)
    assert change.apply is not None
    _CountingScaler.calls = {}
    monkeypatch.setattr(torch.amp, "GradScaler", _CountingScaler)
    with seeded():
        m = simulate(w, [change.apply], ref)
    assert _CountingScaler.calls == {"scale": 2, "step": 2, "update": 2}
    assert m.loss_drift is not None and m.loss_drift < 0.05  # the loss is reported unscaled


def _run_tiny() -> None:
    saved = sys.argv[:]
    sys.argv = [str(SCRIPT)]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = saved


def test_script_steps_through_a_grad_scaler(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = ScriptSimulator(_run_tiny, steps=2)
    reference = sim.reference()
    change = pick(changes_for(read_facts(reference.profile)), dtype="fp16", grad_scaler=True)
    _CountingScaler.calls = {}
    monkeypatch.setattr(torch.amp, "GradScaler", _CountingScaler)
    m = sim.measure([change], reference)
    assert not isinstance(m, str), m
    # every backward scaled and every step through the scaler (a first step whose gradients
    # overflowed fp16 is skipped and takes one more); the last real step is stopped inside
    # the optimizer, before the scaler's update
    calls = _CountingScaler.calls
    assert calls["step"] >= 2 and calls["scale"] == calls["step"] == calls["update"] + 1
    assert m.loss_drift is not None and m.loss_drift < 0.05
    assert change.predicted_peak is not None
    assert abs(change.predicted_peak - m.peak_bytes) / m.peak_bytes <= 0.05
    assert torch.Tensor.backward.__name__ == "backward"  # the patch is undone
