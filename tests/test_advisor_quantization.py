"""Weight-only quantization on model code that reads a quantized layer's ``weight``."""

from __future__ import annotations

import copy

import pytest
import torch

from memprof.advisor import Workload, changes_for
from memprof.advisor.core import read_facts
from memprof.advisor.quantization import QuantLinear
from memprof.advisor.workload import baseline, seeded, simulate

pytestmark = pytest.mark.slow  # simulations of quantized real models


def t5_workload() -> Workload:
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
        num_heads=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config)
    ids = torch.randint(0, 128, (2, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Workload(model, opt, {"input_ids": ids, "labels": ids}, steps=2)


def test_quantized_weight_is_a_storage_less_stand_in() -> None:
    linear = torch.nn.Linear(16, 8)
    layer = QuantLinear(linear, 8)
    assert layer.weight.shape == (8, 16) and layer.weight.dtype == torch.float32
    assert layer.weight.device == linear.weight.device
    assert layer.weight.data_ptr() == 0  # no memory behind it
    assert "weight" not in dict(layer.named_parameters()) | dict(layer.named_buffers())
    with pytest.raises(RuntimeError, match="weight_fp"):  # never silently computed with
        torch.nn.functional.linear(torch.randn(2, 16), layer.weight)
    assert copy.deepcopy(layer).weight.shape == (8, 16)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_t5_quantization_simulates(bits: str) -> None:
    """T5's feed-forward reads ``self.wo.weight.dtype``: on main this raised AttributeError
    ('QuantLinear' object has no attribute 'weight') and the row was never measured."""
    workload = t5_workload()
    with seeded():
        ref = baseline(workload)
    change = next(
        c for c in changes_for(read_facts(ref.profile))
        if c.technique == "quantization" and c.options.get("weights") == bits
    )
    assert change.apply is not None and change.predicted_peak is not None
    with seeded():
        m = simulate(workload, [change.apply], ref)
    assert 0 < m.peak_bytes < ref.peak_bytes  # frozen Linears: their grads and Adam states go
    assert change.predicted_peak < ref.peak_bytes  # the predicted saving has the right sign
    assert m.loss_drift is not None and m.loss_drift < 0.5
