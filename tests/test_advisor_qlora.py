"""QLoRA rows: torchao NF4 frozen base plus peft adapters, on a copy and on the fake copy."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from workloads import gpt2_workload

from memprof.advisor import changes_for, qlora
from memprof.advisor.core import read_facts
from memprof.advisor.fake_prediction import fake_peak
from memprof.advisor.workload import Workload, baseline, seeded, simulate

pytestmark = pytest.mark.slow  # torchao NF4 bases with LoRA, simulated and faked

needs_finetune = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("peft", "torchao")),
    reason="needs memprof[finetune] (peft, torchao)")

pytest.importorskip("peft")
@needs_finetune
def test_conv1d_becomes_an_nf4_linear_computing_the_same_map() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    conv = transformers.pytorch_utils.Conv1D(192, 64)  # 64 -> 192, weight stored (64, 192)
    layer = qlora.quantize_layer(conv)
    assert isinstance(layer, torch.nn.Linear) and layer.bias is conv.bias
    assert not layer.weight.requires_grad and type(layer.weight).__name__ == "NF4Tensor"
    x = torch.randn(4, 64)
    with torch.no_grad():
        exact, approx = conv(x), layer(x)
    assert approx.shape == exact.shape
    assert float((approx - exact).norm() / exact.norm()) < 0.2  # 4-bit rounding, not a transpose
    assert qlora.scaler_block(64 * 192) == 64  # 192 blocks of 64: 256 does not divide them
    assert qlora.scaler_block(100) is None


@needs_finetune
def test_gpt2_qlora_fake_prediction_matches_the_simulation() -> None:
    """GIVEN a small GPT-2, WHEN its QLoRA row (rank 16) runs on fake tensors and for real with
    torchao's NF4 and peft, THEN the peaks agree within 3%, the adapters alone are optimized,
    and the targets' weights are held as 4-bit data (hand count)."""
    workload = gpt2_workload()
    with seeded():
        ref = baseline(workload)
    change = next(c for c in changes_for(read_facts(ref.profile))
                  if c.technique == "qlora" and c.options["rank"] == 16)
    plain = next(c for c in changes_for(read_facts(ref.profile))
                 if c.technique == "lora" and c.options["rank"] == 16)
    assert change.apply is not None and plain.apply is not None
    with seeded():
        predicted = fake_peak(workload, [change.apply])
        measured = simulate(workload, [change.apply], ref)
        with_lora = simulate(workload, [plain.apply], ref)
    assert abs(predicted - measured.peak_bytes) <= 0.03 * measured.peak_bytes
    assert measured.profile.optimizers[0]["parameter_bytes"] == 2 * 16 * 1024 * 4
    # per block: c_attn 64x192, attn c_proj 64x64, c_fc 64x256, mlp c_proj 256x64
    elements = 2 * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64)
    params = measured.profile.peak().by_category["parameter"]
    lora_params = with_lora.profile.peak().by_category["parameter"]
    # fp32 -> NF4: 4-bit data plus the scales torchao keeps beside it (every inner tensor)
    nf4_bytes = 2 * sum(_nf4_bytes(rows, cols) for rows, cols in
                        ((192, 64), (64, 64), (256, 64), (64, 256)))
    assert nf4_bytes > elements // 2  # the scales are counted too
    assert lora_params - params == elements * 4 - nf4_bytes
    assert measured.loss_drift is not None and measured.loss_drift < 0.2
    assert change.predicted_peak is not None
    assert abs(change.predicted_peak - measured.peak_bytes) <= 0.05 * measured.peak_bytes


@needs_finetune
def test_a_peft_lora_model_gets_its_bases_in_nf4_under_its_own_adapters() -> None:
    """GIVEN a small GPT-2 that already trains peft LoRA adapters (the usual fine-tuning
    start), WHEN the advisor reads its profile, THEN its QLoRA row keeps the adapters and puts
    the frozen base layers under them in NF4: the fake run and the analytic rewrite agree with
    the simulation within 1%, the base weights' bytes go exactly (hand count), the optimizer
    and its state do not change."""
    from peft import LoraConfig, get_peft_model

    base = gpt2_workload()
    model = get_peft_model(base.model, LoraConfig(
        r=8, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    workload = Workload(model, opt, base.batch, steps=2)
    with seeded():
        ref = baseline(workload)
    rows = [c for c in changes_for(read_facts(ref.profile)) if c.technique == "qlora"]
    assert len(rows) == 1 and rows[0].applicable and rows[0].apply is not None
    change = rows[0]
    assert len(change.options["modules"]) == 8  # 4 adapted layers per block, 2 blocks
    assert all(n.endswith(".base_layer") for n in change.options["modules"])
    with seeded():
        predicted = fake_peak(workload, [change.apply])
        measured = simulate(workload, [change.apply], ref)
    assert abs(predicted - measured.peak_bytes) <= 0.01 * measured.peak_bytes
    assert change.predicted_peak is not None
    assert abs(change.predicted_peak - measured.peak_bytes) <= 0.01 * measured.peak_bytes
    assert measured.peak_bytes < ref.peak_bytes
    shapes = ((192, 64), (64, 64), (256, 64), (64, 256))  # per block, as (out, in)
    fp32_weights = 2 * 4 * sum(rows_ * cols for rows_, cols in shapes)
    nf4 = 2 * sum(_nf4_bytes(rows_, cols) for rows_, cols in shapes)
    before, after = ref.profile.peak().by_category, measured.profile.peak().by_category
    assert before["parameter"] - after["parameter"] == fp32_weights - nf4
    assert after["optimizer_state"] == before["optimizer_state"]
    assert measured.profile.optimizers[0]["parameter_bytes"] == \
        ref.profile.optimizers[0]["parameter_bytes"]
    assert measured.loss_drift is not None and measured.loss_drift < 0.2


def _layout(nf4: torch.Tensor) -> tuple[object, ...]:
    """What the ledger reads of an NF4 weight: its outer metadata and, per inner tensor, the
    shape, dtype, strides and storage bytes."""
    names, _ = nf4.__tensor_flatten__()  # type: ignore[attr-defined]
    inner = [(n, tuple(t.shape), t.dtype, t.stride(), t.storage_offset(),
              t.untyped_storage().nbytes()) for n, t in ((n, getattr(nf4, n)) for n in names)]
    return (tuple(nf4.shape), nf4.stride(), nf4.dtype, nf4.requires_grad,
            nf4.block_size, nf4.n_blocks, nf4.scaler_block_size, inner)  # type: ignore[attr-defined]


@needs_finetune
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(128, 128), (192, 64), (64, 2), (768, 2304)])
def test_a_fake_nf4_weight_made_directly_is_laid_out_as_torchaos(
    shape: tuple[int, int], dtype: torch.dtype
) -> None:
    # GIVEN a fake weight (one block of scales, 64-blocks of scales, one block, GPT-2's c_attn)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.empty(shape, dtype=dtype)
        scalers = qlora.scaler_block(w.numel())
        assert scalers is not None
        # WHEN its NF4 form is made directly, and by torchao's quantization under fake tensors
        direct = qlora.fake_nf4(w, qlora.BLOCK, scalers)
        quantized = qlora.nf4_module().to_nf4(w, qlora.BLOCK, scalers)
    real = qlora.nf4_module().to_nf4(torch.randn(shape, dtype=dtype), qlora.BLOCK, scalers)
    # THEN every inner tensor has the same shape, dtype, strides and storage bytes as both
    assert type(direct) is type(quantized)
    assert _layout(direct) == _layout(quantized) == _layout(real)


def test_without_peft_or_torchao_qlora_predicts_and_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workload = gpt2_workload()
    with seeded():
        ref = baseline(workload)
    monkeypatch.setattr(qlora, "available", lambda: False)
    rows = [c for c in changes_for(read_facts(ref.profile)) if c.technique == "qlora"]
    assert [c.options["rank"] for c in rows] == list(qlora.RANKS)
    for change in rows:
        assert change.apply is None and change.predicted_peak is not None
        if change.options["rank"] == 16:  # rank 64 adapters outweigh this 64-wide model
            assert change.predicted_peak < ref.peak_bytes
        assert any("memprof[finetune]" in c for c in change.caveats)


def _nf4_bytes(rows: int, cols: int) -> int:
    """The bytes torchao's NF4 form of a rows x cols weight holds: its inner tensors' storages."""
    from memprof.advisor.qlora import BLOCK, nf4_module, scaler_block

    nf4 = nf4_module().to_nf4(torch.zeros(rows, cols), BLOCK, scaler_block(rows * cols))
    names, _ = nf4.__tensor_flatten__()
    return sum(getattr(nf4, name).untyped_storage().nbytes() for name in names)
