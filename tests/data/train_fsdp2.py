"""Two-rank FSDP2 (fully_shard) on CPU (gloo): run with torchrun ... memprof run this."""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

dist.init_process_group("gloo")
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))
for layer in (model[0], model[2]):
    fully_shard(layer)
fully_shard(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randn(32, 64)
for _ in range(3):
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
dist.destroy_process_group()
