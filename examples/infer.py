"""Inference only: no optimizer, no backward. memprof profiles the whole run as one step.

    python examples/infer.py [--batches 3] [--batch 32]
    memprof run examples/infer.py

Under ``torch.inference_mode()`` autograd saves nothing, so there are no activations: the
profile shows the parameters, the input batches and the forward's temporaries.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a model over a few random batches.")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--features", type=int, default=256)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(args.features, 1024), nn.GELU(), nn.LayerNorm(1024), nn.Linear(1024, 10)
    ).to(device).eval()
    total = 0
    with torch.inference_mode():
        for _ in range(args.batches):
            x = torch.randn(args.batch, args.features, device=device)
            total += int(model(x).argmax(dim=1).sum())
    print(f"predicted class sum: {total}")


if __name__ == "__main__":
    main()
