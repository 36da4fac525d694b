"""Fake kernels PyTorch lacks for what its CPU kernels run: shared by the advisor's fake runs
(:mod:`memprof.advisor.fake_prediction`) and :mod:`memprof.estimate` of a CPU step.

``torch._grouped_mm`` (the expert matmul of transformers' mixture-of-experts models) has a
meta kernel that demands bf16 inputs, CUDA's rule, while the CPU kernel multiplies fp32 too:
a fake run of an fp32 mixture-of-experts step on the CPU failed there, and every advisor row
of such a model fell back to its analytic prediction (5% to 43% off on the pattern zoo's
Mixtral). :func:`install` adds, once, a fake implementation for CPU inputs of any other dtype
that makes the output the CPU kernel makes (same shape and dtype, contiguous); bf16 inputs
and other devices keep PyTorch's own. It acts only inside :func:`active` (memprof's fake
runs, and ``memprof.estimate`` with ``device="cpu"``: a CUDA estimate keeps CUDA's bf16
rule): any other fake-tensor code sees PyTorch's own behaviour.

Sparse gradients (``nn.EmbeddingBag``/``nn.Embedding`` with ``sparse=True``, stepped by
SparseAdam): a fake sparse gradient held no entries (its number depends on the indices'
values), nor did ``coalesce`` of one, so a fake run counted none of the gradient's values and
indices, nor the optimizer step's sparse temporaries (the pattern zoo's recommender: 9.5%
below). The CPU kernels' backward makes one entry per looked-up index (uncoalesced), which the
fake kernels below make too; ``coalesce`` keeps at most as many (repeated indices merge: an
upper bound, exact when the indices are distinct), and ``clone`` and ``sparse_mask`` as many
as their input and mask hold, as does a cast (``_to_copy``).

CTC loss (``F.ctc_loss`` with tensor lengths: transformers' wav2vec2, HuBERT): the size of its
``log_alpha`` (batch x frames x (2 x the longest target + 1)) depends on the target lengths'
values, so PyTorch has no fake kernel for it. Where the lengths are known (a fake tensor holding
its real value as a constant: :mod:`memprof.estimate` keeps the values of the batch's tensors)
the kernels below make what the CPU kernels make; otherwise PyTorch's own refusal stands.
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
        if not _ACTIVE[0]:
            _forget_cached_outputs()


def _forget_cached_outputs() -> None:
    """Drop the outputs FakeTensorMode's class-wide dispatch cache kept from the kernels here
    (an fp32 expert matmul's; sparse outputs are never cached): fake-tensor code after a fake
    run would get them instead of PyTorch's own refusal (an estimate of a CUDA step did)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    grouped_mm = getattr(torch.ops.aten, "_grouped_mm", None)
    if grouped_mm is None:
        return
    ours = [key for key in FakeTensorMode.cache if key.key and key.key[0] is grouped_mm.default]
    for key in ours:
        del FakeTensorMode.cache[key]


def install() -> None:
    """Register the fake kernels (idempotent)."""
    if _INSTALLED:
        return
    from torch._subclasses.fake_impls import register_op_impl

    grouped_mm = getattr(torch.ops.aten, "_grouped_mm", None)
    if grouped_mm is not None:
        register_op_impl(lambda func: func is grouped_mm.default)(_grouped_mm_on_cpu)
    aten = torch.ops.aten
    register_op_impl(aten._embedding_bag_backward.default)(_embedding_bag_sparse_backward)
    register_op_impl(aten.embedding_backward.default)(_embedding_sparse_backward)
    register_op_impl(aten._coalesce.default)(_coalesce)
    register_op_impl(aten.clone.default)(_sparse_clone)
    register_op_impl(aten.sparse_mask.default)(_sparse_mask)
    register_op_impl(aten._to_copy.default)(_sparse_to_copy)
    register_op_impl(aten._ctc_loss.Tensor)(_ctc_loss_of_known_lengths)
    register_op_impl(aten._ctc_loss_backward.Tensor)(_ctc_loss_backward)
    _INSTALLED.append(True)


def _sparse_rows(fake_mode: Any, like: torch.Tensor, nnz: int, num_weights: int) -> Any:
    """A fake uncoalesced COO gradient of ``num_weights`` rows with ``nnz`` entries."""
    from torch._subclasses.fake_tensor import FakeTensor, in_kernel_invocation_manager

    device = getattr(like, "fake_device", like.device)
    width = like.shape[-1]
    with in_kernel_invocation_manager(fake_mode):
        indices = torch.empty((1, nnz), dtype=torch.int64, device="meta")
        values = torch.empty((nnz, width), dtype=like.dtype, device="meta")
        out = torch.sparse_coo_tensor(indices, values, (num_weights, width))
    return FakeTensor(fake_mode, out, device)


def _embedding_bag_sparse_backward(fake_mode: Any, func: Any, grad: torch.Tensor,
                                   indices: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """``nn.EmbeddingBag(sparse=True)``'s gradient: one entry per index (NotImplemented, for
    PyTorch's own kernel, outside fake runs or for a dense gradient)."""
    bound = func._schema.arguments
    values = dict(zip((a.name for a in bound), (grad, indices, *args), strict=False))
    values.update(kwargs)
    if not _ACTIVE[0] or not values.get("sparse"):
        return NotImplemented
    return _sparse_rows(fake_mode, grad, indices.numel(), int(values["num_weights"]))


def _embedding_sparse_backward(fake_mode: Any, func: Any, grad: torch.Tensor,
                               indices: torch.Tensor, num_weights: int, padding_idx: int,
                               scale_grad_by_freq: bool, sparse: bool) -> Any:
    """``nn.Embedding(sparse=True)``'s gradient: one entry per index (at most: the padding
    index's are left out)."""
    if not _ACTIVE[0] or not sparse:
        return NotImplemented
    return _sparse_rows(fake_mode, grad, indices.numel(), int(num_weights))


def _coalesce(fake_mode: Any, func: Any, tensor: torch.Tensor) -> Any:
    """A coalesced COO tensor with as many entries as ``tensor`` (at most that many)."""
    if not _ACTIVE[0] or tensor.layout != torch.sparse_coo:
        return NotImplemented
    return _coo_like(fake_mode, tensor, coalesced=True)


def _sparse_clone(fake_mode: Any, func: Any, tensor: torch.Tensor, **kwargs: Any) -> Any:
    """A copy of a COO tensor, with its entries (PyTorch's fake clone keeps none)."""
    if not _ACTIVE[0] or tensor.layout != torch.sparse_coo:
        return NotImplemented
    return _coo_like(fake_mode, tensor, coalesced=tensor.is_coalesced())


def _sparse_to_copy(fake_mode: Any, func: Any, tensor: torch.Tensor, **kwargs: Any) -> Any:
    """A COO tensor cast or copied (``grad.float()``), with its entries."""
    if not _ACTIVE[0] or tensor.layout != torch.sparse_coo or kwargs.get("layout") not in (
            None, torch.sparse_coo) or kwargs.get("device") not in (None, tensor.device):
        return NotImplemented
    return _coo_like(fake_mode, tensor, coalesced=tensor.is_coalesced(),
                     dtype=kwargs.get("dtype"))


def _sparse_mask(fake_mode: Any, func: Any, tensor: torch.Tensor, mask: torch.Tensor) -> Any:
    """``tensor``'s entries where the COO ``mask`` has one: as many as ``mask`` holds."""
    if not _ACTIVE[0] or mask.layout != torch.sparse_coo:
        return NotImplemented
    return _coo_like(fake_mode, mask, coalesced=mask.is_coalesced(), dtype=tensor.dtype)


def _coo_like(fake_mode: Any, tensor: torch.Tensor, *, coalesced: bool,
              dtype: torch.dtype | None = None) -> Any:
    from torch._subclasses.fake_tensor import FakeTensor, in_kernel_invocation_manager

    device = getattr(tensor, "fake_device", tensor.device)
    nnz = tensor._nnz()
    with in_kernel_invocation_manager(fake_mode):
        indices = torch.empty((tensor.sparse_dim(), nnz), dtype=torch.int64, device="meta")
        values = torch.empty((nnz, *tensor.shape[tensor.sparse_dim():]),
                             dtype=dtype or tensor.dtype, device="meta")
        out = torch.sparse_coo_tensor(indices, values, tensor.shape, is_coalesced=coalesced)
    return FakeTensor(fake_mode, out, device)


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


def _ctc_loss_of_known_lengths(fake_mode: Any, func: Any, log_probs: torch.Tensor,
                               targets: torch.Tensor, input_lengths: torch.Tensor,
                               target_lengths: torch.Tensor, blank: int = 0,
                               zero_infinity: bool = False) -> Any:
    """``_ctc_loss``'s outputs where the target lengths are known: the per-sample loss and
    ``log_alpha`` (batch, frames, 2 x the longest target + 1), as the CPU kernel makes them."""
    from torch._subclasses.fake_tensor import FakeTensor, in_kernel_invocation_manager

    lengths = getattr(target_lengths, "constant", None)
    device = getattr(log_probs, "fake_device", log_probs.device)
    if not _ACTIVE[0] or lengths is None or device.type != "cpu":
        return NotImplemented
    longest = int(lengths.max()) if lengths.numel() else 0
    batch = log_probs.shape[1] if log_probs.dim() == 3 else 1
    frames = log_probs.shape[0]
    with in_kernel_invocation_manager(fake_mode):
        loss = torch.empty((batch,), dtype=log_probs.dtype, device="meta")
        log_alpha = torch.empty((batch, frames, 2 * longest + 1), dtype=log_probs.dtype,
                                device="meta")
    return FakeTensor(fake_mode, loss, device), FakeTensor(fake_mode, log_alpha, device)


def _ctc_loss_backward(fake_mode: Any, func: Any, grad: torch.Tensor, log_probs: torch.Tensor,
                       *args: Any, **kwargs: Any) -> Any:
    """``_ctc_loss_backward``'s gradient: contiguous, the shape and dtype of ``log_probs``."""
    from torch._subclasses.fake_tensor import FakeTensor, in_kernel_invocation_manager

    device = getattr(log_probs, "fake_device", log_probs.device)
    if not _ACTIVE[0] or device.type != "cpu":
        return NotImplemented
    with in_kernel_invocation_manager(fake_mode):
        out = torch.empty(log_probs.shape, dtype=log_probs.dtype, device="meta")
    return FakeTensor(fake_mode, out, device)
