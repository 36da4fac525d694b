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

8-bit AdamW here is an *emulation* of bitsandbytes' AdamW8bit: moments are stored as int8
(first moment, signed) and uint8 (second moment) with one fp32 absmax scale per 2048-element
block, dequantized to fp32 for each tensor's update and quantized back. Its memory is that of
the real thing; its numerics use linear rather than dynamic-tree quantization.
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

BLOCK = 2048
CHUNK = 8 * BLOCK  # elements updated at once by the 8-bit step
STATE_BYTES_PER_ELEMENT = {
    "AdamW": 8.0,
    "Adam": 8.0,
    "SGD_momentum": 4.0,
    "SGD": 0.0,
    "AdamW8bit": 2.0 + 2 * 4.0 / BLOCK,
}


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit blockwise-quantized moments (an emulation; see the module docstring)."""

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

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                n = p.numel()
                blocks = math.ceil(n / BLOCK)
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros(n, dtype=torch.int8)
                    state["v"] = torch.zeros(n, dtype=torch.uint8)
                    state["m_scale"] = torch.zeros(blocks, dtype=torch.float32)
                    state["v_scale"] = torch.zeros(blocks, dtype=torch.float32)
                state["step"] += 1
                t = state["step"]
                flat = p.view(-1)
                grad = p.grad.reshape(-1)
                flat.mul_(1 - group["lr"] * group["weight_decay"])
                # chunk by chunk, so the fp32 scratch stays a few chunks, not the tensor
                for start in range(0, n, CHUNK):
                    end = min(n, start + CHUNK)
                    blocks_ = slice(start // BLOCK, -(-end // BLOCK))
                    g = grad[start:end].float()
                    m = _dequant(state["m"][start:end], state["m_scale"][blocks_], signed=True)
                    v = _dequant(state["v"][start:end], state["v_scale"][blocks_], signed=False)
                    v.square_()
                    m.mul_(beta1).add_(g, alpha=1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = v.div(1 - beta2**t).sqrt_().add_(group["eps"])
                    flat[start:end].addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**t))
                    del denom
                    _quant(m, state["m"][start:end], state["m_scale"][blocks_], signed=True)
                    _quant(
                        v.sqrt_(), state["v"][start:end], state["v_scale"][blocks_], signed=False
                    )
        return loss


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
    adam_like = current_kind(facts) in ("Adam", "AdamW")
    # foreach Adam's scratch goes; the others keep about one tensor (taken as 0 here)
    scratch = 0.0 if adam_like else 1.0
    # the 8-bit step's fp32 chunk scratch: gradient, two moments, denominator and a cast
    extra = 5.0 * 4 * CHUNK if target == "AdamW8bit" else 0.0
    if target in ("SGD", "SGD_momentum") and adam_like:
        extra += sgd_decay_scratch(facts)

    def transform(s: Sample) -> Sample:
        out = dict(s)
        out["optimizer_state"] = s["optimizer_state"] * state_ratio
        if s["phase"] == "optimizer":
            out["temporary"] = s["temporary"] * scratch + extra
        return out

    return transform


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
        ("AdamW8bit", "8-bit AdamW states (emulated)", 0.05),
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
                    [
                        "emulated 8-bit states (linear blockwise absmax), bitsandbytes uses "
                        "dynamic quantization: same memory, slightly different numerics"
                    ]
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
