"""``memprof.estimate`` of models that clone their layers by deepcopy while being built
(``nn.TransformerEncoder``, ``nn.Transformer``), issue #25: it raised "Mixing fake modes NYI"
(an AssertionError) from the model factory."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from workloads import estimate_shaped_peak

import memprof
from memprof.errors import EstimateError

VOCAB, WIDTH, SEQ, BATCH = 256, 32, 16, 4


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 64, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)  # deepcopies
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.blocks(self.embed(ids)))
        return {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())}


class _Seq2Seq(nn.Module):
    """nn.Transformer with a causal mask buffer: it reads the mask's values in its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.transformer = nn.Transformer(WIDTH, 4, 1, 1, 64, dropout=0.0, batch_first=True)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(SEQ))

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.embed(ids)
        out = self.transformer(x, x, tgt_mask=self.causal)
        return {"loss": out.pow(2).mean()}


def _batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def _real_peak(model: nn.Module) -> int:
    """Two real steps shaped as estimate's."""
    return estimate_shaped_peak(model, _batch())


def test_a_model_cloning_its_layers_is_estimated_as_it_runs() -> None:
    """GIVEN nn.TransformerEncoder, which deepcopies its layer while being built WHEN
    estimated THEN the estimate runs (the copies were made in another fake mode: "Mixing fake
    modes NYI") and peaks within 1% of two real steps."""
    torch.manual_seed(0)
    real = _real_peak(_Encoder())
    profile = memprof.estimate(_Encoder, batch=_batch, optimizer="adamw", dtype="fp32",
                               device="cpu", steps=2)
    estimated = profile.peak().total_bytes
    assert abs(estimated - real) / real < 0.01


def test_nn_transformer_reading_its_mask_is_refused_naming_the_cause() -> None:
    """GIVEN nn.Transformer with a causal mask and no ``tgt_is_causal`` (it compares the mask's
    values with a causal one) WHEN estimated THEN one line names where values are read and
    what to pass instead (it was an AssertionError from the factory, then a generic line)."""
    with pytest.raises(EstimateError) as caught:
        memprof.estimate(_Seq2Seq, batch=_batch, optimizer="adamw", dtype="fp32",
                         device="cpu", steps=1)
    text = str(caught.value)
    assert "\n" not in text
    assert "transformer.py" in text and "_detect_is_causal_mask" in text
    assert "tgt_is_causal" in text
