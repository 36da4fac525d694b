"""Two ranks with no process group: rank 1 stops early with exit code 5, rank 0 trains.

Rank 1 stops once rank 0's profile is written: torchrun sends SIGTERM to the other ranks when
one fails, and a rank killed so before memprof saved its profile has none (see the test)."""

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

rank = int(os.environ["RANK"])
model = nn.Linear(8, 4)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
if rank == 1:
    deadline = time.monotonic() + 240
    while not Path("reports/train_early_exit.rank0.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    sys.exit(5)
for _ in range(2):
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
