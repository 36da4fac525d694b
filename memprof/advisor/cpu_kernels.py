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

Matmuls (and, where oneDNN runs them, 16-bit convolutions): in fp32 PyTorch calls MKL's sgemm,
which allocates nothing through PyTorch's allocator; in bf16 or fp16 it calls oneDNN where the
CPU supports it, whose kernels take a scratchpad (packed, padded blocks and fp32 accumulators)
from PyTorch's allocator, in forward and backward. Its size depends on the kernel oneDNN picks
for this CPU and shape (measured: a 256x64 by 64x4 bf16 backward on an AMX CPU takes 79,616
bytes for a 32,768-byte result), so it is not computed but *measured*: :func:`kernel_scratch`
runs each layer's op on zeros of the shapes the profile recorded, in fp32 and in 16 bits, and
keeps what the 16-bit run allocates beyond half of the fp32 one. Again this machine's answer.

Measuring runs real kernels at the profile's full sizes (30 s for GPT-2 small's fp16 layers on
a 2-core CPU without fp16 oneDNN), so it happens only inside :func:`measuring`; advice from a
profile alone runs no kernel and leaves this scratch out, saying so (:func:`unmeasured`): with
the model at hand, the fake runs measure each op's scratch themselves
(:mod:`memprof.tracking.kernel_corrections`, on fewer rows where a kernel is slow).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from memprof.advisor.core import CONV_TYPES, Facts
from memprof.profile import ModuleStats
from memprof.tracking.events import default_source
from memprof.tracking.kernel_corrections import allocation_peak
from memprof.tracking.session import Profiler

#: Layers whose 16-bit kernels :func:`kernel_scratch` measures (Conv1D is transformers').
PROBED_MATMUL_TYPES = frozenset({"Linear", "Conv1D"})
#: Layers whose fp32 tensors (input, weight, output) exceed this are not measured (too costly
#: to run here); their scratch is taken as half the fp32 one, like any other.
PROBE_LIMIT_BYTES = 256 * 2**20


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


@dataclass(frozen=True)
class KernelScratch:
    """Bytes a layer's 16-bit kernels allocate beyond half of what its fp32 kernels do."""

    forward: float
    backward: float

    def at(self, phase: object) -> float:
        return self.forward if phase == "forward" else self.backward if phase == "backward" else 0.0


#: A layer to measure: (type, input shape, output shape, has bias, conv settings, input needs
#: a gradient, weight needs a gradient); hashable, so each distinct layer is measured once.
LayerSpec = tuple[str, tuple[int, ...], tuple[int, ...], bool, tuple[Any, ...], bool, bool]

_measuring = [False]
#: Layers measured in this process: (spec, dtype, oneDNN switch) -> scratch.
_MEASURED: dict[tuple[LayerSpec, torch.dtype, bool], KernelScratch] = {}


@contextlib.contextmanager
def measuring() -> Iterator[None]:
    """Inside, :func:`kernel_scratch` runs the layers' kernels it has not measured yet."""
    _measuring.append(True)
    try:
        yield
    finally:
        _measuring.pop()


def kernel_scratch(facts: Facts, dtype: torch.dtype) -> dict[str, KernelScratch]:
    """Per matmul layer (and convolution, where oneDNN runs ``dtype`` here), its 16-bit kernel
    scratch measured on this machine: inside :func:`measuring`, or earlier in this process;
    empty unless the profile ran on this kind of device (a real CPU). Layers without recorded
    geometry or larger than :data:`PROBE_LIMIT_BYTES` are left out, and so is everything while
    a memprof profile runs (its recorder is in use)."""
    out: dict[str, KernelScratch] = {}
    for name, _spec, scratch in _layers(facts, dtype):
        if scratch is not None and (scratch.forward > 0 or scratch.backward > 0):
            out[name] = scratch
    return out


def unmeasured(facts: Facts, dtype: torch.dtype) -> int:
    """How many layers' 16-bit kernel scratch :func:`kernel_scratch` left out because no kernel
    runs outside :func:`measuring` (advice from a profile alone)."""
    return sum(1 for _name, _spec, scratch in _layers(facts, dtype) if scratch is None)


def _layers(
    facts: Facts, dtype: torch.dtype
) -> Iterator[tuple[str, LayerSpec, KernelScratch | None]]:
    """Each layer to measure, with its scratch (None: not measured, and not allowed to)."""
    if facts.profile.device.kind != "cpu" or Profiler._active is not None:
        return
    convs_fast = mkldnn_runs(dtype)
    training = any(m.own.get("gradient", 0) for m in facts.profile.modules_stats)
    model_inputs = [list(i.get("shape", [])) for i in facts.profile.meta.get("inputs") or []]
    for m in facts.profile.modules_stats:
        if m.type not in PROBED_MATMUL_TYPES and not (m.type in CONV_TYPES and convs_fast):
            continue
        spec = _layer_spec(m, input_grad=training and m.geometry.get("input") not in model_inputs,
                           weight_grad=training)
        if spec is None:
            continue
        key = (spec, dtype, bool(torch.backends.mkldnn.enabled))
        scratch = _MEASURED.get(key)
        if scratch is None and _measuring[-1]:
            scratch = _MEASURED[key] = _measured_scratch(spec, dtype)
        yield m.name, spec, scratch


def kernel_extra(scratch: dict[str, KernelScratch], sample: dict[str, object]) -> float:
    """The 16-bit kernel scratch to add at ``sample``: its layer's, at the moments that stand
    for the inside of that layer (its largest boundary sample and its transients); else 0."""
    layer = scratch.get(str(sample["module"]))
    if layer is None or not (sample.get("entry") or sample.get("transient")):
        return 0.0
    return layer.at(sample["phase"])


def _layer_spec(m: ModuleStats, *, input_grad: bool, weight_grad: bool) -> LayerSpec | None:
    g = m.geometry
    if "input" not in g or "output" not in g:
        return None
    x, y = tuple(g["input"]), tuple(g["output"])
    if m.type in PROBED_MATMUL_TYPES:
        weight = x[-1] * y[-1]
        conv: tuple[Any, ...] = ()
    else:
        padding = g["padding"] if isinstance(g["padding"], str) else tuple(g["padding"])
        conv = (tuple(g["stride"]), padding, tuple(g["dilation"]), g["groups"],
                tuple(g["kernel_size"]))
        weight = y[1] * (x[1] // g["groups"]) * math.prod(g["kernel_size"])
    if 4 * (math.prod(x) + math.prod(y) + weight) > PROBE_LIMIT_BYTES:
        return None
    # the module's own parameter bytes are a multiple of the weight's elements without a bias
    own = m.own.get("parameter", 0)
    has_bias = bool(own) and own % weight != 0
    return (m.type, x, y, has_bias, conv, input_grad, weight_grad)


def _measured_scratch(spec: LayerSpec, dtype: torch.dtype) -> KernelScratch:
    """The layer's 16-bit scratch, from one fp32 and one 16-bit run."""
    fp32 = _peaks(spec, torch.float32)
    low = _peaks(spec, dtype)
    return KernelScratch(*(max(0.0, a - 0.5 * b) for a, b in zip(low, fp32, strict=True)))


def _peaks(spec: LayerSpec, dtype: torch.dtype) -> tuple[float, float]:
    """The most bytes allocated at once while ``spec``'s op runs forward, then backward."""
    kind, x_shape, y_shape, has_bias, conv, input_grad, weight_grad = spec
    x = torch.zeros(x_shape, dtype=dtype, requires_grad=input_grad)
    if kind in PROBED_MATMUL_TYPES:
        # transformers' Conv1D keeps its weight (in, out) and calls addmm
        w_shape = (x_shape[-1], y_shape[-1]) if kind == "Conv1D" else (y_shape[-1], x_shape[-1])
    else:
        *_, groups, kernel = conv
        w_shape = (y_shape[1], x_shape[1] // groups, *kernel)
    w = torch.zeros(w_shape, dtype=dtype, requires_grad=weight_grad)
    b = torch.zeros(w_shape[-1] if kind == "Conv1D" else w_shape[0], dtype=dtype,
                    requires_grad=weight_grad) if has_bias else None

    def forward() -> torch.Tensor:
        with torch.enable_grad():
            if kind == "Conv1D":
                flat = x.reshape(-1, x_shape[-1])
                y = torch.addmm(b, flat, w) if b is not None else flat @ w
                return y.view(y_shape)
            if kind == "Linear":
                return F.linear(x, w, b)
            stride, padding, dilation, groups, _ = conv
            op = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[len(x_shape)]
            return op(x, w, b, stride, padding, dilation, groups)

    forward_peak, y = _peak_during(forward)
    wants = [t for t in (x, w, b) if t is not None and t.requires_grad]
    backward_peak = 0.0
    if wants and y.requires_grad:
        grad = torch.ones_like(y)
        backward_peak, _ = _peak_during(lambda: torch.autograd.grad(y, wants, grad))
    return forward_peak, backward_peak


def _peak_during(fn: Callable[[], Any]) -> tuple[float, Any]:
    """The most bytes allocated at once (and not freed) while ``fn`` runs, and its result."""
    source = default_source()
    source.start()
    try:
        result = fn()
    finally:
        events = source.stop()
    return float(allocation_peak(events)), result
