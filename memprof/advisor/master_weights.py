"""bf16 weights with fp32 master weights: the classic mixed-precision optimizer.

The model runs in bf16 (weights, gradients, activations and scratch as in pure bf16, see
:mod:`memprof.advisor.mixed_precision`), while the optimizer keeps an fp32 copy of every trained
weight and updates that copy with fp32 states; after each step the copy is rounded into the
bf16 weight. Small updates are not lost to bf16's 8-bit mantissa, so quality is close to fp32
training, at 2 + 2 + 4 + 8 = 16 bytes per parameter for Adam (the same as fp32) but half the
activations.

Simulated with :func:`memprof.advisor.workload.with_master_weights`: the optimizer (the
profiled one's class and hyperparameters, or the one another change picks) over fp32 masters,
kept in step with the bf16 weights by hooks. The masters count as optimizer state from the
first step on (the profile lists them with the moments), and the fp32 gradients as the
optimizer phase's scratch, all at once.
"""

from __future__ import annotations

import torch

from memprof.advisor.core import TRAINING_ONLY_REASON, Change, Facts, Sample, Transform
from memprof.advisor.mixed_precision import (
    _apply_pure_bf16,
    already_16_bit,
    cpu_kernel_caveats,
    pure_bf16_transform,
)
from memprof.advisor.workload import SimState

OPTIONS = {"mode": "pure", "dtype": "bf16", "master_weights": True}


def master_weights_transform(facts: Facts) -> Transform:
    """Pure bf16, but the optimizer's states stay fp32, the fp32 masters join them, and its
    step runs in fp32 on fp32 copies of the gradients."""
    pure = pure_bf16_transform(facts)
    masters = float(facts.parameter_bytes)

    def transform(s: Sample) -> Sample:
        out = pure(s)
        state = float(s["optimizer_state"])
        out["optimizer_state"] = state + masters if state > 0 else 0.0
        if s["phase"] == "optimizer":
            out["temporary"] = float(s["temporary"]) + masters
        return out

    return transform


def _apply(state: SimState) -> None:
    _apply_pure_bf16(state)
    state.master_weights = True


def predict(facts: Facts) -> list[Change]:
    if not facts.has_optimizer:
        return [Change("mixed_precision", dict(OPTIONS), TRAINING_ONLY_REASON, applicable=False,
                       reason=TRAINING_ONLY_REASON, group="precision")]
    sixteen = already_16_bit(facts)
    if sixteen is not None:
        reason = (f"the parameters are already {sixteen}: fp32 master weights would add "
                  "memory, not save it")
        return [Change("mixed_precision", dict(OPTIONS), reason, applicable=False, reason=reason,
                       group="precision")]
    opt = facts.profile.optimizers[0]
    if not float(opt.get("state_bytes", 0) or 0):
        reason = (f"{facts.optimizer_class} keeps no state here: fp32 master weights would be "
                  "its only fp32 copy (predicted for optimizers with state)")
        return [Change("mixed_precision", dict(OPTIONS), reason, applicable=False, reason=reason,
                       group="precision")]
    return [Change(
        "mixed_precision",
        dict(OPTIONS),
        "weights, gradients, floating inputs, forward/backward scratch and saved activations "
        "as in pure bf16; the optimizer states stay fp32 and gain the fp32 master weights "
        f"({facts.parameter_bytes:.0f} B); its step also holds fp32 copies of the gradients",
        transform=master_weights_transform(facts),
        apply=_apply,
        caveats=["same bytes per parameter as fp32 for Adam (16): the saving is activations",
                 *cpu_kernel_caveats(facts, torch.bfloat16)],
        quality_cost=0.1,
        speed_cost=-0.2,
        training_only=True,
        group="precision",
    )]
