"""The dispatch mode through which the storage ledger sees every operator's outputs (also
under ``FakeTensorMode``, where nothing is allocated)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

from memprof.tracking import kernel_corrections
from memprof.tracking.ledger import StorageLedger, keep_out_of_dynamo

#: torch.tensor(data) builds its storage below the dispatcher; the ledger first sees it as the
#: output of this aliasing op, so it is the one "view" that brings a new storage.
_LIFT_FRESH = torch.ops.aten.lift_fresh.default
_PRIM_DEVICE = torch.ops.prim.device.default


class LedgerMode(TorchDispatchMode):
    """Shows each operator's outputs to the ledger. The per-op work is O(1)."""

    def __init__(self, ledger: StorageLedger, corrections: Any = None) -> None:
        super().__init__()
        self.see = ledger.see
        self.ledger = ledger
        #: Under fake tensors: the measured kernel memory the fake kernels lack (a
        #: :class:`~memprof.tracking.kernel_corrections.KernelCorrections`), else None.
        self.corrections = corrections
        #: Per operator, what picks the operator run in its place from its arguments, while
        #: a caller sets it (:meth:`rewriting`): a fake run's backward has autograd's
        #: gradient sums made in place here, one dispatch mode less for every backward op.
        self.rewrites: dict[Any, Callable[[tuple[Any, ...], dict[str, Any] | None], Any]] = {}

    @contextlib.contextmanager
    def rewriting(
        self, func: Any, pick: Callable[[tuple[Any, ...], dict[str, Any] | None], Any]
    ) -> Iterator[None]:
        """Run ``pick(args, kwargs)``'s operator for ``func`` while entered."""
        before = self.rewrites.get(func)
        self.rewrites[func] = pick
        try:
            yield
        finally:
            if before is None:
                del self.rewrites[func]
            else:
                self.rewrites[func] = before

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # The default wraps __torch_dispatch__ in torch._dynamo.disable, which costs more than
        # the ledger itself on every op; nothing here is ever compiled.
        return False

    def __torch_dispatch__(  # type: ignore[no-untyped-def]
        self, func, types, args=(), kwargs=None
    ):
        if func is _PRIM_DEVICE and type(args[0]) is FakeTensor:
            # a fake tensor's device (autograd asks it of every tensor): its property answers
            # as FakeTensorMode would, without a trip through that mode
            return args[0].device
        pick = self.rewrites.get(func)
        if pick is not None:
            func = pick(args, kwargs)
        out = func(*args, **(kwargs or {}))
        if func.is_view and func is not _LIFT_FRESH:
            # A view allocates nothing: its storage is tracked already, or it predates the
            # profile (the batch viewed inside the model) and gets a role only if a hook gives
            # it one, as in the events backend, which sees no allocation for it either.
            return out
        if isinstance(out, torch.Tensor):
            self.see(out)
        elif isinstance(out, (tuple, list)):
            for item in out:
                if isinstance(item, torch.Tensor):
                    self.see(item)
        if self.corrections is not None and func in kernel_corrections.CORRECTED_OPS:
            kernel_corrections.apply(self.ledger, self.corrections, func, args, kwargs or {}, out)
        return out


keep_out_of_dynamo(LedgerMode.__torch_dispatch__)
