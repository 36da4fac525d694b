"""Mixed precision: autocast (bf16, or fp16 with a GradScaler) and pure bf16 training.

What the predictions model, all of it read from the fp32 profile:

- **Saved activations, in the order the forward saved them.** Backward frees saved tensors in
  the reverse order, so the activation bytes live at any sample are the first ones the forward
  saved. The timeline's forward samples of the peak step say which module saved how many bytes
  (each rise in activation between two samples belongs to the module the first of them is in);
  a sample's activation is rewritten segment by segment (:class:`ForwardLayout`).
- **Autocast** (``torch.autocast``'s op lists), following the running tensor's dtype through
  the forward: matmuls and convolutions run in 16 bits and save a 16-bit copy of their input
  (half the bytes) and of their weight (autocast's cast cache; half the weight's fp32 bytes; a
  head that owns no weight uses the tied embedding's); the first layer, when it is a matmul on
  the model's float input, saves a 16-bit copy of that input (which the fp32 profile counted
  as input, not activation) and, being an mm whose input needs no gradient, no weight copy.
  What runs on a matmul's 16-bit output saves 16 bits (activations, attention, BatchNorm,
  dropout). What stays fp32: layer/RMS norms (their input is the fp32 residual stream;
  ``layer_norm`` and ``group_norm`` are on CUDA's fp32 list), embeddings and what runs on
  their output (fp32 weights, on no list), CUDA's dropout masks (bool, 1 byte in any
  precision; CPU's dropout saves a mask in its input's dtype) and the loss (``cross_entropy``,
  ``nll_loss``, ``mse_loss`` are on the fp32 list; Hugging Face's losses and the Workload's
  default ones upcast the logits).
- **Pure bf16** halves weights, gradients, optimizer states, floating inputs and every saved
  activation but CUDA's dropout masks and the loss: its logits are upcast to fp32 first, so
  the saved log-probabilities stay fp32, and so does what outlives the step (``other``: the
  loss and its fp32 logits, measured unchanged).
- **The loss moments.** The loss's saved bytes ``L`` (log-probabilities, the size of the fp32
  logits) are what the activation rises by after the model's forward. While computing the
  loss, the 16-bit logits (L/2) and their fp32 upcast (L) are live; when backward starts, the
  loss's backward makes the fp32 gradients of the log-probabilities and of the logits (2L).
  Those replace the sample's scratch when larger, at the samples where the loss is live.
- **Convolutions on a CPU without 16-bit oneDNN** unfold their input into a 16-bit columns
  buffer in forward and backward (:mod:`memprof.advisor.cpu_kernels`): inside such a layer the
  scratch is its own entry scratch halved plus the columns and its 16-bit output or input
  gradient, from the layer geometry the profile records.
- **16-bit kernel scratch on a CPU**: where oneDNN runs 16-bit matmuls (and convolutions) it
  takes a scratchpad from PyTorch's allocator that fp32's MKL kernels do not; it is measured on
  this machine per layer shape (:func:`memprof.advisor.cpu_kernels.kernel_scratch`) and added
  inside each layer.
- **GradScaler** (fp16): scales the loss (a scalar), unscales the gradients in place
  (``_amp_foreach_non_finite_check_and_unscale_``) and keeps a scale, a growth tracker and an
  inf flag: a few scalars, no copy of the gradients.

Not modelled: on CPU, ``scaled_dot_product_attention`` with dropout runs its math path in
fp32 for 16-bit inputs (attention activations unchanged; CUDA's kernels keep 16 bits), and on
CUDA, autocast's fp32 list also covers softmax (eager attention) and pow/exp (tanh-GELU).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from memprof.advisor.core import MATMUL_TYPES, Change, Facts, Sample, Transform, _nbytes
from memprof.advisor.cpu_kernels import (
    conv_scratch,
    kernel_extra,
    kernel_scratch,
    slow_conv_work,
    unmeasured,
)
from memprof.advisor.trace_replay import has_trace, replay_autocast
from memprof.advisor.workload import SimState

#: Norms whose saved input stays fp32 under autocast (the fp32 residual stream; CUDA's fp32
#: list has layer_norm and group_norm; RMSNorm implementations upcast to fp32 themselves).
FP32_NORM_TYPES = frozenset({"LayerNorm", "RMSNorm", "LlamaRMSNorm", "T5LayerNorm"})
#: Modules that save a mask: bool on CUDA (1 byte per element in any precision), the input's
#: dtype on CPU (``input * bernoulli_noise``).
MASK_TYPES = frozenset({"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout"})
EMBEDDING_TYPES = frozenset({"Embedding", "EmbeddingBag"})
#: Matmul modules (mm/addmm), as opposed to convolutions.
MM_TYPES = frozenset({"Linear", "Conv1D", "Bilinear"})

#: The GradScaler's own tensors: its scale (fp32) and growth tracker (int32) from the first
#: step on; the scaled loss (fp32 scalar) through backward; the inf flag (fp32, one device)
#: from the unscale to the update. The unscale itself is in place.
GRAD_SCALER_BYTES = {"always": 8, "backward": 4, "optimizer": 4}
#: The share of its step's measured peak an operator trace may leave unexplained and still
#: predict the autocast rows (see :func:`_replay_trace`).
TRACE_UNSEEN_LIMIT = 0.02


@dataclass(frozen=True)
class Segment:
    """Bytes one module saved in the fp32 forward, and what they become under the change."""

    module: str
    baseline: float
    changed: float


@dataclass(frozen=True)
class ForwardLayout:
    """The profile's saved activations in the order the forward saved them, and the loss's."""

    segments: list[Segment]
    model_bytes: float  # what the model's forward saved (the sum of the segments' baselines)
    loss_bytes: float  # L: what the loss saved after it (fp32 log-probabilities)
    _starts: list[float] = field(init=False, repr=False, compare=False)
    _before: list[float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        starts, before, base, changed = [], [], 0.0, 0.0
        for seg in self.segments:
            starts.append(base)
            before.append(changed)
            base += seg.baseline
            changed += seg.changed
        object.__setattr__(self, "_starts", starts)
        object.__setattr__(self, "_before", before)

    def activation(self, a: float) -> float:
        """Activation bytes under the change when the fp32 profile had ``a`` live: the
        segments saved first, each in part or whole (a zero-width one, a 16-bit copy made
        with no fp32 counterpart, counts once anything saved after it is live)."""
        out = 0.0
        n = bisect.bisect_left(self._starts, a)  # the segments started below ``a``
        if n:
            last = self.segments[n - 1]
            part = min(1.0, (a - self._starts[n - 1]) / last.baseline) if last.baseline else 1.0
            out = self._before[n - 1] + part * last.changed
        rest = max(0.0, a - self.model_bytes)
        loss = min(rest, self.loss_bytes)
        return out + loss + 0.5 * (rest - loss)

    def loss_live(self, a: float) -> bool:
        return self.loss_bytes > 0 and a > self.model_bytes


def target_device(facts: Facts) -> str:
    """``cuda`` or ``cpu``: where the profiled step ran (or, for a FakeTensorMode estimate, the
    device it modelled); autocast's op lists and dropout's masks depend on it."""
    device = facts.profile.device
    if device.kind == "fake":
        return "cuda" if "cuda" in device.name else "cpu"
    return device.kind


def _types(facts: Facts) -> dict[str, str]:
    return {str(r["module"]): str(r["type"]) for r in facts.module_rows()}


def _leaves(facts: Facts) -> set[str]:
    rows = facts.module_rows()
    parents = {str(r["parent"]) for r in rows if r["parent"] is not None}
    return {str(r["module"]) for r in rows if str(r["module"]) not in parents and r["module"]}


def float_input_bytes(facts: Facts) -> float:
    """The largest floating input the model was called with (what its first layer casts;
    the profile lists inputs once per call)."""
    inputs = facts.profile.meta.get("inputs") or []
    return float(max((_nbytes(i) for i in inputs if "float" in str(i.get("dtype", ""))), default=0))


def _step_rows(facts: Facts) -> list[dict[str, Any]]:
    """The timeline rows of the peak step, in order."""
    frame = facts.profile.timeline()
    if not len(frame):
        return []
    return list(frame[frame["step"] == facts.profile.peak().step].to_dict(orient="records"))


#: ``visit(module, bytes) -> (added, changed)``, called for each stretch of the forward in
#: order: ``bytes`` the module saved in that stretch (0 when none), ``changed`` what they
#: become, ``added`` bytes the change saves there with no fp32 counterpart.
Visit = Callable[[str, float], tuple[float, float]]


def forward_layout(facts: Facts, visit: Visit) -> ForwardLayout:
    """Segments from the forward samples of the peak step: each rise in activation between two
    samples belongs to the module the first of them is in."""
    rows = _step_rows(facts)
    forward = [r for r in rows if r["phase"] == "forward"]
    segs: list[Segment] = []
    for prev, row in itertools.pairwise(forward):
        module = str(prev["module"])
        delta = float(row["activation"]) - float(prev["activation"])
        added, changed = visit(module, max(0.0, delta))
        if added > 0:
            segs.append(Segment(module, 0.0, added))
        if delta > 0:
            segs.append(Segment(module, delta, changed))
        left = -delta
        while left > 0 and segs:  # freed during the forward: the latest saved goes first
            last = segs.pop()
            if last.baseline > left:
                keep = last.baseline - left
                segs.append(Segment(last.module, keep, last.changed * keep / last.baseline))
            left -= last.baseline
    model = sum(s.baseline for s in segs)
    top = max((float(r["activation"]) for r in rows), default=0.0)
    return ForwardLayout(segs, model, max(0.0, top - model))


def pure_layout(facts: Facts, device: str) -> ForwardLayout:
    """Everything halves but CUDA's dropout masks (bool; CPU's dropout saves a mask in the
    input's dtype)."""
    types = _types(facts)
    kept = MASK_TYPES if device == "cuda" else frozenset()

    def visit(module: str, nbytes: float) -> tuple[float, float]:
        return 0.0, nbytes if types.get(module) in kept else 0.5 * nbytes

    return forward_layout(facts, visit)


def _weights(facts: Facts) -> dict[str, float]:
    """fp32 weight bytes each matmul uses. One that owns none uses a tied weight: the largest
    embedding's (a language model's head tied to its token embedding)."""
    rows = facts.module_rows()
    tied = max((float(r["parameter"]) for r in rows if r["type"] in EMBEDDING_TYPES), default=0)
    return {
        str(r["module"]): float(r["parameter"]) or (tied if not r["parameter_total"] else 0.0)
        for r in rows
        if r["type"] in MATMUL_TYPES
    }


def autocast_layout(facts: Facts, device: str) -> ForwardLayout:
    """Follows the dtype of the running tensor through the forward: a matmul's output is 16
    bits, an embedding's or an fp32 norm's is fp32, any other leaf keeps its input's; what a
    module saves takes that dtype (its own type's where autocast fixes it)."""
    types = _types(facts)
    weights = _weights(facts)
    leaves = _leaves(facts)
    fp32 = FP32_NORM_TYPES | EMBEDDING_TYPES | ({"GroupNorm"} if device == "cuda" else set())
    kept = MASK_TYPES if device == "cuda" else frozenset()
    float_in = float_input_bytes(facts)
    low = False  # the running tensor is 16-bit
    ran: set[str] = set()

    def visit(module: str, nbytes: float) -> tuple[float, float]:
        nonlocal low
        kind = types.get(module, "")
        added = 0.0
        if kind in MATMUL_TYPES:
            changed = 0.5 * nbytes
            if module not in ran:  # once: autocast caches the cast of a weight
                weight = 0.5 * weights.get(module, 0.0)
                if not ran and float_in > 0:
                    # the first layer saves a 16-bit copy of the float input; a matmul whose
                    # input needs no gradient keeps no weight copy (autograd saves mm's
                    # operands only for the gradients it needs), a convolution both anyway
                    added = 0.5 * float_in + (0.0 if kind in MM_TYPES else weight)
                else:
                    added = weight
            out_low = True
        elif kind in fp32:
            changed, out_low = nbytes, False
        elif kind in kept:
            changed, out_low = nbytes, low
        else:
            changed, out_low = (0.5 * nbytes if low else nbytes), low
        if module in leaves:
            ran.add(module)
            low = out_low
        return added, changed

    return forward_layout(facts, visit)


def _loss_scratch(layout: ForwardLayout, s: Sample) -> float:
    """The loss's own scratch at a sample where it is live: 16-bit logits and their fp32
    upcast while it runs (1.5 L), the fp32 gradients of log-probabilities and logits once
    backward starts (2 L)."""
    if not layout.loss_live(float(s["activation"])):
        return 0.0
    return (2.0 if s["phase"] == "backward" else 1.5) * layout.loss_bytes


def autocast_transform(
    facts: Facts, layout: ForwardLayout | None = None, dtype: torch.dtype = torch.bfloat16
) -> Transform:
    """Activations rewritten per saved segment; forward and backward scratch halves (16-bit
    intermediates) except the loss's, which is fp32, and inside convolutions that take the
    CPU's slow 16-bit path (see :mod:`memprof.advisor.cpu_kernels`)."""
    lay = layout or autocast_layout(facts, target_device(facts))
    work = slow_conv_work(facts, dtype)
    kernels = kernel_scratch(facts, dtype)

    def transform(s: Sample) -> Sample:
        out = dict(s)
        out["activation"] = lay.activation(float(s["activation"]))
        temp = float(s["temporary"])
        if s["phase"] in ("forward", "backward"):
            temp *= 0.5
        conv = conv_scratch(work, s)
        temp = (temp if conv is None else conv) + kernel_extra(kernels, s)
        out["temporary"] = max(temp, _loss_scratch(lay, s))
        return out

    return transform


def grad_scaler_transform(
    facts: Facts, layout: ForwardLayout | None = None, dtype: torch.dtype = torch.float16
) -> Transform:
    """Autocast, plus the GradScaler's scalars (the unscale is in place: no copy of the
    gradients)."""
    inner = autocast_transform(facts, layout, dtype)

    def transform(s: Sample) -> Sample:
        out = inner(s)
        extra = GRAD_SCALER_BYTES["always"] + GRAD_SCALER_BYTES.get(str(s["phase"]), 0)
        out["other"] = out["other"] + extra
        return out

    return transform


def pure_bf16_transform(facts: Facts) -> Transform:
    keep_input = 1.0 - 0.5 * facts.float_input_fraction
    lay = pure_layout(facts, target_device(facts))
    work = slow_conv_work(facts, torch.bfloat16)
    kernels = kernel_scratch(facts, torch.bfloat16)

    def transform(s: Sample) -> Sample:
        out = dict(s)
        for c in ("parameter", "buffer", "gradient", "optimizer_state"):
            out[c] = s[c] * 0.5
        out["activation"] = lay.activation(float(s["activation"]))
        conv = conv_scratch(work, s)
        temp = 0.5 * float(s["temporary"]) if conv is None else conv
        temp += kernel_extra(kernels, s)
        out["temporary"] = max(temp, _loss_scratch(lay, s))
        out["input"] = s["input"] * keep_input
        return out

    return transform


def _apply_autocast(dtype: torch.dtype) -> Callable[[SimState], None]:
    def apply(state: SimState) -> None:
        state.autocast = dtype

    return apply


def _apply_autocast_fp16_scaler(state: SimState) -> None:
    state.autocast = torch.float16
    state.grad_scaler = True


def _apply_pure_bf16(state: SimState) -> None:
    from memprof.advisor import fake_prediction

    if fake_prediction.is_fake_model(state.model):  # fake tensors cannot be swapped in place
        fake_prediction.cast_floating(state, torch.bfloat16)
    else:
        state.model.to(torch.bfloat16)
    state.cast_batch = torch.bfloat16


def _matmul_weight_bytes(facts: Facts) -> float:
    rows = facts.module_rows()
    return float(sum(r["parameter"] for r in rows if r["type"] in MATMUL_TYPES))


def cpu_kernel_caveats(facts: Facts, dtype: torch.dtype) -> list[str]:
    """What the prediction adds for this CPU's 16-bit kernels: the slow convolution path's
    columns, and the scratch measured for oneDNN's matmuls (and convolutions)."""
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    out = []
    work = slow_conv_work(facts, dtype)
    if work:
        largest = max(w.columns for w in work.values())
        out.append(
            f"this CPU has no {name} oneDNN: its convolutions take the slow path, "
            f"which unfolds the input into a {name} columns buffer in forward and backward "
            f"(largest {largest:.0f} B), counted in the scratch inside each; advised on a GPU "
            f"or a CPU with {name} oneDNN they would not"
        )
    kernels = kernel_scratch(facts, dtype)
    if kernels:
        layer, scratch = max(kernels.items(), key=lambda kv: max(kv[1].forward, kv[1].backward))
        out.append(
            f"this CPU's {name} kernels take scratch that fp32's do not (measured here by "
            f"running each layer's shapes: largest {max(scratch.forward, scratch.backward):.0f} B"
            f", in {layer!r}), counted inside each layer; a GPU's kernels differ"
        )
    left_out = unmeasured(facts, dtype)
    if left_out:
        out.append(
            f"this CPU's {name} kernel scratch of {left_out} layers is not counted: advice from "
            "a profile alone runs no kernel (fake runs measure it when the model is at hand)"
        )
    return out


def parameter_dtypes(facts: Facts) -> set[str]:
    """The floating dtypes of the profiled model's parameters ("bfloat16", "float32", ...):
    the optimizer's record of what it trained, else an estimate's dtype; empty when unknown."""
    names: set[str] = set()
    for opt in facts.profile.optimizers:
        names.update(str(d) for d in opt.get("parameter_dtypes") or [])
    if not names:
        info = facts.profile.meta.get("estimate") or {}
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(
            str(info.get("dtype")))
        if dtype is not None:
            names.add(dtype)
    return {n for n in names if "float" in n}


def already_16_bit(facts: Facts) -> str | None:
    """The 16-bit dtype every floating parameter already has (None if any is wider or the
    profile does not say): a change to 16 bits would change nothing there."""
    names = parameter_dtypes(facts)
    if names and names <= {"bfloat16", "float16"}:
        return " and ".join(sorted(names))
    return None


def _unchanged(facts: Facts, dtype: str) -> list[Change]:
    """Rows that would change nothing on a model whose parameters are already 16-bit."""
    rows = []
    for options, why in (
        ({"mode": "autocast", "dtype": "bf16"},
         "autocast casts fp32 weights and inputs to 16 bits: there is none to cast"),
        ({"mode": "autocast", "dtype": "fp16", "grad_scaler": True},
         "autocast casts fp32 weights and inputs to 16 bits: there is none to cast"),
        ({"mode": "pure", "dtype": "bf16", "master_weights": False},
         "pure bf16 halves fp32 weights, gradients and states: they are 16-bit already"),
    ):
        reason = f"the parameters are already {dtype}: {why}, so it would change nothing"
        rows.append(Change("mixed_precision", options, reason, applicable=False, reason=reason,
                           group="precision"))
    return rows


def predict(facts: Facts) -> list[Change]:
    """Autocast bf16, autocast fp16 + GradScaler, and pure bf16 (weights and states); none of
    them on a model whose parameters are already 16-bit (they would change nothing)."""
    sixteen = already_16_bit(facts)
    if sixteen is not None:
        return _unchanged(facts, sixteen)
    device = target_device(facts)
    lay = autocast_layout(facts, device)
    loss = lay.loss_bytes
    masks = "CUDA's dropout masks (bool), " if device == "cuda" else ""
    common = (
        "saved activations followed through the forward: matmul/conv inputs halved plus 16-bit "
        f"copies of their weights ({_matmul_weight_bytes(facts):.0f} B fp32); layer norms, "
        f"embeddings, {masks}the loss ({loss:.0f} B) and what runs on fp32 tensors unchanged; "
        "what runs on 16-bit outputs halved; weights, grads and optimizer state unchanged"
    )
    attention = (
        ["on CPU, attention with dropout runs scaled_dot_product_attention's math path in "
         "fp32 for 16-bit inputs: its activations stay as they are (more than predicted)"]
        if device == "cpu" else []
    )  # fmt: skip
    changes = [
        Change(
            "mixed_precision",
            {"mode": "autocast", "dtype": "bf16"},
            common,
            transform=autocast_transform(facts, lay),
            apply=_apply_autocast(torch.bfloat16),
            caveats=[
                "needs bf16 hardware (Ampere or newer; not T4/V100)",
                "on CUDA, softmax in eager attention and pow/exp in GELU approximations stay "
                "fp32 (autocast's CUDA fp32 list): attention-heavy models save more than "
                "predicted",
                *attention,
                *cpu_kernel_caveats(facts, torch.bfloat16),
            ],
            quality_cost=0.1,
            speed_cost=-0.3,
            group="precision",
        ),
        Change(
            "mixed_precision",
            {"mode": "autocast", "dtype": "fp16", "grad_scaler": True},
            "as autocast bf16 (same sizes), plus the GradScaler's scalars (scale, growth "
            "tracker, scaled loss, inf flag: 8 to 12 B); the gradients are unscaled in place",
            transform=grad_scaler_transform(facts, lay),
            apply=_apply_autocast_fp16_scaler,
            caveats=[
                "for GPUs without bf16 (T4, V100); the loss is scaled against fp16 underflow",
                "a step whose gradients overflow is skipped (the scale halves): no optimizer "
                "state is created by a skipped first step",
                *attention,
                *cpu_kernel_caveats(facts, torch.float16),
            ],
            quality_cost=0.15,
            speed_cost=-0.3,
            group="precision",
        ),
        Change(
            "mixed_precision",
            {"mode": "pure", "dtype": "bf16", "master_weights": False},
            "weights, grads, optimizer states, floating inputs, scratch and saved activations "
            f"halved, except {masks}the loss ({loss:.0f} B: the logits are upcast, so its "
            "log-probabilities and their gradients stay fp32): 8 instead of 16 bytes/param "
            "for Adam",
            transform=pure_bf16_transform(facts),
            apply=_apply_pure_bf16,
            caveats=[
                "bf16 weight updates lose small steps (8-bit mantissa): use stochastic "
                "rounding or fp32 master weights for long runs",
                *attention,
                *cpu_kernel_caveats(facts, torch.bfloat16),
            ],
            quality_cost=0.3,
            speed_cost=-0.3,
            group="precision",
        ),
    ]
    _replay_trace(facts, changes)
    return changes


def _replay_trace(facts: Facts, changes: list[Change]) -> None:
    """Set the autocast rows' ``trace_peak`` from the profile's operator trace, if it has
    one: the profile's peak less the saving the replayed step shows. A trace whose unchanged
    replay misses more than :data:`TRACE_UNSEEN_LIMIT` of its step's measured peak (kernel
    scratch, which no operator returns, e.g. a CPU's oneDNN convolutions) leaves the row
    analytic, saying so."""
    profile = facts.profile
    if not has_trace(profile) or profile.op_trace is None:
        return
    trace = profile.op_trace
    step_peak = {s.step: s.peak_bytes for s in profile.steps_stats}.get(int(trace["step"]))
    for change in changes:
        if change.options.get("mode") != "autocast" or not change.applicable:
            continue
        replay = replay_autocast(trace, str(change.options["dtype"]))
        if step_peak and abs(step_peak - replay.baseline_peak) > TRACE_UNSEEN_LIMIT * step_peak:
            change.caveats.append(
                f"analytic, not replayed from the operator trace: the trace shows "
                f"{replay.baseline_peak:.0f} B of its step's {step_peak:.0f} B peak (the rest "
                "is kernel scratch no operator returns)"
            )
            continue
        scaler = sum(GRAD_SCALER_BYTES.values()) if change.options.get("grad_scaler") else 0
        change.trace_peak = max(0, facts.peak_bytes - replay.saving + scaler)
