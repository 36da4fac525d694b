"""The advisor on training patterns outside the model zoo (issue #25)."""

from __future__ import annotations

import torch
from torch import nn

from memprof.advisor import Workload, advise
from memprof.advisor.workload import baseline, seeded


class _BagRecommender(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(500, 16, mode="mean")
        self.head = nn.Linear(16, 1)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.emb(indices, offsets))
        return {"logits": logits, "loss": logits.pow(2).mean()}


def test_a_failing_batch_simulation_fails_its_rows_alone() -> None:
    """GIVEN a recommender whose ``indices`` (64 lookups) and ``offsets`` (8 bags) do not lead
    with the batch dimension, so that halving the "batch" cuts the indices under the offsets
    WHEN advised THEN the batch rows say why they failed and every other row is still there
    (the simulation's error used to raise out of ``advise``)."""
    torch.manual_seed(0)
    model = _BagRecommender()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    indices = torch.randint(0, 500, (64,))
    offsets = torch.arange(0, 64, 8)
    workload = Workload(model, optimizer, {"indices": indices, "offsets": offsets}, steps=2)
    with seeded():
        ref = baseline(workload)
    advice = advise(ref.profile, workload=workload, prediction="analytic")
    batch_rows = [r for r in advice.rows if r["technique"] == "batch"]
    assert batch_rows and all(not r["applicable"] for r in batch_rows)
    assert all("simulation failed" in r["reason"] for r in batch_rows)
    others = [r for r in advice.rows if r["technique"] != "batch" and r["applicable"]]
    assert sum(r["measured_peak_bytes"] is not None for r in others) >= 3
