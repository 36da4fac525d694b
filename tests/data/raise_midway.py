"""A training script that crashes after two optimizer steps (for `memprof run` tests)."""

import sys

import torch
from torch import nn


def train(steps_before_crash: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(10):
        if step == steps_before_crash:
            model(torch.randn(8, 32))  # a forward that never finishes its step
            raise ValueError(f"simulated failure at step {step}")
        model(torch.randn(8, 32)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()


if __name__ == "__main__":
    train(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
