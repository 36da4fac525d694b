"""GIVEN an LSTM language model whose decoder shares the embedding's weight, THEN pruning
sees the decoder's tied weight (the profile charges it to the embedding)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memprof.advisor import changes_for
from memprof.advisor.core import read_facts
from memprof.advisor.workload import Workload, baseline, seeded, simulate

pytestmark = pytest.mark.slow  # simulations of pruning on a tied transformers model


class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.rnn = nn.LSTM(32, 32, batch_first=True)
        self.decoder = nn.Linear(32, 100)
        self.decoder.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.rnn(self.embed(ids))[0])


def test_pruning_a_tied_decoder_counts_its_weight() -> None:
    torch.manual_seed(0)
    model = _TiedLM()
    opt = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 100, (4, 12))
    w = Workload(model, opt, ids, step_fn=lambda m, b: m(b).float().mean(), steps=2)
    with seeded():
        ref = baseline(w)
    facts = read_facts(ref.profile)
    decoder = next(r for r in facts.module_rows() if r["module"] == "decoder")
    assert decoder["parameter"] == 100 * 4  # the bias: the weight is charged to the embedding
    before_remove = next(c for c in changes_for(facts) if c.technique == "pruning"
                         and c.options.get("state") == "before prune.remove")
    # a mask and a recomputed weight for the decoder's 100x32 fp32 weight and its bias
    # (main: 2 x 400 B, the bias alone)
    assert before_remove.predicted_peak is not None
    assert before_remove.predicted_peak - facts.peak_bytes == 2 * (100 * 32 * 4 + 100 * 4)
    assert before_remove.apply is not None
    with seeded():
        m = simulate(w, [before_remove.apply], ref)
    assert m.peak_bytes > ref.peak_bytes  # pruning before prune.remove costs memory
