"""GIVEN storages the ledger tracks from the profile's start (gradients of a step run before
it), WHEN the program drops them inside the profile (``zero_grad(set_to_none=True)``), THEN the
events backend ends their entries although the CPU allocator reports no free of a block it
did not see allocated, and measures what the dispatch backend does, every run (#25)."""

from __future__ import annotations

import gc

import torch
from torch import nn

import memprof
from memprof.tracking.ledger import GRADIENT, TEMPORARY, StorageLedger
from memprof.tracking.prior import PriorStorages, end_prior

COLUMNS = ["peak_bytes", "start_bytes", "end_bytes", "peak_gradient"]


def _profile_after_a_step(backend: str) -> list[list[int]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(64, 256)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x).sum().backward()
        optimizer.step()

    step()  # gradients exist before profiling
    with memprof.profile(model, optimizer, backend=backend) as prof:
        for _ in range(3):
            step()
            prof.step()
    frame = prof.steps()
    return [[int(v) for v in frame[column]] for column in COLUMNS] + [[prof.peak().total_bytes]]


def test_gradients_made_before_profiling_end_at_zero_grad() -> None:
    dispatch = _profile_after_a_step("dispatch")
    # parameters 4*(256*1024+1024+1024*256+256) = 2,102,272 B, as many gradients, the input
    # 65,536 B at each step's end
    assert dispatch[2] == [2 * 2_102_272 + 65_536] * 3
    assert dispatch[4] == [4_532_232]
    for _ in range(5):
        assert _profile_after_a_step("events") == dispatch


def test_an_end_applies_only_to_the_entry_tracked_at_the_start() -> None:
    """Where the allocator reported the free (CUDA reports every free), the replay already
    removed the entry: the end changes nothing, also when a new storage took the address."""
    ledger = StorageLedger(by_ptr=True)
    old = ledger.alloc(4096, 1024, GRADIENT, 0, (256,), torch.float32)
    ledger.free(4096)  # the allocator's free event
    new = ledger.alloc(4096, 512, TEMPORARY, 0, (512,), torch.uint8)  # address reused
    end_prior(ledger, 4096, old)
    assert ledger.entries[4096] is new and ledger.total == 512
    end_prior(ledger, 4096, new)  # no event reported its free: the marker ends it
    assert 4096 not in ledger.entries and ledger.total == 0
    end_prior(ledger, 4096, new)  # once only
    assert ledger.total == 0


def test_the_watch_keeps_no_storage_alive_and_notes_its_death() -> None:
    ledger = StorageLedger(by_ptr=True)
    grad = torch.ones(1000)
    ptr = grad.untyped_storage().data_ptr()
    entry = ledger.track(grad, GRADIENT, 0)
    watch = PriorStorages(ledger)
    watch.watch([grad, None, grad.view(10, 100)])
    assert len(watch) == 1 and watch.died == []
    del grad
    gc.collect()
    assert watch.take() == [(ptr, entry)] and len(watch) == 0
    assert ledger.total == 4000  # the entry ends only at a marker, in the events' order
