"""Rows that cannot apply to a model with sparse gradients say so (issue #25): FSDP (ZeRO-2/3)
has no sparse-gradient kernel, and Adafactor or the 8-bit step cannot replace an optimizer
stepping sparse gradients."""

from __future__ import annotations

import torch
from torch import nn

import memprof
from memprof.advisor import advise


class _Recommender(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(1000, 16, mode="sum", sparse=True)
        self.head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(indices, offsets))


def _profile(optimizers: list[torch.optim.Optimizer], model: nn.Module) -> memprof.Profile:
    batch = [torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(0)),
             torch.arange(0, 64, 8)]
    with memprof.profile(model) as prof:
        for _ in range(2):
            model(*batch).pow(2).mean().backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad()
            prof.step()
    return prof.profile


def _rows(profile: memprof.Profile) -> list[dict]:
    return advise(profile, prediction="analytic", simulate=False).rows


def test_sparse_adam_beside_adam_gets_no_fsdp_or_adafactor_row() -> None:
    """GIVEN SparseAdam over a sparse embedding and Adam over the head WHEN advised THEN every
    ZeRO-2 and ZeRO-3 row and the Adafactor row is not applicable and names sparse gradients
    (each was run, and failed: fsdp::chunk_cat has no SparseCPU kernel, Adafactor raises on
    sparse gradients), and ZeRO-1 stays."""
    torch.manual_seed(0)
    model = _Recommender()
    optimizers = [torch.optim.SparseAdam(list(model.emb.parameters())),
                  torch.optim.Adam(model.head.parameters())]
    profile = _profile(optimizers, model)
    assert [o["sparse_gradients"] for o in profile.optimizers] == [1, 0]
    rows = _rows(profile)
    fsdp = [r for r in rows if r["technique"] == "sharding"
            and r["options"].get("stage") in ("ZeRO-2", "ZeRO-3 / FSDP")]
    assert len(fsdp) == 6
    assert all(not r["applicable"] and "FSDP has no sparse-gradient kernel" in r["reason"]
               for r in fsdp)
    zero1 = [r for r in rows if r["options"].get("stage") == "ZeRO-1"]
    assert len(zero1) == 3 and all(r["applicable"] for r in zero1)
    adafactor = next(r for r in rows if r["options"].get("to") == "Adafactor")
    assert not adafactor["applicable"]
    assert "Adafactor has no sparse-gradient support: 1 trained tensor" in adafactor["reason"]


def test_sgd_on_sparse_gradients_keeps_its_sgd_row_but_not_the_8bit_one() -> None:
    """GIVEN SGD with momentum over a sparse embedding and its head (no SparseAdam: the profile's
    record of sparse gradients tells) WHEN advised THEN plain SGD (which takes sparse
    gradients) stays a row and the 8-bit AdamW row is not applicable, with the reason."""
    torch.manual_seed(0)
    model = _Recommender()
    profile = _profile([torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)], model)
    assert profile.optimizers[0]["sparse_gradients"] == 1
    rows = _rows(profile)
    by_target = {r["options"].get("to"): r for r in rows
                 if r["technique"] in ("optimizer", "quantization") and "to" in r["options"]}
    assert by_target["SGD"]["applicable"]
    assert not by_target["AdamW8bit"]["applicable"]
    assert "AdamW8bit has no sparse-gradient support" in by_target["AdamW8bit"]["reason"]
