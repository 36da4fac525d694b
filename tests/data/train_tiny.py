"""A tiny MLP trained with AdamW on seeded random data, for the script simulation tests.

    python tests/data/train_tiny.py [--steps 4] [--raise-at N] [--keep-grads]
"""

import argparse

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--raise-at", type=int, default=-1)
parser.add_argument("--keep-grads", action="store_true", help="zero_grad(set_to_none=False)")
args = parser.parse_args()

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                      nn.Linear(128, 8))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
for step in range(args.steps):
    if step == args.raise_at:
        raise RuntimeError(f"boom at step {step}")
    x = torch.randn(16, 64)
    y = torch.randint(0, 8, (16,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=not args.keep_grads)
    print(f"step {step} loss {loss.item():.4f}")
