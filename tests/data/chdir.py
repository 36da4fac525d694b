"""Changes the working directory mid-run; memprof must still write where it was started."""

import os
import sys

import torch

os.makedirs(sys.argv[1], exist_ok=True)
os.chdir(sys.argv[1])
model = torch.nn.Linear(8, 8)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model(torch.randn(2, 8)).sum().backward()
optimizer.step()
