"""One training step from explicit parts: the step that simulation, fake runs and estimates run.

The advisor's simulation (:func:`memprof.advisor.workload.run`, real tensors), its fake-run
prediction (:mod:`memprof.advisor.fake_prediction`) and ``memprof estimate``
(:mod:`memprof.estimate.fake_step`, both on fake tensors) all run :func:`training_step`: per
stage, ``zero_grad`` where the stage clears first, the loss (under autocast), backward (scaled
by a GradScaler), the stage's optimizers' steps, ``zero_grad`` where it clears after. What
really differs between them is a parameter, each saying what it is for:

- ``autocast``: the simulation and the fake run cast the loss's whole computation; the
  estimate passes None and casts the model's call inside its own loss;
- ``around_backward``: the fake runs sum gradients in place as the real engine does
  (:func:`memprof.estimate.grad_accumulation.grad_sums_in_place`: the profiler's own ledger
  mode where it is the innermost, else an ``InPlaceGradSums`` mode);
- ``step_optimizer``: a fake run cannot let ``GradScaler.step`` read ``found_inf``, it unscales
  and steps, with stand-ins for the values an optimizer reads;
- ``hold_loss``: the simulation reads the last loss's value after the step, so the losses live
  through their optimizers' steps; the estimate drops each one right after its backward.

A gradient-accumulation micro-step is none of the callers' (the batch rows measure two batch
sizes instead, :mod:`memprof.advisor.batch_rows`), so there is no parameter for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: ``(model, batch) -> loss``.
StepFn = Callable[[nn.Module, Any], torch.Tensor]
#: A stage's loss: ``(model, batch, carry) -> loss``; ``carry`` is a dict made fresh for each
#: step, where a stage leaves what a later stage of the same step reuses (a GAN's generated
#: batch), as the loop's local variables do.
StageLoss = Callable[[nn.Module, Any, dict[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class StagePlan:
    """One backward pass of a step: its loss, the indices of the optimizers it steps (in the
    list given to :func:`training_step`), and where they clear their gradients: ``"after"``
    their step (the usual loop) or ``"before"`` the loss (a GAN's ``opt_d.zero_grad()`` at
    the top of the step), with ``set_to_none``. A plan of no optimizer is a backward whose
    gradients the model's own ``zero_grad`` clears (an estimate with ``optimizer="none"``)."""

    loss: StageLoss
    optimizers: tuple[int, ...]
    zero_grad: str
    set_to_none: bool


def training_step(
    model: nn.Module,
    batch: Any,
    plans: Sequence[StagePlan],
    optimizers: Sequence[torch.optim.Optimizer | None],
    *,
    autocast: tuple[str, torch.dtype] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    prepare_loss: Callable[[StepFn], StepFn] | None = None,
    around_backward: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    step_optimizer: Callable[[torch.optim.Optimizer], None] | None = None,
    hold_loss: bool = True,
) -> torch.Tensor | None:
    """Run one training step of ``model`` on ``batch``: each of ``plans`` in order.

    ``optimizers[i]`` is None where the optimizer kept no parameter (its plans skip it).
    ``autocast`` is ``(device_type, dtype)`` around each loss; ``scaler`` scales each loss
    before ``backward`` (run inside ``around_backward()``), steps the optimizers
    (``scaler.step``, unless ``step_optimizer`` steps them) and is updated once at the end.
    ``prepare_loss`` wraps each stage's loss before it is called (a change's cast of the
    batch, its hooks). With ``hold_loss`` a stage's loss lives until its optimizers have
    stepped, and the last stage's is returned; without, each is dropped after its backward
    and None is returned."""
    step = step_optimizer or (scaler.step if scaler is not None else _plain_step)
    carry: dict[str, Any] = {}
    loss: torch.Tensor | None = None
    for index, plan in enumerate(plans):
        stepped = [o for o in (optimizers[i] for i in plan.optimizers) if o is not None]
        if plan.zero_grad == "before":
            _zero_grad(model, plan, stepped)

        def stage_loss(model: nn.Module, batch: Any, plan: StagePlan = plan) -> torch.Tensor:
            return plan.loss(model, batch, carry)

        loss_of = stage_loss if prepare_loss is None else prepare_loss(stage_loss)
        with (torch.autocast(autocast[0], dtype=autocast[1]) if autocast is not None
              else contextlib.nullcontext()):
            loss = loss_of(model, batch)
        with around_backward():
            (loss if scaler is None else scaler.scale(loss)).backward()
        if not hold_loss:
            loss = None
        for optimizer in stepped:
            step(optimizer)
        if plan.zero_grad == "after":
            _zero_grad(model, plan, stepped)
        if index < len(plans) - 1:
            loss = None  # a stage's loss lives through its step, the last one's to the end
    if scaler is not None:
        scaler.update()
    return loss


def forward_only(model: nn.Module, batch: Any, loss_of: StepFn,
                 autocast: tuple[str, torch.dtype] | None = None) -> torch.Tensor:
    """An inference step: ``loss_of(model, batch)`` under ``torch.no_grad`` (and autocast)."""
    with torch.no_grad(), (torch.autocast(autocast[0], dtype=autocast[1])
                           if autocast is not None else contextlib.nullcontext()):
        return loss_of(model, batch)


def _plain_step(optimizer: torch.optim.Optimizer) -> None:
    optimizer.step()


def _zero_grad(model: nn.Module, plan: StagePlan,
               optimizers: list[torch.optim.Optimizer]) -> None:
    if not plan.optimizers:
        model.zero_grad(set_to_none=plan.set_to_none)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=plan.set_to_none)
