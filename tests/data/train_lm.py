"""A tiny language model whose loss is computed outside it (a label shift and a cross-entropy
over the logits, as hand-written loops do), trained with AdamW, for the fake-run capture tests.

    python tests/data/train_lm.py [--steps 3] [--accumulate 1] [--keep-grads]
"""

import argparse

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--accumulate", type=int, default=1)
parser.add_argument("--keep-grads", action="store_true", help="zero_grad(set_to_none=False)")
args = parser.parse_args()

VOCAB, D, SEQ, BATCH = 2048, 64, 64, 4


class LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        layer = nn.TransformerEncoderLayer(D, 4, 4 * D, dropout=0.1, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(tokens)))


torch.manual_seed(0)
model = LM()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
for step in range(args.steps):
    for _ in range(args.accumulate):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
        logits = model(tokens)
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB).float(), tokens[:, 1:].reshape(-1)
        ) / args.accumulate
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=not args.keep_grads)
    print(f"step {step} loss {loss.item():.4f}")
