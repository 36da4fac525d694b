"""The one training step that simulation, fake runs and estimates share (issue #28).

GIVEN a small real model and optimizers, WHEN :func:`memprof.training_step.training_step`
runs a step from explicit parts, THEN each part does what its caller relies on: the stages'
order and zero_grad places, the loss's lifetime, the GradScaler's scaling and update, the
model's own zero_grad where a plan steps no optimizer, autocast and the loss's preparation.
"""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from torch import nn

from memprof.training_step import StagePlan, StepFn, forward_only, training_step


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))


def _mean_loss(model: nn.Module, batch: Any, carry: dict[str, Any]) -> torch.Tensor:
    return model(batch).sum()


def test_stages_run_in_order_and_clear_where_they_say() -> None:
    model = _model()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = torch.optim.SGD(model[1].parameters(), lr=0.1)
    events: list[str] = []
    seen: dict[str, Any] = {}

    def loss_a(model: nn.Module, batch: Any, carry: dict[str, Any]) -> torch.Tensor:
        events.append("loss a")
        carry["hidden"] = model[0](batch)
        return model[1](carry["hidden"]).sum()

    def loss_b(model: nn.Module, batch: Any, carry: dict[str, Any]) -> torch.Tensor:
        events.append("loss b")
        # stage a cleared its gradients after its step; stage b's are still last step's
        seen["a grad"] = model[0].weight.grad
        seen["b grad"] = model[1].weight.grad.clone()
        seen["hidden"] = carry["hidden"].detach()
        return model[1](seen["hidden"]).sum()

    def step(optimizer: torch.optim.Optimizer) -> None:
        events.append("step a" if optimizer is first else "step b")
        optimizer.step()

    batch = torch.ones(2, 4)
    plans = [StagePlan(loss_a, (0,), "after", True), StagePlan(loss_b, (1,), "before", False)]
    model[1].weight.grad = torch.full_like(model[1].weight, 7.0)
    training_step(model, batch, plans, [first, second], step_optimizer=step)

    assert events == ["loss a", "step a", "loss b", "step b"]
    assert seen["a grad"] is None  # set to None after stage a's step
    assert torch.equal(seen["b grad"], torch.zeros_like(model[1].weight))  # zeroed before b
    # stage b's gradient, of its own loss alone (the 7s and stage a's were zeroed before it),
    # lives on after its step: d(sum of hidden @ w.T)/dw is the hidden's column sums
    assert torch.allclose(model[1].weight.grad, seen["hidden"].sum(0, keepdim=True))
    assert model[0].weight.grad is None


@pytest.mark.parametrize("hold_loss", [True, False])
def test_the_loss_lives_through_the_step_only_when_held(hold_loss: bool) -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    made: list[weakref.ref[torch.Tensor]] = []
    alive_at_step: list[bool] = []

    def loss(model: nn.Module, batch: Any, carry: dict[str, Any]) -> torch.Tensor:
        value = model(batch).sum()
        made.append(weakref.ref(value))
        return value

    def step(optimizer: torch.optim.Optimizer) -> None:
        alive_at_step.append(made[0]() is not None)
        optimizer.step()

    batch = torch.ones(2, 4)
    expected = float(_model()(batch).sum().detach())
    returned = training_step(model, batch, [StagePlan(loss, (0,), "after", True)], [optimizer],
                             step_optimizer=step, hold_loss=hold_loss)
    assert alive_at_step == [hold_loss]
    if hold_loss:
        assert returned is not None
        assert float(returned.detach()) == pytest.approx(expected)
    else:
        assert returned is None
        assert made[0]() is None


def test_a_plan_of_no_optimizer_clears_the_models_gradients() -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    training_step(model, torch.ones(2, 4), [StagePlan(_mean_loss, (), "after", False)], [None])
    # nothing stepped; the gradients backward made are zeroed (set_to_none=False), not freed
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    training_step(model, torch.ones(2, 4), [StagePlan(_mean_loss, (), "after", True)], [None])
    assert all(p.grad is None for p in model.parameters())


def test_the_scaler_scales_the_backward_and_is_updated_once() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1)
    grads: list[torch.Tensor] = []

    def step(optimizer: torch.optim.Optimizer) -> None:
        grads.append(model[1].bias.grad.detach().clone())  # type: ignore[union-attr]
        scaler.step(optimizer)

    batch = torch.ones(5, 4)
    training_step(model, batch, [StagePlan(_mean_loss, (0,), "after", True)], [optimizer],
                  scaler=scaler, step_optimizer=step)
    # d(sum of 5 outputs)/d(bias) is 5, times the scale
    assert float(grads[0]) == pytest.approx(5 * 256.0)
    assert scaler.get_scale() == pytest.approx(512.0)  # one update, growth interval 1


def test_autocast_and_the_prepared_loss_wrap_every_stage() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dtypes: list[torch.dtype] = []
    wrapped: list[int] = []

    def loss(model: nn.Module, batch: Any, carry: dict[str, Any]) -> torch.Tensor:
        out = model(batch)
        dtypes.append(out.dtype)
        return out.float().sum()

    def prepare(loss_of: StepFn) -> StepFn:
        def doubled(model: nn.Module, batch: Any) -> torch.Tensor:
            wrapped.append(len(wrapped))
            return loss_of(model, batch * 2)

        return doubled

    batch = torch.ones(2, 4)
    plans = [StagePlan(loss, (0,), "after", True)] * 2
    training_step(model, batch, plans, [optimizer], autocast=("cpu", torch.bfloat16),
                  prepare_loss=prepare)
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert wrapped == [0, 1]
    result = forward_only(model, batch, lambda m, b: m(b).sum())
    assert not result.requires_grad
    assert float(result) == pytest.approx(float(model(batch).sum().detach()))
