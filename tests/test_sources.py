"""The largest tensors at the peak name their real shape and dtype, and the line that made them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memprof
from memprof.tracking.source import SourceSampler


class Wide(nn.Module):
    """A forward whose largest saved tensor is made on a known line."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = x.repeat(1, 64) * 2.0  # MARK: the largest activation
        return self.proj(big.sin().reshape(-1, 16)).sum()


def _mark_line() -> int:
    import inspect

    lines, start = inspect.getsourcelines(Wide.forward)
    return start + next(i for i, line in enumerate(lines) if "MARK" in line)


@pytest.mark.parametrize("backend", ["dispatch", "events"])
def test_largest_activation_has_its_shape_and_source_line(backend: str) -> None:
    model = Wide()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(64, 16)
    with memprof.profile(model, optimizer, backend=backend) as prof:
        for _ in range(2):
            model(x).backward()
            optimizer.step()
            optimizer.zero_grad()
            prof.step()
    tops = prof.peak().top_tensors
    # big.sin() saves `big` (64 x 1024 float32 = 256 KiB): the largest activation
    saved = [t for t in tops if t.category == "activation" and t.nbytes == 64 * 1024 * 4]
    assert saved, tops
    # the tensor's own shape (the storage seen through a view counts), not `uint8 [262144]`
    assert all(t.dtype == "float32" and t.shape in ([64, 1024], [4096, 16]) for t in saved)
    # made on the marked line (`big`, saved by sin) or the next (sin's output, saved by proj)
    lines = {f"{__file__}:{_mark_line() + i} in forward" for i in (0, 1)}
    assert all(t.source in lines for t in saved), saved
    # and the profile file keeps it
    again = memprof.Profile.from_dict(prof.profile.to_dict())
    assert again.peak().top_tensors == tops


def test_sampler_keeps_only_candidates_for_the_largest() -> None:
    sampler = SourceSampler(keep=2)
    taken = []
    for size in [10, 20, 5, 30, 20, 1, 40]:
        if size >= sampler.floor:
            sampler.take(size)
            taken.append(size)
    # the first two fill the heap; after that only sizes reaching the 2nd largest so far
    assert taken == [10, 20, 30, 20, 40]
    assert sampler.floor == 30


def test_sampler_threshold_adds_every_large_allocation() -> None:
    sampler = SourceSampler(keep=1, threshold=8)
    sampler.take(100)
    assert sampler.floor == 8  # the threshold is below the largest seen: it decides
    off = SourceSampler(keep=0)
    assert off.floor > 1 << 60
