"""Replays a profile's operator trace (:mod:`memprof.tracking.op_trace`) under autocast's rules.

No kernel runs: each storage the traced step made is given the dtype it would have under
``torch.autocast``, and the step's live bytes are summed again in the trace's order.

- **Forward.** Matmuls and convolutions (autocast's lower-precision list) cast their fp32
  floating inputs to 16 bits and make 16-bit outputs. A parameter's cast is made once per
  forward (autocast's cache) and lives to the end of the forward, or, when autograd saved the
  parameter for that operator, until backward last reads it. Another input's cast lives for
  the operator alone, or, when the operator saved that input, in its place: the fp32 tensor is
  then freed after its last forward reader. Operators on the fp32 list of the device (losses,
  ``log_softmax``; on CUDA also norms, softmax, pow, exp) cast 16-bit inputs up and make fp32
  outputs; on a CPU, scaled-dot-product attention's math path (the operators around
  ``_safe_softmax``) does too. Any other operator's output takes its inputs' promoted dtype
  (0-dim tensors do not promote); an output whose dtype was chosen explicitly keeps it.
  A normalization's output takes its input's dtype (batch norm with fp32 statistics and
  weights on a 16-bit input stays 16-bit), its statistics keep theirs.
- **Backward.** Matmul and convolution backwards fed a 16-bit tensor make 16-bit outputs
  (their fp32 gradient input cast down first); a gradient that lands in a parameter's ``.grad``
  stays fp32, its 16-bit value held while it is cast. Other backward operators promote, and
  cast 16-bit inputs up when they mix them with fp32 ones (autograd's ``ToCopyBackward``).
- The optimizer step and what lived before the step are unchanged.

The prediction is the profile's peak plus the difference between the replayed peaks of the
traced step with and without the change.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

from memprof.tracking.op_trace import BACKWARD, FORWARD, MADE, PARAMETER
from memprof.units import round_up

LOW_OPS = frozenset(
    {
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "addbmm",
        "addmv",
        "mv",
        "addr",
        "matmul",
        "linear",
        "convolution",
        "_convolution",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "_prelu_kernel",
        "linalg_vecdot",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_native_multi_head_attention",
        "_thnn_fused_lstm_cell",
        "_thnn_fused_gru_cell",
        "mkldnn_rnn_layer",
    }
)
LOW_BACKWARD_OPS = LOW_OPS | frozenset(
    {
        "convolution_backward",
        "_scaled_dot_product_flash_attention_backward",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_efficient_attention_backward",
        "_scaled_dot_product_cudnn_attention_backward",
    }
)
#: Both devices' fp32 lists, at the ATen level the trace records (cross_entropy is
#: log_softmax + nll_loss there).
_FP32_COMMON = frozenset(
    {
        "_log_softmax",
        "nll_loss_forward",
        "nll_loss2d_forward",
        "mse_loss",
        "l1_loss",
        "smooth_l1_loss",
        "huber_loss",
        "kl_div",
        "binary_cross_entropy",
        "binary_cross_entropy_with_logits",
        "soft_margin_loss",
        "multilabel_margin_loss_forward",
        "multi_margin_loss",
        "cdist",
        "_cdist_forward",
        "_ctc_loss",
        "poisson_nll_loss",
    }
)
FP32_OPS = {
    "cpu": _FP32_COMMON
    | frozenset(
        {"avg_pool3d", "max_pool3d_with_indices", "adaptive_avg_pool3d", "_adaptive_avg_pool3d"}
    ),
    "cuda": _FP32_COMMON
    | frozenset(
        {
            "native_layer_norm",
            "native_group_norm",
            "_softmax",
            "pow",
            "exp",
            "log",
            "log2",
            "log10",
            "log1p",
            "expm1",
            "rsqrt",
            "reciprocal",
            "acos",
            "asin",
            "cosh",
            "sinh",
            "tan",
            "erfinv",
            "softplus",
            "logsumexp",
            "cumsum",
            "cumprod",
            "prod",
            "renorm",
            "norm",
            "linalg_vector_norm",
            "_pdist_forward",
            "dist",
        }
    ),
}
#: Normalizations whose output takes the dtype of the tensor they normalize.
NORM_OPS = frozenset(
    {
        "native_batch_norm",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training",
        "_batch_norm_with_update",
        "native_layer_norm",
        "native_group_norm",
        "native_batch_norm_backward",
        "batch_norm_backward",
        "native_layer_norm_backward",
        "native_group_norm_backward",
        "_fused_rms_norm",
        "_fused_rms_norm_backward",
    }
)
FLOAT_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}
LOW_NAMES = {"bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Replay:
    """The traced step's replayed peaks, unchanged and under the change (bytes)."""

    baseline_peak: int
    changed_peak: int

    @property
    def saving(self) -> int:
        return self.baseline_peak - self.changed_peak


def has_trace(profile: Any) -> bool:
    trace = getattr(profile, "op_trace", None)
    return isinstance(trace, dict) and trace.get("version") == 1 and bool(trace.get("ops"))


def replay_autocast(trace: dict[str, Any], dtype: str = "bf16") -> Replay:
    """Replay ``trace`` unchanged and under ``torch.autocast`` to ``dtype`` ("bf16"/"fp16")."""
    return _AutocastReplay(trace, LOW_NAMES[dtype]).run()


class _AutocastReplay:
    def __init__(self, trace: dict[str, Any], low: str) -> None:
        self.low = low
        self.device = "cuda" if str(trace.get("device")) == "cuda" else "cpu"
        self.fp32_ops = FP32_OPS[self.device]
        ops, st = trace["ops"], trace["storages"]
        names = trace["names"]
        self.names = [names[i] for i in ops["name"]]
        self.phase = ops["phase"]
        self.inputs: list[list[int]] = ops["inputs"]
        self.outputs: list[list[int]] = ops["outputs"]
        dtypes = trace["dtypes"]
        self.orig = [dtypes[i] for i in st["dtype"]]
        self.nbytes: list[int] = st["nbytes"]
        self.kind: list[int] = st["kind"]
        self.made: list[int] = st["made"]
        self.freed: list[int] = st["freed"]
        #: 0-dim and empty tensors take no part in type promotion (an empty cache that a
        #: 16-bit run would have made 16-bit)
        self.scalar = [not shape or 0 in shape for shape in st["shape"]]
        self.grad = [bool(g) for g in st["grad"]]
        self.start = int(trace.get("start_bytes") or 0)
        self.rounding = 512 if self.device == "cuda" else 1
        n_ops = len(self.names)
        self.readers: list[list[int]] = [[] for _ in self.nbytes]
        for k, ins in enumerate(self.inputs):
            for j in ins:
                if j >= 0:
                    self.readers[j].append(k)
        self.savers: list[set[int]] = [set() for _ in self.nbytes]
        for j, count, output in trace.get("saves") or []:
            self.savers[j].add(self.made[j] if output else self._reader(j, count))
        self.backward_start = next((k for k, p in enumerate(self.phase) if p == BACKWARD), n_ops)
        self.backward_end = 1 + max(
            (k for k, p in enumerate(self.phase) if p == BACKWARD), default=n_ops - 1
        )
        self.fp32_region = self._cpu_attention_math() if self.device == "cpu" else set()

    def _reader(self, j: int, count: int) -> int:
        """The operator that saved input ``j``: the first from ``count`` on that reads it
        (inputs are saved before their operator runs)."""
        for k in self.readers[j]:
            if k >= count:
                return k
        return -1

    def _cpu_attention_math(self) -> set[int]:
        """Operators of scaled-dot-product attention's math path, which runs in fp32 on a CPU
        for 16-bit inputs: from after the last matmul or concatenation before each
        ``_safe_softmax`` to the first batched matmul after it."""
        region: set[int] = set()
        for j, name in enumerate(self.names):
            if name != "_safe_softmax" or self.phase[j] != FORWARD:
                continue
            start = j
            bmm_seen = 0
            while start > 0:
                prev = self.names[start - 1]
                if prev in ("mm", "addmm", "cat") or (prev in LOW_OPS and prev != "bmm"):
                    break
                if prev == "bmm":
                    bmm_seen += 1
                start -= 1
            end = j
            while end + 1 < len(self.names) and self.names[end] != "bmm":
                end += 1
            region.update(range(start, end + 1))
        return region

    # -------------------------------------------------------------- replay
    def _size(self, j: int, dtype: str) -> int:
        size = self.nbytes[j]
        old, new = FLOAT_SIZES.get(self.orig[j]), FLOAT_SIZES.get(dtype)
        if old and new and old != new:
            size = size * new // old
        return size

    def _charge(self, nbytes: int) -> int:
        return round_up(nbytes, self.rounding) if self.rounding > 1 and nbytes else nbytes

    def run(self) -> Replay:
        dtype = list(self.orig)
        free_at = [2.0 * f if f >= 0 else None for f in self.freed]  # before operator f
        extra: list[tuple[float, float, int]] = []  # (alloc time, free time, bytes)
        cache: dict[int, int] = {}  # parameter storage -> index into extra
        low = self.low
        saved_low: set[int] = set()  # storages whose saved copy is 16-bit (backward reads it)
        for k, name in enumerate(self.names):
            phase = self.phase[k]
            if phase not in (FORWARD, BACKWARD):
                continue
            ins = [j for j in dict.fromkeys(self.inputs[k]) if j >= 0]
            floats = [j for j in ins if self.orig[j] in FLOAT_SIZES and not self.scalar[j]]
            # what backward reads of an input saved as a 16-bit copy is that copy
            seen = {j: (low if phase == BACKWARD and j in saved_low else dtype[j]) for j in floats}
            before, after = 2.0 * k + 0.5, 2.0 * k + 1.5
            out_dtype: str | None = None
            if phase == FORWARD and name in LOW_OPS and k not in self.fp32_region:
                for j in floats:
                    if seen[j] != "float32":
                        continue
                    half = self._size(j, low)
                    if self.kind[j] == PARAMETER:
                        end = 2.0 * self.backward_start
                        if k in self.savers[j]:
                            saved_low.add(j)
                            reads = [r for r in self.readers[j] if self.phase[r] == BACKWARD]
                            end = max(end, 2.0 * max(reads) + 1.5) if reads else end
                        slot = cache.get(j)
                        if slot is None:
                            cache[j] = len(extra)
                            extra.append((before, end, half))
                        else:
                            a, e, b = extra[slot]
                            extra[slot] = (a, max(e, end), b)
                    else:
                        extra.append(self._cast(j, k, half, free_at))
                        if k in self.savers[j]:
                            saved_low.add(j)
                out_dtype = low
            elif phase == FORWARD and (name in self.fp32_ops or k in self.fp32_region):
                for j in floats:
                    if seen[j] == low:
                        extra.append(self._cast(j, k, self._size(j, "float32"), free_at))
                out_dtype = "float32"
            elif (
                phase == BACKWARD
                and name in LOW_BACKWARD_OPS
                and any(seen[j] == low for j in floats)
            ):
                for j in floats:
                    if seen[j] == "float32" and self.kind[j] == MADE:
                        extra.append((before, after, self._size(j, low)))
                out_dtype = low
            elif name in NORM_OPS and floats:
                # the normalized output takes its input's dtype (16-bit input, fp32 affine
                # weights and statistics); the statistics and weight gradients keep theirs
                follow = self.inputs[k][1 if phase == BACKWARD else 0]
                if follow >= 0 and self.orig[follow] in FLOAT_SIZES:
                    norm_dtype = seen.get(follow, dtype[follow])
                    if phase == BACKWARD and seen.get(floats[0]) not in (None, norm_dtype):
                        extra.append((before, after, self._size(floats[0], norm_dtype)))
                    first = self.outputs[k][:1]
                    if first and not self.grad[first[0]]:
                        dtype[first[0]] = norm_dtype
            else:
                kinds = {seen[j] for j in floats}
                if "float32" in kinds and low in kinds and phase == BACKWARD:
                    for j in floats:
                        if seen[j] == low:
                            extra.append((before, after, self._size(j, "float32")))
                if kinds:
                    out_dtype = "float32" if "float32" in kinds else low
            promoted_orig = {self.orig[j] for j in floats}
            for j in self.outputs[k]:
                if out_dtype is None or self.orig[j] not in FLOAT_SIZES:
                    continue
                explicit = bool(promoted_orig) and self.orig[j] not in promoted_orig
                if explicit and name not in LOW_OPS:
                    continue
                if self.grad[j]:  # .grad stays fp32; its 16-bit value is held while cast
                    if out_dtype == low:
                        extra.append((before, after, self._size(j, low)))
                    continue
                dtype[j] = out_dtype
        base = self._peak(list(self.orig), [2.0 * f if f >= 0 else None for f in self.freed], [])
        changed = self._peak(dtype, free_at, extra)
        return Replay(base, changed)

    def _cast(
        self, j: int, k: int, nbytes: int, free_at: list[float | None]
    ) -> tuple[float, float, int]:
        """A cast of input ``j`` made for operator ``k``: saved in ``j``'s place when ``k``
        saved ``j`` (freed after backward last reads it; ``j`` is then freed after its last
        forward reader), else freed after ``k``."""
        before, after = 2.0 * k + 0.5, 2.0 * k + 1.5
        if k not in self.savers[j]:
            return before, after, nbytes
        reads = [r for r in self.readers[j] if self.phase[r] == BACKWARD]
        if reads:
            end = 2.0 * max(reads) + 1.5
        else:
            end = 2.0 * self.freed[j] if self.freed[j] >= 0 else 2.0 * self.backward_end
        if self.kind[j] == MADE and self.savers[j] <= set(self._casting_savers(j)):
            forward = [r for r in self.readers[j] if self.phase[r] == FORWARD]
            last = 2.0 * max(forward or [self.made[j]]) + 1.5
            held = free_at[j]
            if held is None or last < held:
                free_at[j] = last
        return before, end, nbytes

    def _casting_savers(self, j: int) -> list[int]:
        """The operators that save ``j`` and cast it (so save a copy instead)."""
        return [
            k
            for k in self.savers[j]
            if self.phase[k] == FORWARD
            and (
                self.names[k] in LOW_OPS or self.names[k] in self.fp32_ops or k in self.fp32_region
            )
        ]

    def _peak(
        self, dtype: list[str], free_at: list[float | None], extra: list[tuple[float, float, int]]
    ) -> int:
        events: list[tuple[float, int]] = []
        for j in range(len(self.nbytes)):
            nbytes = self._charge(self._size(j, dtype[j]))
            if self.kind[j] == MADE:
                events.append((2.0 * self.made[j] + 1.0, nbytes))
            # else: lived before the step, counted in start_bytes until freed here
            end = free_at[j]
            if end is not None:
                events.append((end, -nbytes))
        for start, end, size in extra:
            nbytes = self._charge(size)
            events.append((start, nbytes))
            if end != float("inf"):
                events.append((end, -nbytes))
        heapq.heapify(events)
        live = peak = self.start
        while events:
            _, delta = heapq.heappop(events)
            live += delta
            peak = max(peak, live)
        return peak
