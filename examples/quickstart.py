"""memprof quick start: profile a small Transformer language model training on the CPU.

    python examples/quickstart.py [--steps 3] [--batch 8] [--seq 64] [--output PATH]

The model is the one from the memory-saving design articles memprof grew from: a stack of
``nn.TransformerEncoderLayer`` (d_model 512, 8 heads, 6 layers) over a 32,000-token vocabulary.
It trains a few steps with AdamW under ``memprof.profile``, prints where the memory went, layer
by layer, and saves the profile (open it with ``memprof report reports/quickstart.json``).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import memprof


class TinyLM(nn.Module):
    """Token embedding, a Transformer encoder stack, and a language-model head."""

    def __init__(self, vocab: int = 32000, d_model: int = 512, heads: int = 8,
                 layers: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--output", default="reports/quickstart.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    with memprof.profile(model, optimizer) as prof:
        for _ in range(args.steps):
            tokens = torch.randint(0, 32000, (args.batch, args.seq + 1))
            logits = model(tokens[:, :-1])
            loss = loss_fn(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            prof.step()

    print(prof.summary(top=12))
    path = prof.save(args.output, overwrite=True)
    print(f"\nprofile saved to {path}")


if __name__ == "__main__":
    main()
