"""The CPU's slow 16-bit convolution path (memprof.advisor.cpu_kernels) and the layer geometry
the profile records for it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import memprof
from memprof.advisor import cpu_kernels
from memprof.advisor.core import read_facts
from memprof.advisor.cpu_kernels import conv_scratch, mkldnn_runs, slow_conv_work


def conv_profile(stride: int = 1, kernel: int = 3, padding: int = 1) -> memprof.Profile:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, kernel, stride=stride, padding=padding), nn.ReLU(),
                          nn.Conv2d(8, 8, kernel, stride=stride, padding=padding))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 4, 16, 16)
    with memprof.profile(model, opt) as prof:
        for _ in range(2):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            prof.step()
    return prof.profile


def test_geometry_is_recorded_saved_and_optional(tmp_path) -> None:  # type: ignore[no-untyped-def]
    profile = conv_profile(stride=2)
    conv = next(m for m in profile.modules_stats if m.name == "2")
    assert conv.geometry == {
        "input": [2, 8, 8, 8], "output": [2, 8, 4, 4], "kernel_size": [3, 3],
        "stride": [2, 2], "padding": [1, 1], "dilation": [1, 1], "groups": 1,
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
