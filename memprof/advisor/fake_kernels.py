"""Fake kernels PyTorch lacks for what its CPU kernels run.

``torch._grouped_mm`` (the expert matmul of transformers' mixture-of-experts models) has a
meta kernel that demands bf16 inputs, CUDA's rule, while the CPU kernel multiplies fp32 too:
a fake run of an fp32 mixture-of-experts step on the CPU failed there, and every advisor row
of such a model fell back to its analytic prediction (5% to 43% off on the pattern zoo's
Mixtral). :func:`install` adds, once, a fake implementation for CPU inputs of any other dtype
that makes the output the CPU kernel makes (same shape and dtype, contiguous); bf16 inputs
and other devices keep PyTorch's own. It acts only inside :func:`active` (memprof's fake runs):
any other fake-tensor code, ``memprof.estimate`` included, sees PyTorch's own behaviour.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

_INSTALLED: list[bool] = []
_ACTIVE = [0]  # how many fake runs are inside active()


@contextlib.contextmanager
def active() -> Iterator[None]:
    """The fake kernels act while this is entered."""
    install()
    _ACTIVE[0] += 1
    try:
        yield
    finally:
        _ACTIVE[0] -= 1


def install() -> None:
    """Register the fake kernels (idempotent)."""
    if _INSTALLED:
        return
    from torch._subclasses.fake_impls import register_op_impl

    grouped_mm = getattr(torch.ops.aten, "_grouped_mm", None)
    if grouped_mm is not None:
        register_op_impl(lambda func: func is grouped_mm.default)(_grouped_mm_on_cpu)
    _INSTALLED.append(True)


def _grouped_mm_on_cpu(fake_mode: Any, func: Any, mat_a: torch.Tensor, mat_b: torch.Tensor,
                       offs: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       out_dtype: torch.dtype | None = None) -> Any:
    """The output of ``_grouped_mm`` on CPU inputs that are not bf16; NotImplemented (PyTorch's
    own meta kernel) otherwise."""
    from torch._subclasses.fake_tensor import FakeTensor, in_kernel_invocation_manager

    device = getattr(mat_a, "fake_device", mat_a.device)
    if not _ACTIVE[0] or device.type != "cpu" or mat_a.dtype == torch.bfloat16:
        return NotImplemented
    a_2d, b_2d = mat_a.dim() == 2, mat_b.dim() == 2
    if a_2d and b_2d:
        assert offs is not None
        size = [offs.shape[0], mat_a.shape[0], mat_b.shape[1]]
    elif a_2d:
        size = [mat_a.shape[0], mat_b.shape[-1]]
    elif b_2d:
        size = [mat_a.shape[1], mat_b.shape[1]]
    else:
        size = [mat_a.shape[0], mat_a.shape[1], mat_b.shape[-1]]
    with in_kernel_invocation_manager(fake_mode):
        out = torch.empty(size, dtype=out_dtype or mat_a.dtype, device="meta")
    return FakeTensor(fake_mode, out, device)
