"""Values for fake tensors where a step reads one that cannot change a byte: shared by
:mod:`memprof.estimate` and the advisor's fake runs (:mod:`memprof.advisor.fake_prediction`)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class ScalarStandIns(TorchDispatchMode):
    """Answers ``.item()`` with a stand-in (1) inside an optimizer step on fake tensors.

    Fake tensors have no values, so an optimizer that reads one (Adafactor's relative step
    size) would fail. The value only scales the update; reading it allocates nothing, so a
    stand-in changes no byte of the estimate. Models are not given stand-ins: a forward that
    branches on values fails with a clear message instead of silently taking one branch.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __torch_dispatch__(  # type: ignore[no-untyped-def]
        self, func, types, args=(), kwargs=None
    ):
        if func is torch.ops.aten._local_scalar_dense.default:
            tensor = args[0]
            if tensor.dtype == torch.bool:
                return True
            return 1.0 if tensor.is_floating_point() else 1
        return func(*args, **(kwargs or {}))
