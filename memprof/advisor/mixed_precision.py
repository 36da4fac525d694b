"""Mixed precision: autocast (bf16, or fp16 with a GradScaler) and pure bf16 training.

Facts used (DESIGN.md): autocast keeps fp32 weights, gradients and optimizer states; the
matmul/conv ops it covers save 16-bit inputs for backward and it keeps a 16-bit copy of each
weight those ops use while autograd needs it. Pure bf16 halves every floating tensor: weights,
gradients, optimizer states, activations and the step's scratch.
"""

from __future__ import annotations

import torch

from memprof.advisor.core import MATMUL_TYPES, Change, Facts, Sample, Transform
from memprof.advisor.workload import SimState


def _matmul_weight_bytes(facts: Facts) -> float:
    rows = facts.module_rows()
    return float(sum(r["parameter"] for r in rows if r["type"] in MATMUL_TYPES))


def autocast_transform(facts: Facts) -> Transform:
    """Activations halve; the 16-bit weight copies stay alive from forward through backward."""
    copies = 0.5 * _matmul_weight_bytes(facts)

    def transform(s: Sample) -> Sample:
        out = dict(s)
        if s["activation"] > 0:  # between the forward and the end of backward
            out["activation"] = s["activation"] * 0.5 + copies
        if s["phase"] in ("forward", "backward"):
            out["temporary"] = s["temporary"] * 0.5
        return out

    return transform


def pure_bf16_transform(facts: Facts) -> Transform:
    keep_input = 1.0 - 0.5 * facts.float_input_fraction

    def transform(s: Sample) -> Sample:
        out = dict(s)
        for c in (
            "parameter",
            "buffer",
            "gradient",
            "optimizer_state",
            "activation",
            "temporary",
            "other",
        ):
            out[c] = s[c] * 0.5
        out["input"] = s["input"] * keep_input
        return out

    return transform


def _apply_autocast(dtype: torch.dtype) -> object:
    def apply(state: SimState) -> None:
        state.autocast = dtype

    return apply


def _apply_pure_bf16(state: SimState) -> None:
    state.model.to(torch.bfloat16)
    state.cast_batch = torch.bfloat16


def predict(facts: Facts) -> list[Change]:
    """Autocast bf16, autocast fp16 + GradScaler, and pure bf16 (weights and states)."""
    changes = [
        Change(
            "mixed_precision",
            {"mode": "autocast", "dtype": "bf16"},
            "activations of the profile halved (16-bit saved tensors) plus a 16-bit copy of the "
            f"Linear/Conv weights ({_matmul_weight_bytes(facts):.0f} B fp32) while autograd holds "
            "it; weights, grads and optimizer state unchanged",
            transform=autocast_transform(facts),
            apply=_apply_autocast(torch.bfloat16),  # type: ignore[arg-type]
            caveats=[
                "needs bf16 hardware (Ampere or newer; not T4/V100)",
                "elementwise ops outside autocast's list stay fp32",
            ],
            quality_cost=0.1,
            speed_cost=-0.3,
            group="precision",
        ),
        Change(
            "mixed_precision",
            {"mode": "autocast", "dtype": "fp16", "grad_scaler": True},
            "as autocast bf16 (same sizes); GradScaler adds one fp32 scale and an inf flag",
            transform=autocast_transform(facts),
            apply=None,
            caveats=[
                "simulated as bf16 on CPU; fp16 needs loss scaling (GradScaler) against underflow",
                "for GPUs without bf16 (T4, V100)",
            ],
            quality_cost=0.15,
            speed_cost=-0.3,
            group="precision",
        ),
        Change(
            "mixed_precision",
            {"mode": "pure", "dtype": "bf16", "master_weights": False},
            "every category of the profile halved (weights, grads, optimizer states, "
            "activations, scratch), floating inputs halved: 8 instead of 16 bytes/param for Adam",
            transform=pure_bf16_transform(facts),
            apply=_apply_pure_bf16,
            caveats=[
                "bf16 weight updates lose small steps (8-bit mantissa): use stochastic "
                "rounding or fp32 master weights for long runs"
            ],
            quality_cost=0.3,
            speed_cost=-0.3,
            group="precision",
        ),
    ]
    return changes
