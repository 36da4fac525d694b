"""Two ranks with no process group: rank 1 stops early with exit code 5, rank 0 trains."""

import os
import sys

import torch
from torch import nn

rank = int(os.environ["RANK"])
model = nn.Linear(8, 4)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
if rank == 1:
    sys.exit(5)
for _ in range(2):
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
