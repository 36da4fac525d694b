"""``module.to(...)`` of fake parameters while the estimate's model is built.

PyTorch converts a module's fake parameters by ``torch.utils.swap_tensors``, which refuses a
tensor that has weak references, as every fake tensor of a FakeTensorMode has: so any
``.to()`` of a module built under the estimate failed, even one that changes nothing. peft's
``get_peft_model`` does exactly that (it moves each new adapter to its base layer's device and
dtype), so no peft model could be estimated ("_apply(): Couldn't swap Linear.weight").

While the model is built, a module's fake parameters and buffers are converted as
``torch.__future__.set_overwrite_module_params_on_conversion(True)`` would: a conversion that
returns the tensor itself leaves it in place, any other puts a new parameter in its place
(one per original parameter and conversion, so tied parameters stay tied). A module holding
real tensors converts as PyTorch does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def fake_module_conversion() -> Iterator[None]:
    """Within: ``nn.Module._apply`` (``.to()``, ``.float()``, ``.cpu()``...) converts fake
    parameters without swapping them."""
    from torch._subclasses.fake_tensor import FakeTensor

    original = nn.Module._apply
    # (id of the original tensor, the conversion) -> (the original, its conversion): a tensor
    # held by several modules is converted once; the original is held so that its id stays
    converted: dict[tuple[int, Any], tuple[torch.Tensor, torch.Tensor]] = {}

    def convert(tensor: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
                make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        key = (id(tensor), fn)
        if key not in converted:
            with torch.no_grad():
                applied = fn(tensor)
            converted[key] = (tensor, tensor if applied is tensor else make(applied))
        return converted[key][1]

    def apply(self: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor],
              recurse: bool = True) -> nn.Module:
        own = [t for t in (*self._parameters.values(), *self._buffers.values()) if t is not None]
        if not all(isinstance(t, FakeTensor) for t in own):
            return original(self, fn, recurse)
        if recurse:
            for child in self.children():
                child._apply(fn)
        for name, param in self._parameters.items():
            if param is None:
                continue

            def as_parameter(applied: torch.Tensor, param: nn.Parameter = param) -> torch.Tensor:
                new = nn.Parameter(applied, requires_grad=param.requires_grad)
                if param.grad is not None:
                    with torch.no_grad():
                        new.grad = fn(param.grad)
                return new

            self._parameters[name] = convert(param, fn, as_parameter)  # type: ignore[assignment]
        for name, buffer in self._buffers.items():
            if buffer is not None:
                self._buffers[name] = convert(buffer, fn, lambda applied: applied)
        return self

    nn.Module._apply = apply  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module._apply = original  # type: ignore[method-assign]
