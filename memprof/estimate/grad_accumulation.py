"""Autograd's in-place sum of gradients, which it skips under fake tensors.

Where a tensor is used more than once (a residual stream, a weight tied to two layers, a scan's
``select`` of one state), backward sums its gradients. The engine sums them in place into the
first gradient when it holds the only reference to a plain dense tensor that is no view, and
out of place (one buffer more, alive with both) otherwise. Fake tensors, and any tensor while a
Python dispatch mode is active, count as tensor subclasses, and the engine never sums those in
place: an estimate counted the extra buffer where the real run has none (zoo whisper under fp16
autocast +1.72%, its fp16 copy of the tied output layer's gradient; a tiny Mamba's scan +6.1%).

:class:`InPlaceGradSums` gives the engine's sum (``aten.add.Tensor`` of two gradients of one
shape and dtype, no ``alpha``, issued by the engine with grad mode off) the in-place form the
real run takes when the real run would take it: the first gradient is not a view, is dense and
its storage has no other tensor. The ledger below it then sees ``add_``, which allocates
nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

_ADD = torch.ops.aten.add.Tensor
_ADD_ = torch.ops.aten.add_.Tensor
#: A storage held by one tensor, counted while ``untyped_storage()`` holds it once more.
_ONE_TENSOR = 2


class InPlaceGradSums(TorchDispatchMode):
    """Enter it inside the profiler's dispatch mode, around ``loss.backward()``."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __torch_dispatch__(  # type: ignore[no-untyped-def]
        self, func, types, args=(), kwargs=None
    ):
        if func is _ADD and not kwargs and _summed_in_place(args):
            return _ADD_(args[0], args[1])
        return func(*args, **(kwargs or {}))


def in_place_sum(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> Any:
    """The operator :class:`InPlaceGradSums` runs for ``aten.add.Tensor(*args, **kwargs)``:
    for a dispatch mode that rewrites operators itself (the ledger's: one mode less per op)."""
    return _ADD_ if not kwargs and _summed_in_place(args) else _ADD


def grad_sums_in_place(ledger_mode: Any) -> contextlib.AbstractContextManager[Any]:
    """:class:`InPlaceGradSums`, or the same rewrite made by ``ledger_mode`` (a
    :class:`~memprof.tracking.ledger_mode.LedgerMode` that is the innermost dispatch mode;
    None: none is), which then sees ``add_`` as it would below InPlaceGradSums."""
    if ledger_mode is None:
        return InPlaceGradSums()
    return ledger_mode.rewriting(_ADD, in_place_sum)


def _summed_in_place(args: tuple[Any, ...]) -> bool:
    """Whether the real engine would sum ``args[1]`` into ``args[0]`` in place."""
    if len(args) != 2 or torch.is_grad_enabled() or torch._C._current_graph_task_id() == -1:
        return False
    first, second = args
    return (type(first) is FakeTensor and type(second) is FakeTensor
            and first.shape == second.shape and first.dtype == second.dtype
            and first.device == second.device and first._base is None
            and is_non_overlapping_and_dense_or_false(first)
            and torch._C._storage_Use_Count(first.untyped_storage()._cdata) == _ONE_TENSOR)
