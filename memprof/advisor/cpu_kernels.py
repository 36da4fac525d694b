"""Work buffers that CPU kernels allocate in 16 bits but not in fp32 (so a 16-bit prediction
read from an fp32 profile must add them).

Convolutions: in fp32, PyTorch runs CPU convolutions through oneDNN (mkldnn). In bf16 or fp16
it does so only where the CPU has the instructions for it (``torch.ops.mkldnn.
_is_mkldnn_bf16_supported()``: AVX-512 BW/VL/DQ, AVX512-BF16 or AMX); elsewhere it falls back to
``_slow_conv2d_forward`` / ``_slow_conv2d_backward`` (1-d convolutions go through 2-d, 3-d ones
through the 3-d variant), which unfold the input into a columns buffer of
``batch x (in_channels / groups) x prod(kernel) x prod(output spatial)`` elements in the
16-bit dtype, in the forward and again in the backward (measured with torch.profiler: exactly
that many bytes, allocated and freed inside the op). A 1x1 convolution with stride 1 and no
padding needs none. The decision is this machine's: a profile advised on another CPU gets that
CPU's answer only when advised there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memprof.advisor.core import Facts

CONV_TYPES = frozenset({"Conv1d", "Conv2d", "Conv3d"})


@dataclass(frozen=True)
class ConvWork:
    """What a 16-bit convolution holds at its busiest moment on the slow path, in bytes."""

    columns: float  # the unfolded input
    output: float  # its 16-bit output (forward)
    grad_input: float  # the 16-bit gradient of its input (backward; 0 if none is needed)


def mkldnn_runs(dtype: torch.dtype) -> bool:
    """Whether this machine's PyTorch runs ``dtype`` CPU convolutions through oneDNN."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if dtype == torch.float32:
        return True
    check = {
        torch.bfloat16: "_is_mkldnn_bf16_supported",
        torch.float16: "_is_mkldnn_fp16_supported",
    }.get(dtype)
    probe = getattr(torch.ops.mkldnn, check, None) if check else None
    return bool(probe()) if probe is not None else False


def slow_conv_work(facts: Facts, dtype: torch.dtype) -> dict[str, ConvWork]:
    """Per convolution module, the work of its slow 16-bit path; empty where the profile ran
    on a GPU, oneDNN covers ``dtype`` here, or the profile has no layer geometry."""
    device = facts.profile.device
    on_cpu = device.kind == "cpu" or (device.kind == "fake" and "cuda" not in device.name)
    if not on_cpu or mkldnn_runs(dtype):
        return {}
    itemsize = torch.empty((), dtype=dtype).element_size()
    model_inputs = [list(i.get("shape", [])) for i in facts.profile.meta.get("inputs") or []]
    work: dict[str, ConvWork] = {}
    for m in facts.profile.modules_stats:
        g = m.geometry
        if m.type not in CONV_TYPES or "input" not in g or "output" not in g:
            continue
        kernel, stride, padding = g["kernel_size"], g["stride"], g["padding"]
        pointwise = (
            math.prod(kernel) == 1 and all(s == 1 for s in stride)
            and not isinstance(padding, str) and all(p == 0 for p in padding)
        )
        batch, channels = g["input"][0], g["input"][1]
        out_spatial = math.prod(g["output"][2:])
        columns = 0 if pointwise else (
            batch * (channels // g["groups"]) * math.prod(kernel) * out_spatial * itemsize
        )
        needs_grad = g["input"] not in model_inputs  # the model's own input needs none
        work[m.name] = ConvWork(
            columns=float(columns),
            output=float(math.prod(g["output"]) * itemsize),
            grad_input=float(math.prod(g["input"]) * itemsize) if needs_grad else 0.0,
        )
    return work


def conv_scratch(work: dict[str, ConvWork], sample: dict[str, object]) -> float | None:
    """The 16-bit scratch of a moment inside a slow-path convolution: the module's own entry
    scratch halved, plus its columns and its output (forward) or input gradient (backward).
    None for any other sample."""
    conv = work.get(str(sample["module"]))
    if conv is None or not sample.get("transient") or sample["phase"] not in (
        "forward", "backward"
    ):
        return None
    entry = float(sample["temporary"]) - float(sample.get("excess", 0.0))  # type: ignore[arg-type]
    made = conv.output if sample["phase"] == "forward" else conv.grad_input
    return 0.5 * max(0.0, entry) + conv.columns + made
