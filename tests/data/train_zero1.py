"""A model trained with ZeRO-1 (ZeroRedundancyOptimizer over AdamW) on one gloo rank.

    python tests/data/train_zero1.py [--steps 3]
"""

import argparse
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=3)
args = parser.parse_args()

torch.manual_seed(0)
with tempfile.TemporaryDirectory() as folder:
    dist.init_process_group("gloo", init_method=f"file://{Path(folder) / 'store'}", rank=0,
                            world_size=1)
    try:
        model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW)
        for _ in range(args.steps):
            loss = model(torch.randn(16, 32)).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        dist.destroy_process_group()
