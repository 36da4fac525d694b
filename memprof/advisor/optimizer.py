"""Optimizer choice: AdamW to SGD with momentum, plain SGD, Adafactor, 8-bit AdamW states, and
the per-tensor loop instead of the foreach implementation.

Bytes of state per parameter element (DESIGN.md): AdamW 8 (two fp32 moments), SGD momentum 4,
plain SGD 0, 8-bit AdamW 2 plus one fp32 scale per 2048-element block and moment.
Scratch: torch's foreach AdamW allocates temporaries about the size of the parameters during
``step()`` (measured 0.97-1.31x on CPU); SGD with weight decay allocates ``grad + wd * param``:
all gradients at once with foreach (CUDA's default), one tensor at a time on CPU; the
per-tensor 8-bit step a few chunks. The optimizer phase's temporaries are rescaled accordingly.

Adafactor (``torch.optim.Adafactor``) keeps, per tensor of two or more dimensions, a row and a
column second-moment factor (rows + columns elements per matrix) and a full second moment for
vectors, plus a step counter; no first moment. Its step allocates the full variance estimate
(``row_var @ col_var``): one tensor at a time with the per-tensor loop (CPU's default), every
parameter's at once with foreach (CUDA's default). Both need the profile's parameter shapes
(``optimizers[0]["parameter_shapes"]``, recorded since memprof 0.1).

Foreach vs per-tensor loop: torch's foreach Adam/AdamW runs each elementwise stage over all
tensors at once, so its scratch is about the size of all parameters; the per-tensor loop's is
that of the largest tensor, twice (``exp_avg_sq.sqrt()`` and its division live together).

8-bit AdamW is torchao's ``torchao.optim.AdamW8bit`` (``pip install memprof[lowbit]``): its
state layout is reproduced exactly (:func:`lowbit_layout`): per quantized moment, uint8 codes of
the parameter's shape, one fp32 scale per 256-element block and a 256-entry fp32 lookup table;
tensors under 4096 elements (or not a multiple of the block) keep fp32 moments; a 0-d fp32 step
per parameter. The step that moves those states is written here (:class:`AdamW8bit`), because
torchao's cannot serve a simulation or a prediction on this machine: it compiles
one kernel per parameter shape (measured: 232 s for the first step of a two-matrix MLP on a
2-core CPU, 37 s once cached) and a compiled step cannot run on fake tensors. The emulation
updates chunk by chunk in fp32 (linear blockwise absmax codes instead of torchao's dynamic
map: the same bytes, slightly different numerics); on fake tensors it builds the states with
whole-tensor ops and runs one chunk per tensor, whose scratch is the step's peak (each chunk's
scratch is freed before the next).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from memprof.advisor.core import (
    TRAINING_ONLY_REASON,
    Change,
    Facts,
    Sample,
    Transform,
    not_applicable,
)
from memprof.advisor.workload import SimState

#: torchao's AdamW8bit: 256-element blocks; tensors of at least 4096 elements (and a whole
#: number of blocks) are quantized, others keep fp32 moments.
BLOCK = 256
MIN_QUANTIZED = 4096
QMAP_ENTRIES = 256
CHUNK = 256 * BLOCK  # elements updated at once by the 8-bit step
STATE_BYTES_PER_ELEMENT = {
    "AdamW": 8.0,
    "Adam": 8.0,
    "SGD_momentum": 4.0,
    "SGD": 0.0,
    "AdamW8bit": 2.0 + 2 * 4.0 / BLOCK,
}
#: What to install for the library whose optimizer the 8-bit row stands for.
LOWBIT_EXTRA = "pip install memprof[lowbit]"


def torchao_available() -> bool:
    """Whether torchao's low-bit optimizers import here (looked up, not imported: it is slow)."""
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def quantized(numel: int) -> bool:
    """Whether torchao's AdamW8bit keeps a tensor of ``numel`` elements in 8 bits."""
    return numel >= MIN_QUANTIZED and numel % BLOCK == 0


def lowbit_layout(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state torchao's AdamW8bit makes for ``p`` (``_new_buffer`` for both moments): 8-bit
    codes of ``p``'s shape, an fp32 scale per block and a 256-entry fp32 map each, or fp32
    moments for a small tensor; a 0-d fp32 step. Whole-tensor ops only (cheap on fake tensors).
    The first moment's codes are int8 here (signed linear codes), torchao's uint8: same bytes."""
    state: dict[str, torch.Tensor] = {"step": torch.zeros((), dtype=torch.float32)}
    n = p.numel()
    if not quantized(n):
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state
    for name, dtype in (("exp_avg", torch.int8), ("exp_avg_sq", torch.uint8)):
        state[name] = torch.zeros(n, dtype=dtype)
        state[f"{name}_scale"] = torch.zeros(n // BLOCK, dtype=torch.float32)
        state[f"{name}_qmap"] = torch.zeros(QMAP_ENTRIES, dtype=torch.float32)
    return state


#: On fake tensors, run only the update that holds the step's peak (see
#: :meth:`AdamW8bit._updated_on_fake`); False runs every one (the tests compare the two).
ONE_UPDATE_PER_LAYOUT = True


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with torchao's 8-bit state layout, stepped by an emulation written here: torchao's
    own step is compiled per parameter shape (minutes on a CPU) and cannot run on fake tensors
    (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )
        self._count: dict[int, int] = {}  # steps taken per parameter (the step tensor's value)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        from memprof.advisor.fake_prediction import is_fake

        loss = closure() if closure is not None else None
        stepped = self._updated_on_fake()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if stepped is not None and id(p) not in stepped:
                    state = self.state[p]
                    state["step"].add_(1)
                    self._count[id(p)] = self._count.get(id(p), 0) + 1
                    continue
                state = self.state[p]
                if not state:
                    state.update(lowbit_layout(p))
                state["step"].add_(1)
                t = self._count[id(p)] = self._count.get(id(p), 0) + 1
                lr, eps = group["lr"], group["eps"]
                p.mul_(1 - lr * group["weight_decay"])
                if not quantized(p.numel()):
                    m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                    m.mul_(beta1).add_(g, alpha=1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = v.div(1 - beta2**t).sqrt_().add_(eps)
                    p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
                    del denom
                    continue
                n = p.numel()
                # On fake tensors one chunk stands for all: each chunk's scratch is freed
                # before the next, so the first (a full chunk) holds the step's peak.
                last = min(n, CHUNK) if is_fake(p) else n
                grad = p.grad.reshape(-1)
                for start in range(0, last, CHUNK):
                    self._chunk(p, grad, state, start, min(n, start + CHUNK), t, group)
        return loss

    def _updated_on_fake(self) -> set[int] | None:
        """On fake tensors whose state is made already (the fake run's warm-up), the ids of the
        parameters whose update is run: per layout (8-bit or fp32 moments, parameter and
        gradient dtypes) the one with the most elements in a chunk. Each update's scratch is
        freed before the next and grows with the elements, so those hold the step's peak and
        the others' updates (in place: they allocate nothing) are left out. None to run all
        (real tensors, or state still to make: it grows during the step)."""
        from memprof.advisor.fake_prediction import is_fake

        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not ONE_UPDATE_PER_LAYOUT or not params or not all(
                is_fake(p) and self.state[p] for p in params):
            return None
        largest: dict[tuple[Any, ...], tuple[int, int]] = {}
        for p in params:
            assert p.grad is not None
            n = p.numel()
            layout = (quantized(n), p.dtype, p.grad.dtype)
            size = min(n, CHUNK) if quantized(n) else n
            if layout not in largest or size > largest[layout][0]:
                largest[layout] = (size, id(p))
        return {pid for _, pid in largest.values()}

    @staticmethod
    def _chunk(p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], start: int,
               end: int, t: int, group: dict[str, Any]) -> None:
        """Update elements ``start:end`` in fp32; every scratch tensor is freed on return."""
        beta1, beta2 = group["betas"]
        blocks = slice(start // BLOCK, -(-end // BLOCK))
        flat = p.view(-1)
        g = grad[start:end].float()
        m = _dequant(state["exp_avg"][start:end], state["exp_avg_scale"][blocks], signed=True)
        v = _dequant(state["exp_avg_sq"][start:end], state["exp_avg_sq_scale"][blocks],
                     signed=False)
        v.square_()
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.div(1 - beta2**t).sqrt_().add_(group["eps"])
        flat[start:end].addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**t))
        del denom
        _quant(m, state["exp_avg"][start:end], state["exp_avg_scale"][blocks], signed=True)
        _quant(v.sqrt_(), state["exp_avg_sq"][start:end], state["exp_avg_sq_scale"][blocks],
               signed=False)


def _dequant(q: torch.Tensor, scale: torch.Tensor, *, signed: bool) -> torch.Tensor:
    n = q.numel()
    per = scale.repeat_interleave(BLOCK)[:n] / (127.0 if signed else 255.0)
    return q.float().mul_(per)


def _quant(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, *, signed: bool) -> None:
    n = x.numel()
    pad = scale.numel() * BLOCK - n
    blocks = torch.nn.functional.pad(x, (0, pad)).view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-30)
    scale.copy_(absmax)
    levels = 127.0 if signed else 255.0
    q.copy_(blocks.div_(absmax.view(-1, 1)).mul_(levels).round_().view(-1)[:n].to(q.dtype))


def lowbit_caveats() -> list[str]:
    """What the 8-bit row's numbers stand for, and what to install where torchao is missing."""
    out = [
        "torchao.optim.AdamW8bit's state layout (256-element blocks, fp32 moments for tensors "
        "under 4096 elements); simulated and predicted with a step written here (torchao's is "
        "compiled per shape): linear codes instead of its dynamic map, same memory"
    ]
    if not torchao_available():
        out.append(f"torchao is not installed here: {LOWBIT_EXTRA} to train with it")
    return out


def current_kind(facts: Facts) -> str:
    cls = facts.optimizer_class or ""
    if cls == "SGD":
        # momentum may be set per param group: the state the profile measured decides
        opt = facts.profile.optimizers[0]
        state = float(opt.get("state_bytes", 0) or 0)
        momentum = float(facts.optimizer_defaults.get("momentum", 0) or 0)
        return "SGD_momentum" if momentum or state > 0.5 * facts.parameter_bytes else "SGD"
    return cls


def optimizer_transform(facts: Facts, target: str) -> Transform:
    current = STATE_BYTES_PER_ELEMENT.get(current_kind(facts))
    state_ratio = (STATE_BYTES_PER_ELEMENT[target] / current) if current else 1.0
    shapes = parameter_shapes(facts)
    measured_state = float(facts.profile.optimizers[0].get("state_bytes", 0) or 0)
    if target == "AdamW8bit" and shapes and measured_state:
        state_ratio = lowbit_state_bytes(shapes) / measured_state
    adam_like = current_kind(facts) in ("Adam", "AdamW")
    # foreach Adam's scratch goes; the others keep about one tensor (taken as 0 here)
    scratch = 0.0 if adam_like else 1.0
    # the 8-bit step's fp32 chunk scratch: gradient, two moments, denominator and a cast, for
    # the largest chunk (a tensor smaller than a chunk is its own)
    extra = 5.0 * 4 * lowbit_chunk(shapes) if target == "AdamW8bit" else 0.0
    if target in ("SGD", "SGD_momentum") and adam_like:
        extra += sgd_decay_scratch(facts)

    def transform(s: Sample) -> Sample:
        out = dict(s)
        out["optimizer_state"] = s["optimizer_state"] * state_ratio
        if s["phase"] == "optimizer":
            out["temporary"] = s["temporary"] * scratch + extra
        return out

    return transform


def lowbit_state_bytes(shapes: list[list[int]]) -> float:
    """The bytes of :func:`lowbit_layout`'s state for parameters of these shapes (fp32)."""
    total = 0.0
    for shape in shapes:
        n = math.prod(shape)
        if quantized(n):
            total += 2 * (n + 4 * n // BLOCK + 4 * QMAP_ENTRIES)
        else:
            total += 2 * 4 * n
        total += 4  # the step
    return total


def lowbit_chunk(shapes: list[list[int]] | None) -> int:
    """Elements of the largest chunk the 8-bit step updates at once."""
    if shapes is None:
        return CHUNK
    return min(CHUNK, max((math.prod(s) for s in shapes if quantized(math.prod(s))), default=0))


def sgd_decay_scratch(facts: Facts) -> float:
    """Bytes SGD's step allocates for weight decay (``grad + wd * param`` is a new tensor):
    every gradient at once with the foreach implementation (torch's default on CUDA), one
    tensor at a time with the per-tensor loop (its default on CPU); none without decay."""
    if not float(facts.optimizer_defaults.get("weight_decay", 0.0) or 0.0):
        return 0.0
    if facts.profile.device.kind == "cuda":
        return float(facts.parameter_bytes)
    return float(max((r["parameter"] for r in facts.module_rows()), default=0))


def parameter_shapes(facts: Facts) -> list[list[int]] | None:
    """The trained tensors' shapes (None for profiles that did not record them)."""
    if not facts.profile.optimizers:
        return None
    shapes = facts.profile.optimizers[0].get("parameter_shapes")
    return [list(map(int, s)) for s in shapes] if shapes is not None else None


def _bytes_per_element(facts: Facts) -> float:
    opt = facts.profile.optimizers[0] if facts.profile.optimizers else {}
    elements = float(opt.get("num_parameters", 0) or 0)
    return float(facts.parameter_bytes) / elements if elements else 4.0


def largest_tensor_bytes(facts: Facts) -> float:
    """The largest trained tensor's bytes (from its shape; else the largest module's params)."""
    shapes = parameter_shapes(facts)
    if shapes:
        return max(math.prod(s) for s in shapes) * _bytes_per_element(facts)
    return float(max((r["parameter"] for r in facts.module_rows()), default=0))


def adafactor_state_bytes(shapes: list[list[int]], itemsize: float) -> float:
    """Adafactor's persistent state: factored second moments for matrices (rows + columns per
    matrix, for each leading index), a full one for vectors, and a 4-byte step per tensor."""
    total = 0.0
    for shape in shapes:
        if len(shape) >= 2:
            total += math.prod(shape[:-2]) * (shape[-2] + shape[-1]) * itemsize
        else:
            total += math.prod(shape) * itemsize
        total += 4
    return total


def uses_foreach(facts: Facts) -> bool:
    """Whether the profiled optimizer ran torch's foreach implementation."""
    d = facts.optimizer_defaults
    if d.get("fused"):
        return False
    if d.get("foreach") is not None:
        return bool(d["foreach"])
    return facts.profile.device.kind == "cuda"  # torch's default: foreach on CUDA tensors


def _replace_transform(facts: Facts, state_bytes: float, scratch: float) -> Transform:
    """The optimizer's state becomes ``state_bytes`` in all and its step's scratch
    ``scratch`` (the profiled step's own temporaries go)."""
    opt = facts.profile.optimizers[0]
    current = float(opt.get("state_bytes", 0) or 0)
    ratio = state_bytes / current if current else 1.0

    def transform(s: Sample) -> Sample:
        out = dict(s)
        out["optimizer_state"] = s["optimizer_state"] * ratio
        if s["phase"] == "optimizer":
            out["temporary"] = scratch
        return out

    return transform


def _adafactor(facts: Facts) -> Change | None:
    """The Adafactor row (None where it would keep more state than the profiled optimizer)."""
    options = {"from": current_kind(facts), "to": "Adafactor"}
    if not hasattr(torch.optim, "Adafactor"):
        return not_applicable("optimizer", options, "torch.optim.Adafactor needs torch 2.5+",
                              group="optimizer")
    shapes = parameter_shapes(facts)
    if shapes is None:
        return not_applicable("optimizer", options, "the profile has no parameter shapes "
                              "(re-profile with this memprof)", group="optimizer")
    itemsize = _bytes_per_element(facts)
    state = adafactor_state_bytes(shapes, itemsize)
    if state >= float(facts.profile.optimizers[0].get("state_bytes", 0) or 0):
        return None
    foreach = facts.profile.device.kind == "cuda"
    scratch = float(facts.parameter_bytes) if foreach else largest_tensor_bytes(facts)
    return Change(
        "optimizer",
        options,
        f"optimizer_state {state:.0f} B: row + column second moments per matrix, full ones for "
        f"{sum(1 for s in shapes if len(s) < 2)} vectors, a step per tensor (from the "
        f"{len(shapes)} parameter shapes); step scratch = the variance estimate of "
        f"{'every parameter (foreach)' if foreach else 'the largest tensor (per-tensor loop)'}",
        transform=_replace_transform(facts, state, scratch),
        apply=_make("Adafactor", facts.optimizer_defaults),
        caveats=["no first moment and relative step sizes: retune the learning rate; "
                 "quality varies by model"],
        quality_cost=0.3,
        speed_cost=0.05,
        training_only=True,
        group="optimizer",
    )


def _per_tensor_loop(facts: Facts) -> Change:
    kind = current_kind(facts)
    options = {"from": f"{kind} foreach", "to": f"{kind} foreach=False"}
    if kind not in ("Adam", "AdamW"):
        return not_applicable("optimizer", options, f"no scratch model for {kind}",
                              group="optimizer")
    if not uses_foreach(facts):
        reason = ("the profiled step is fused (little scratch)" if facts.optimizer_defaults.get(
            "fused") else "the profiled step already runs the per-tensor loop (torch's default "
                         "on CPU)")
        return not_applicable("optimizer", options, reason, group="optimizer")
    scratch = 2 * largest_tensor_bytes(facts)
    state = float(facts.profile.optimizers[0].get("state_bytes", 0) or 0)

    def apply(st: SimState) -> None:
        st.defaults = {**st.defaults, "foreach": False}
        for g in st.param_groups:
            g["foreach"] = False

    return Change(
        "optimizer",
        options,
        f"the optimizer phase's scratch (foreach: about all parameters at once) becomes twice "
        f"the largest tensor, {scratch:.0f} B (sqrt and division of one second moment)",
        transform=_replace_transform(facts, state, scratch),
        apply=apply,
        caveats=["same results; the step is slower on GPUs (one kernel per tensor per stage)"],
        quality_cost=0.0,
        speed_cost=0.1,
        training_only=True,
        group="optimizer",
    )


def _make(target: str, defaults: dict[str, Any]) -> Callable[[SimState], None]:
    lr = float(defaults.get("lr", 1e-3) or 1e-3)
    wd = float(defaults.get("weight_decay", 0.0) or 0.0)

    def build(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        params = [{"params": g["params"]} for g in groups]
        if target == "SGD_momentum":
            return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
        if target == "SGD":
            return torch.optim.SGD(params, lr=lr, weight_decay=wd)
        if target == "Adafactor":
            return torch.optim.Adafactor(params, lr=lr, weight_decay=wd)
        betas = tuple(defaults.get("betas", (0.9, 0.999)))
        return AdamW8bit(params, lr=lr, betas=(float(betas[0]), float(betas[1])), weight_decay=wd)

    def apply(state: SimState) -> None:
        state.make_optimizer = build

    return apply


def predict(facts: Facts) -> list[Change]:
    """Cheaper optimizers than the profiled one, with the state and scratch they keep."""
    targets = [
        ("SGD_momentum", "SGD with momentum 0.9", 0.5),
        ("SGD", "plain SGD", 0.8),
        ("AdamW8bit", "torchao's 8-bit AdamW states", 0.05),
    ]
    if not facts.has_optimizer:
        return [
            not_applicable("optimizer", {"to": t}, TRAINING_ONLY_REASON, group="optimizer")
            for t, _, _ in targets
        ]
    kind = current_kind(facts)
    current = STATE_BYTES_PER_ELEMENT.get(kind)
    out: list[Change] = []
    for target, label, quality in targets:
        if current is None:
            out.append(
                not_applicable(
                    "optimizer",
                    {"from": kind, "to": target},
                    f"no state model for {kind}",
                    group="optimizer",
                )
            )
            continue
        if STATE_BYTES_PER_ELEMENT[target] >= current:
            continue
        technique = "quantization" if target == "AdamW8bit" else "optimizer"
        out.append(
            Change(
                technique,
                {"from": kind, "to": target},
                f"optimizer_state scaled {STATE_BYTES_PER_ELEMENT[target]:.3g}/{current:.3g} "
                f"bytes per element ({label}); the foreach step scratch "
                f"{'dropped' if kind in ('Adam', 'AdamW') else 'kept'} in the optimizer phase",
                transform=optimizer_transform(facts, target),
                apply=_make(target, facts.optimizer_defaults),
                caveats=(
                    lowbit_caveats()
                    if target == "AdamW8bit"
                    else ["changes training dynamics: retune the learning rate"]
                ),
                quality_cost=quality,
                speed_cost=0.0 if target != "AdamW8bit" else 0.2,
                training_only=True,
                group="optimizer",
            )
        )
    adafactor = _adafactor(facts)
    if adafactor is not None:
        out.append(adafactor)
    out.append(_per_tensor_loop(facts))
    return out
