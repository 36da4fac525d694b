"""A plain PyTorch training script that knows nothing about memprof.

    python examples/train_mlp.py [--steps 5] [--batch 64] [--hidden 512]
    memprof run examples/train_mlp.py --steps 5          # the same script, profiled

An MLP classifier on random data with AdamW: the parameters, their gradients and Adam's two
state tensors per parameter are easy to work out by hand, which makes it a good first profile.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


def build(features: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Train an MLP on random data.")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build(args.features, args.hidden, args.classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(args.steps):
        x = torch.randn(args.batch, args.features, device=device)
        y = torch.randint(0, args.classes, (args.batch,), device=device)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
