"""GIVEN the hooks' shortcuts for the common tensors (a plain tensor, a weight saved for
backward), THEN they give what the general path gives."""

from __future__ import annotations

import torch
from torch import nn

from memprof.tracking.ledger import facts_of, on_cuda, storage_tensor


def _general_facts(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...], torch.dtype]:
    """facts_of's general path, step by step (storage_tensor, on_cuda)."""
    held = storage_tensor(tensor)
    storage = held.untyped_storage()
    raw = storage.nbytes()
    nbytes = -(-raw // 512) * 512 if on_cuda(held) else raw
    return storage.data_ptr(), nbytes, tuple(held.shape), held.dtype


def test_a_parameter_and_a_view_of_it_have_the_general_paths_facts() -> None:
    weight = nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
    assert type(weight) is nn.Parameter
    for tensor in (weight, weight.detach(), weight.detach()[2:]):
        assert facts_of(tensor) == _general_facts(tensor)
    key, nbytes, shape, dtype = facts_of(weight.detach()[2:])
    assert (key, nbytes, shape, dtype) == (weight.data_ptr(), 6 * 5 * 8, (4, 5), torch.float64)
