"""The CPU's slow 16-bit convolution path (memprof.advisor.cpu_kernels) and the layer geometry
the profile records for it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import memprof
from memprof.advisor import cpu_kernels
from memprof.advisor.core import read_facts
from memprof.advisor.cpu_kernels import conv_scratch, mkldnn_runs, slow_conv_work


def trained_profile(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor
                    ) -> memprof.Profile:
    """Two steps of ``model(x).sum()``, profiled."""
    with memprof.profile(model, opt) as prof:
        for _ in range(2):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            prof.step()
    return prof.profile


def conv_profile(stride: int = 1, kernel: int = 3, padding: int = 1) -> memprof.Profile:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, kernel, stride=stride, padding=padding), nn.ReLU(),
                          nn.Conv2d(8, 8, kernel, stride=stride, padding=padding))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return trained_profile(model, opt, torch.randn(2, 4, 16, 16))


def test_geometry_is_recorded_saved_and_optional(tmp_path) -> None:  # type: ignore[no-untyped-def]
    profile = conv_profile(stride=2)
    conv = next(m for m in profile.modules_stats if m.name == "2")
    assert conv.geometry == {
        "input": [2, 8, 8, 8], "output": [2, 8, 4, 4], "kernel_size": [3, 3],
        "stride": [2, 2], "padding": [1, 1], "dilation": [1, 1], "groups": 1,
        "parameter_bytes": (8 * 8 * 3 * 3 + 8) * 4,
    }
    relu = next(m for m in profile.modules_stats if m.name == "1")
    assert relu.geometry == {"input": [2, 8, 8, 8], "output": [2, 8, 8, 8]}
    path = profile.save(tmp_path / "p.json")
    again = {m.name: m for m in memprof.load(path).modules_stats}
    assert again["2"].geometry == conv.geometry
    # a profile saved before memprof recorded geometry still loads, with none
    data = json.loads(path.read_text())
    for m in data["modules"]:
        del m["geometry"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = memprof.load(tmp_path / "old.json")
    assert all(m.geometry == {} for m in old.modules_stats)
    assert slow_conv_work(read_facts(old), torch.bfloat16) == {}


def test_columns_follow_the_unfold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "mkldnn_runs", lambda dtype: False)
    facts = read_facts(conv_profile())
    work = slow_conv_work(facts, torch.bfloat16)
    # batch x in_channels x 3*3 x 16*16 output positions x 2 bytes
    assert work["0"].columns == 2 * 4 * 9 * 256 * 2
    assert work["2"].columns == 2 * 8 * 9 * 256 * 2
    assert work["0"].grad_input == 0  # the model's input needs no gradient
    assert work["2"].grad_input == work["2"].output == 2 * 8 * 256 * 2
    # a moment inside the convolution: its entry scratch halves, the columns come on top
    sample = {"module": "2", "phase": "backward", "transient": True, "temporary": 1000.0,
              "excess": 600.0}
    assert conv_scratch(work, sample) == 200.0 + work["2"].columns + work["2"].grad_input
    assert conv_scratch(work, {**sample, "transient": False}) is None


def test_pointwise_convolutions_unfold_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "mkldnn_runs", lambda dtype: False)
    work = slow_conv_work(read_facts(conv_profile(kernel=1, padding=0)), torch.float16)
    assert work["0"].columns == 0 and work["2"].output == 2 * 8 * 256 * 2


def test_no_work_where_onednn_runs_16_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "mkldnn_runs", lambda dtype: True)
    assert slow_conv_work(read_facts(conv_profile()), torch.bfloat16) == {}


@pytest.mark.skipif(mkldnn_runs(torch.bfloat16), reason="this CPU runs bf16 convolutions in oneDNN")
def test_the_slow_path_allocates_the_columns() -> None:
    """Measured: a bf16 convolution's forward holds its columns and its output on top of
    its input and weights."""
    conv = nn.Conv2d(16, 16, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(4, 16, 32, 32, dtype=torch.bfloat16)
    with memprof.profile(conv) as prof, torch.no_grad():
        conv(x)
        prof.step()
    stats = prof.profile.modules_stats[0]
    columns = 4 * 16 * 9 * 32 * 32 * 2
    output = 4 * 16 * 32 * 32 * 2
    inputs = x.numel() * 2  # counted from the module's first call
    assert stats.peak_forward - prof.profile.steps_stats[0].start_bytes == (
        inputs + columns + output
    )


def linear_profile() -> memprof.Profile:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return trained_profile(model, opt, torch.randn(256, 64))


def test_layer_peaks_are_measured_from_the_allocations() -> None:
    # fp32 runs MKL's sgemm, which allocates nothing of its own: the forward allocates the
    # output, the backward the input's, weight's and bias's gradients, exactly.
    spec = ("Linear", (256, 64), (256, 4), True, (), True, True)
    forward, backward = cpu_kernels._peaks(spec, torch.float32)
    assert forward == 256 * 4 * 4
    assert backward == 256 * 64 * 4 + 4 * 64 * 4 + 4 * 4
    no_input_grad = ("Linear", (256, 64), (256, 4), True, (), False, True)
    assert cpu_kernels._peaks(no_input_grad, torch.float32)[1] == 4 * 64 * 4 + 4 * 4


def test_kernel_scratch_is_the_16_bit_excess_over_half_the_fp32_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[object, torch.dtype]] = []

    def peaks(spec: cpu_kernels.LayerSpec, dtype: torch.dtype) -> tuple[float, float]:
        calls.append((spec, dtype))
        return (1000.0, 3000.0) if dtype == torch.float32 else (900.0, 1000.0)

    monkeypatch.setattr(cpu_kernels, "_peaks", peaks)
    monkeypatch.setattr(cpu_kernels, "_MEASURED", {})
    facts = read_facts(linear_profile())
    # from a profile alone no kernel runs: the scratch is left out, and counted as such
    assert cpu_kernels.kernel_scratch(facts, torch.bfloat16) == {}
    assert cpu_kernels.unmeasured(facts, torch.bfloat16) == 2
    assert calls == []
    with cpu_kernels.measuring():
        scratch = cpu_kernels.kernel_scratch(facts, torch.bfloat16)
    # measured once, the layers' scratch serves later calls without running anything
    assert cpu_kernels.kernel_scratch(facts, torch.bfloat16) == scratch
    assert cpu_kernels.unmeasured(facts, torch.bfloat16) == 0
    assert len(calls) == 4
    # forward 900 - 1000/2; backward 1000 - 3000/2 < 0 counts as none
    assert scratch == {
        "0": cpu_kernels.KernelScratch(forward=400.0, backward=0.0),
        "2": cpu_kernels.KernelScratch(forward=400.0, backward=0.0),
    }
    specs = {spec for spec, _ in calls}
    # the model's own input needs no gradient; the hidden activations do; both have a bias
    assert specs == {
        ("Linear", (256, 64), (256, 128), True, (), False, True),
        ("Linear", (256, 128), (256, 4), True, (), True, True),
    }
    entry = {"module": "2", "phase": "forward", "entry": True}
    assert cpu_kernels.kernel_extra(scratch, entry) == 400.0
    assert cpu_kernels.kernel_extra(scratch, {**entry, "entry": False}) == 0.0  # a boundary
    assert cpu_kernels.kernel_extra(scratch, {**entry, "module": "1"}) == 0.0  # the ReLU


def test_no_kernel_scratch_off_cpu_or_for_layers_too_large(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    facts = read_facts(linear_profile())
    monkeypatch.setattr(cpu_kernels, "PROBE_LIMIT_BYTES", 1000)
    with cpu_kernels.measuring():
        assert cpu_kernels.kernel_scratch(facts, torch.bfloat16) == {}
    assert cpu_kernels.unmeasured(facts, torch.bfloat16) == 0
    monkeypatch.undo()
    gpu = dataclasses.replace(facts.profile.device, kind="cuda", name="NVIDIA H100")
    monkeypatch.setattr(facts.profile, "device", gpu)
    with cpu_kernels.measuring():
        assert cpu_kernels.kernel_scratch(facts, torch.bfloat16) == {}
    assert cpu_kernels.unmeasured(facts, torch.bfloat16) == 0
