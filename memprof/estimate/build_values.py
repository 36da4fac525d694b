"""Values a model reads while it is built, computed for real under the estimate's fake mode.

Constructors read small tensors' values: ConvNeXt, Swin and timm's models take their
drop-path rates from ``torch.linspace(0, rate, depth).tolist()``. Fake tensors have no values,
so such a model failed to build (``DataDependentOutputException``). While the model is built,
a tensor that a factory function makes from Python values alone (no tensor argument) and
that is small is made for real and kept as the fake tensor's constant; fake tensor mode
then computes operations on constants for real (``split``, ``tolist``). What the constants
hold is no memory the estimate charges: the model is built before anything is profiled.

After the build, the constants made here that fake tensor mode would not have kept itself
(parameters, tensors of more than one element) are dropped, so that the step runs as it did:
operations on constants bypass fake tensor mode's cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

#: The largest tensor, in elements, a factory makes for real while the model is built.
BUILD_CONSTANT_ELEMENTS = 1 << 16


@contextlib.contextmanager
def values_while_building(mode: Any) -> Iterator[None]:
    """Within: small factory-made tensors carry real values under fake ``mode`` (None: off)."""
    with known_values(mode):
        yield


@contextlib.contextmanager
def known_values(mode: Any) -> Iterator[Any]:
    """Within: small factory-made tensors carry real values under fake ``mode`` (None: off),
    and so do small results of operations on them only (``labels.max()``,
    ``labels.masked_select(labels != pad)``). Used while the model is built, and while the
    batch is made and the step runs: a CTC loss reads its targets' lengths and maximum, a
    LayerDrop its random draw (made for real, from the global generator, as a real step's).

    Yields the factory mode (None when off): setting its ``elements`` lowers the size of the
    factory-made tensors made for real from there on (the step's: scalars only, as fake
    mode keeps; a step's larger zeros/arange made real changed a Mamba estimate by 0.39%)."""
    if mode is None:
        yield None
        return
    from torch._subclasses import fake_tensor

    converter = mode.fake_tensor_converter
    before = set(converter.constant_storage_mapping)
    kept_limit = fake_tensor.CONSTANT_NUMEL_LIMIT
    fake_tensor.CONSTANT_NUMEL_LIMIT = BUILD_CONSTANT_ELEMENTS
    try:
        with _SmallFactoriesAreReal(mode) as factories:
            yield factories
    finally:
        fake_tensor.CONSTANT_NUMEL_LIMIT = kept_limit
        _drop_constants(converter, before, kept_limit)


class _SmallFactoriesAreReal(TorchFunctionMode):
    """A torch function with no tensor argument whose fake result is small is run again for
    real, and its result becomes a fake tensor holding the real one as its constant."""

    def __init__(self, mode: Any) -> None:
        super().__init__()
        self.mode = mode
        self.elements = BUILD_CONSTANT_ELEMENTS  # the largest made for real

    def __torch_function__(  # type: ignore[no-untyped-def]
        self, func, types, args=(), kwargs=None
    ):
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (type(out) is not FakeTensor or out.fake_mode is not self.mode
                or out.constant is not None or out.numel() > self.elements
                or out.device.type != "cpu"
                or any(isinstance(a, torch.Tensor) for a in tree_leaves((args, kwargs)))):
            return out
        with unset_fake_temporarily():
            real = func(*args, **kwargs)
        if type(real) is not torch.Tensor:  # pragma: no cover - a factory of a subclass
            return out
        return self.mode.fake_tensor_converter.from_real_tensor(self.mode, real,
                                                                make_constant=True)


def _drop_constants(converter: Any, before: set[Any], kept_limit: int) -> None:
    """Drop the constants made while building that fake mode would not have kept."""
    for storage in list(converter.constant_storage_mapping):
        if storage in before:
            continue
        tensors = [ref() for ref in converter.constant_storage_mapping.get(storage, [])]
        alive = [t for t in tensors if t is not None and t.constant is not None]
        if any(isinstance(t, nn.Parameter) or getattr(t, "_is_param", False)
               or t.constant.numel() > kept_limit for t in alive) or not alive:
            if alive:
                converter.invalidate_constant_aliases(alive[0].constant)
            else:
                del converter.constant_storage_mapping[storage]
