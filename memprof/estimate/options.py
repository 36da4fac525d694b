"""How an estimate runs: :class:`EstimateOptions`, the keyword arguments of
:func:`~memprof.estimate.estimate` and :func:`~memprof.estimate.estimate_step` as one record,
checked when it is made."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from memprof.devices import CUDA_BLOCK_BYTES
from memprof.errors import EstimateError

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
OPTIMIZERS = ("adamw", "sgd", "adafactor", "none")
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class EstimateOptions:
    """What to estimate; a bad value raises :class:`~memprof.errors.EstimateError`.

    Training (default): forward, ``loss.backward()``, ``optimizer.step()``,
    ``zero_grad(set_to_none=True)`` per step; ``steps=2`` so that the second step's peak
    includes the optimizer state. The loss is ``output.loss`` when the model returns one (a
    transformers model given ``labels``), else ``loss_fn(output)``, else the mean of the first
    output tensor. ``optimizer``: ``adamw`` | ``sgd`` (momentum 0.9) | ``adafactor`` | ``none``
    (gradients only). ``mixed_precision="bf16"``/``"fp16"`` keeps fp32 weights and optimizer
    state and runs forward under autocast (``dtype`` must then be ``"fp32"`` or the same name).

    Inference (``inference=True``): ``model.eval()`` and ``torch.no_grad()``; for a model with
    a KV cache, a prefill over the batch and one decoding step, with a cache of ``context_len``
    positions (a static cache allocated up front) or, without it, as long as the prompt.

    ``device="cuda"`` charges storages in 512-byte blocks and adds
    :data:`~memprof.estimate.CUDA_CONTEXT_BYTES` to ``meta["estimate"]["device_total_bytes"]``;
    ``device="cpu"`` charges exact bytes, so the estimate equals a real CPU run. ``gpu`` (a
    name from :mod:`memprof.gpus`) adds a fit verdict to ``meta["estimate"]["fit"]``.
    """

    optimizer: str = "adamw"
    dtype: str = "bf16"
    mixed_precision: str | None = None
    device: str = "cuda"
    gpu: str | None = None
    steps: int = 2
    inference: bool = False
    context_len: int | None = None
    loss_fn: Callable[[Any], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("dtype", self.dtype, tuple(DTYPES))
        _check_choice("device", self.device, DEVICES)
        if self.mixed_precision is not None:
            _check_choice("mixed_precision", self.mixed_precision, ("bf16", "fp16"))
            if self.dtype not in ("fp32", self.mixed_precision):
                raise EstimateError(
                    f"mixed precision keeps fp32 weights: use dtype='fp32' "
                    f"(got dtype={self.dtype!r}, mixed_precision={self.mixed_precision!r})")
        if self.steps < 1:
            raise EstimateError(f"steps must be at least 1 (got {self.steps})")

    @property
    def parameter_dtype(self) -> torch.dtype:
        """The weights' dtype: fp32 under mixed precision, else ``dtype``."""
        return torch.float32 if self.mixed_precision else DTYPES[self.dtype]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype forward runs in under autocast; None without mixed precision."""
        return DTYPES[self.mixed_precision] if self.mixed_precision else None

    @property
    def round_to(self) -> int:
        """The block the profiler charges storages in (the CUDA allocator's on ``cuda``)."""
        return CUDA_BLOCK_BYTES if self.device == "cuda" else 1

    @property
    def step_optimizer(self) -> str:
        """The optimizer the step runs: ``none`` for inference."""
        return "none" if self.inference else self.optimizer


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise EstimateError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")
