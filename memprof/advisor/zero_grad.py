"""``zero_grad(set_to_none=True)``: free the gradients between steps instead of zeroing them.

A loop that calls ``zero_grad(set_to_none=False)`` (or never frees them) keeps every gradient
allocated from one backward to the next, so the whole gradient bytes ``G`` sit on top of the
forward's activations. Set to None, a gradient exists only once the backward has produced it:
``AccumulateGrad`` then takes the freshly computed tensor as ``.grad`` where it would otherwise
add it into the kept one and free it, so at any moment of the backward the difference is
exactly the gradients not yet produced.

The profile says which those are. Its first step starts with no gradients (they are None
before the first backward), so its backward samples give the gradient bytes produced by the
time each module's backward starts. The rewrite scales a sample's gradient by that fraction of
``G``: 0 in the forward, the module's fraction in the backward, unchanged from the end of the
backward on. Inside a module the fraction is the same: the gradients its backward is computing
are temporaries in the profiled run (added into the kept ones, then freed), and become the
``.grad`` themselves once set to None: the same bytes, counted once. Without a step that
started from None (a schedule that skipped it), the fractions come from the modules' own
gradient bytes in the backward's module order.

Several optimizers in one step (a GAN: the discriminator's backward and step, then the
generator's) are a pattern of their own, not gradient accumulation: each optimizer's gradients
live from its backward to its own ``zero_grad``, which may come in the next step (the
generator's, through the discriminator's forward) although every ``zero_grad`` frees them. The
timeline tells them apart: accumulation runs several backward passes before one optimizer step;
several optimizers step once per backward; and a loop whose gradients are zeroed in place never
frees any (the gradient bytes never drop).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from memprof.advisor.core import (
    TRAINING_ONLY_REASON,
    Change,
    Facts,
    Sample,
    gradients_before,
    not_applicable,
)
from memprof.advisor.workload import SimState

OPTIONS = {"from": "zero_grad(set_to_none=False)", "to": "zero_grad(set_to_none=True)"}
GROUP = "zero_grad"


@dataclass(frozen=True)
class GradientUse:
    """How the profiled loop treats gradients between steps."""

    kept: bool  # gradients are live in a forward before that step's backward
    backward_passes: int  # most backward passes in one step
    total: float  # G: the gradient bytes of a step once its backward is done
    produced: dict[str, float]  # module -> fraction of G produced when its backward starts
    source: str  # where the fractions come from
    optimizer_steps: int = 1  # most optimizer steps in one step (2+: several optimizers)
    passes_per_update: int = 1  # most backward passes before one optimizer step (accumulation)
    freed: bool = True  # some gradient is freed inside a step (a zero_grad setting None)

    @property
    def zeroed_in_place(self) -> bool:
        """Gradients outlive the step and are never freed: ``zero_grad(set_to_none=False)``
        (what a simulation of the loop must then do too)."""
        return self.kept and not self.freed


def gradient_use(facts: Facts) -> GradientUse:
    """Read from the timeline: whether gradients outlive the step, and when they appear."""
    timeline = facts.profile.timeline().sort_values(["step", "seq"], kind="stable")
    kept, passes, total = False, 0, 0.0
    updates, per_update, freed = 0, 0, False
    clean: list[tuple[str, float]] | None = None  # (module, gradient) of a step from None
    for _, rows in timeline.groupby("step", sort=True):
        phases = list(rows["phase"])
        grads = [float(g) for g in rows["gradient"]]
        starts = [i for i, p in enumerate(phases) if p == "backward" and (
            i == 0 or phases[i - 1] != "backward")]
        passes = max(passes, len(starts))
        freed = freed or any(b < a for a, b in itertools.pairwise(grads))
        runs = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
        updates = max(updates, runs.count("optimizer"))
        pending = 0
        for phase in runs:
            if phase == "backward":
                pending += 1
            elif phase == "optimizer":
                per_update, pending = max(per_update, pending), 0
        per_update = max(per_update, pending)
        if not starts:
            continue
        first = starts[0]
        had = any(
            g > 0 for p, g in zip(phases[:first], grads[:first], strict=True) if p == "forward"
        )
        kept = kept or had
        backward = [
            (str(m), g) for m, p, g in zip(rows["module"], phases, grads, strict=True)
            if p == "backward"
        ]
        end = max(grads[first:], default=0.0)
        total = max(total, end)
        if not had and clean is None and len(starts) == 1 and end > 0:
            clean = [(m, g / end) for m, g in backward]
    steps, per = max(updates, 1), max(per_update, 1)
    produced: dict[str, float] = {}
    if clean is not None:
        for module, fraction in clean:
            produced.setdefault(module, fraction)
        return GradientUse(kept, passes, total, produced, "the first step's backward",
                           steps, per, freed)
    owners = {str(r["module"]) for r in facts.module_rows() if r["gradient"]}
    before = gradients_before(facts, owners)
    all_own = sum(float(r["gradient"]) for r in facts.module_rows()) or 1.0
    produced = {module: done / all_own for module, done in before.items()}
    return GradientUse(kept, passes, total, produced, "the modules' own gradients in "
                       "backward order (no profiled step started without gradients)",
                       steps, per, freed)


def free_gradients_transform(use: GradientUse) -> Any:
    def transform(s: Sample) -> Sample:
        out = dict(s)
        phase = s["phase"]
        if phase == "forward" or (phase == "other" and not s.get("after_backward", True)):
            out["gradient"] = 0.0
        elif phase == "backward":
            out["gradient"] = s["gradient"] * use.produced.get(str(s["module"]), 1.0)
        return out

    return transform


def _apply(state: SimState) -> None:
    state.free_gradients = True


def predict(facts: Facts) -> list[Change]:
    if not facts.has_optimizer:
        return [not_applicable("optimizer", OPTIONS, TRAINING_ONLY_REASON, group=GROUP)]
    use = gradient_use(facts)
    if use.optimizer_steps > 1:
        how = ("zeroed in place, never freed" if use.zeroed_in_place else
               "each freed only by its optimizer's own zero_grad, which may come in the next "
               "step")
        return [not_applicable(
            "optimizer", OPTIONS, f"{use.optimizer_steps} optimizer steps after "
            f"{use.backward_passes} backward passes in each step (several optimizers, as in a "
            f"GAN): each optimizer's gradients live from its backward on, {how}; call each "
            "optimizer's zero_grad(set_to_none=True) right after its own step to free them "
            "for the rest of the step (not predicted: the rewrite models one optimizer)",
            group=GROUP)]
    if not use.kept:
        return [not_applicable(
            "optimizer", OPTIONS, "the gradients are already freed between steps (none is "
            "live in a forward before its backward)", group=GROUP)]
    if use.passes_per_update > 1:
        return [not_applicable(
            "optimizer", OPTIONS, f"the gradients accumulate over {use.passes_per_update} "
            "backward passes per step: they must live between micro-batches, so freeing them "
            "helps only the first micro-batch (free them after the optimizer step)", group=GROUP)]
    return [Change(
        "optimizer",
        dict(OPTIONS),
        f"the {use.total:.0f} B of gradients kept between steps go from the forward and, in "
        f"the backward, until it produces them (the fraction produced per module from "
        f"{use.source})",
        transform=free_gradients_transform(use),
        apply=_apply,
        caveats=["same results; code that reads .grad before backward must handle None"],
        quality_cost=0.0,
        speed_cost=0.0,
        training_only=True,
        group=GROUP,
    )]
