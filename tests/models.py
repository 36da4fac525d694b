"""Shared test models: small enough for CPU, with memory that can be worked out by hand.
(A plain module, not conftest.py: test files import these by name.)"""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

import memprof


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (what memprof must report)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr() if st.device.type != "meta" else id(st)] = st.nbytes()
    return sum(seen.values())


def make_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 10))


def make_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def make_gpt2(seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=128,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    loss = out.float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.detach()


class CheckpointedBlocks(nn.Module):
    """Three MLP blocks, each run under non-reentrant activation checkpointing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)) for _ in range(3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return x


def profile_model(make: str, backend: str, steps: int = 3) -> memprof.Profile:
    """``steps`` AdamW steps of the model named ``make`` ("mlp", "cnn", "gpt2" or "checkpoint"),
    profiled on ``backend``."""
    if make == "gpt2":
        model = make_gpt2()
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters())
        ids = torch.randint(0, 128, (2, 16))
        with memprof.profile(model, optimizer, backend=backend) as prof:  # type: ignore[arg-type]
            for _ in range(steps):
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                prof.step()
        return prof.profile
    model, x = {
        "mlp": (lambda: (make_mlp(), torch.randn(32, 64))),
        "cnn": (lambda: (make_cnn(), torch.randn(4, 3, 16, 16))),
        "checkpoint": (lambda: (CheckpointedBlocks(), torch.randn(32, 64))),
    }[make]()
    optimizer = torch.optim.AdamW(model.parameters())
    with memprof.profile(model, optimizer, backend=backend) as prof:  # type: ignore[arg-type]
        for _ in range(steps):
            train_step(model, optimizer, x)
            prof.step()
    return prof.profile
