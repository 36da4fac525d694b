"""Two-rank DDP on CPU (gloo): run with torchrun --nproc-per-node 2 ... memprof run this."""

import torch
import torch.distributed as dist
from torch import nn

dist.init_process_group("gloo")
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(
    nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))
)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
torch.manual_seed(dist.get_rank())
# Rank 1 trains on a batch twice as large: the ranks' peaks differ.
x = torch.randn(16 * (1 + dist.get_rank()), 64)
for _ in range(3):
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
dist.destroy_process_group()
