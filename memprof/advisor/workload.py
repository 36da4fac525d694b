"""Simulation: apply changes to deep copies of the user's model and optimizer, and measure.

The user's model and optimizer are never touched: the model is deep-copied, and a fresh
optimizer of the same class is built from the original's hyperparameters (param group by
param group) on the copy's parameters. Each simulation profiles a few full steps with
:func:`memprof.profile` and returns the measured peak, the step time and the quality: the
relative drift of the outputs on the same batch before training, and of the loss after the
same steps, both against the unchanged model.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from memprof.profile import Profile
from memprof.tracking import session
from memprof.training_step import StageLoss, StagePlan, StepFn, forward_only, training_step

#: Builds an optimizer over param groups (each with "params" and its hyperparameters).
OptimizerMaker = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]

#: The param-group key naming which of a workload's optimizers a copied group belongs to (see
#: :meth:`SimState.build_optimizers`; absent: the first).
OPTIMIZER_KEY = "memprof_optimizer"

#: Steps a GradScaler may skip (its scaled gradients overflowed, so the optimizer never stepped
#: and holds no state) before a simulation counts them: the peak a user sees is the steady one.
MAX_SKIPPED_STEPS = 24


@dataclass
class Stage:
    """One backward pass of a training step: its loss, then the optimizers stepped on the
    gradients it made. ``zero_grad`` says where those optimizers clear their gradients:
    ``"after"`` their step (the usual loop) or ``"before"`` the stage's loss is computed (a
    GAN's ``opt_d.zero_grad()`` at the top of the step: gradients a later stage adds to stay
    alive until then)."""

    optimizers: list[torch.optim.Optimizer]
    loss: StageLoss
    zero_grad: str = "after"
    set_to_none: bool = True

    def __post_init__(self) -> None:
        if self.zero_grad not in ("before", "after"):
            raise ValueError(f"zero_grad must be 'before' or 'after', not {self.zero_grad!r}")
        if not self.optimizers:
            raise ValueError("a stage steps at least one optimizer")


@dataclass
class Workload:
    """What simulation needs: the model, its optimizer (class and hyperparameters are copied,
    never its state), a sample batch and how a step computes the loss.

    ``step_fn(model, batch) -> loss`` overrides the default, which is ``model(**batch).loss``
    for a dict batch, ``loss_fn(model(x), y)`` for an ``(x, y)`` batch (cross-entropy for
    integer targets, MSE otherwise when ``loss_fn`` is None) and ``model(x).float().mean()``
    for a tensor. memprof adds ``loss.backward()``, ``optimizer.step()`` and
    ``optimizer.zero_grad(set_to_none=set_to_none)``: ``set_to_none=False`` keeps the
    gradients allocated (zeroed) between steps, as a loop calling ``zero_grad(False)`` does.
    ``optimizer=None`` simulates inference (forward under ``torch.no_grad``).

    ``stages`` describes a step of several backward passes or optimizers (a GAN's D then G
    step, SparseAdam for sparse embeddings beside Adam): the step runs each :class:`Stage` in
    order, and ``optimizer``, ``step_fn``, ``loss_fn`` and ``set_to_none`` are not used (the
    first stage's first optimizer becomes ``optimizer``).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    batch: Any
    step_fn: StepFn | None = None
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    steps: int = 3
    set_to_none: bool = True
    stages: list[Stage] | None = None
    #: The batch is the loop's own, made (or fetched) by it for the step and held while the
    #: step runs, as a script's is: a change that casts the batch (pure bf16) makes its copy
    #: in the step, at the model's call, beside the held original (as the script's run with
    #: the change does), not once before the steps (as a Workload of a fixed batch does).
    batch_in_step: bool = False

    def __post_init__(self) -> None:
        if self.stages is not None:
            if not self.stages:
                raise ValueError("stages, when given, lists at least one stage")
            if self.optimizer is None:
                self.optimizer = self.stages[0].optimizers[0]

    def optimizer_list(self) -> list[torch.optim.Optimizer]:
        """Every optimizer the step steps, each once, in the order the stages first use them."""
        if self.stages is None:
            return [] if self.optimizer is None else [self.optimizer]
        found: list[torch.optim.Optimizer] = []
        for stage in self.stages:
            found.extend(o for o in stage.optimizers if not any(o is f for f in found))
        return found

    def stage_plans(self) -> list[StagePlan]:
        """The step's stages as :func:`memprof.training_step.training_step` runs them, their
        optimizers' indices in :meth:`optimizer_list` (one stage, from
        ``step_fn``/``loss_fn``/``set_to_none``, without ``stages``)."""
        if self.stages is None:
            return [StagePlan(lambda model, batch, carry: self.loss(model, batch), (0,),
                              "after", self.set_to_none)]
        optimizers = self.optimizer_list()
        return [StagePlan(stage.loss,
                          tuple(next(i for i, o in enumerate(optimizers) if o is opt)
                                for opt in stage.optimizers),
                          stage.zero_grad, stage.set_to_none)
                for stage in self.stages]

    def keeps_gradients(self) -> bool:
        """Whether gradients can be alive between steps: zeroed in place, or cleared at the
        start of a stage (a later stage's gradients live until then)."""
        return any(not plan.set_to_none or plan.zero_grad == "before"
                   for plan in self.stage_plans())

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if self.step_fn is not None:
            return self.step_fn(model, batch)
        if isinstance(batch, dict):
            out = model(**batch)
            loss = getattr(out, "loss", None)
            if loss is None and isinstance(out, dict):
                loss = out.get("loss")
            if loss is None:
                raise TypeError("model(**batch) returned no .loss: pass step_fn to the Workload")
            return loss
        if isinstance(batch, tuple | list) and len(batch) == 2:
            x, y = batch
            out = _logits(model(x))
            if self.loss_fn is not None:
                return self.loss_fn(out, y)
            if not torch.is_floating_point(y):
                return nn.functional.cross_entropy(out.float(), y)
            return nn.functional.mse_loss(out.float(), y.to(out.dtype).float())
        return _logits(model(batch)).float().mean()

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The model's output on ``batch`` (logits), for the drift measure; with ``stages``,
        the first stage's loss (the model's call is the stages' own)."""
        if self.stages is not None:
            return self.stages[0].loss(model, batch, {}).detach().reshape(-1)
        if isinstance(batch, dict):
            out = model(**batch)
            return _logits(out)
        x = batch[0] if isinstance(batch, tuple | list) else batch
        return _logits(model(x))


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping):  # a dict, or transformers' ModelOutput (CLIP's logits_per_image)
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
        for key, value in out.items():
            if key != "loss" and isinstance(value, torch.Tensor) and value.is_floating_point():
                return value
    raise TypeError(f"cannot read outputs from a {type(out).__name__}: pass step_fn")


@dataclass
class SimState:
    """The copies a change edits before the steps run."""

    model: nn.Module
    batch: Any
    optimizer_class: type[torch.optim.Optimizer] | None
    param_groups: list[dict[str, Any]]  # hyperparameters per group, with "params" (copies)
    defaults: dict[str, Any] = field(default_factory=dict)
    autocast: torch.dtype | None = None
    grad_scaler: bool = False  # scale the loss, unscale and step through torch.amp.GradScaler
    cast_batch: torch.dtype | None = None
    #: Replaces every optimizer of the workload (a change of optimizer).
    make_optimizer: OptimizerMaker | None = None
    #: Wraps the maker of each optimizer (its own class, or ``make_optimizer``): ZeRO-1 shards
    #: every optimizer of the workload in its own class.
    wrap_optimizer: Callable[[OptimizerMaker], OptimizerMaker] | None = None
    wrap_step: list[Callable[[StepFn], StepFn]] = field(default_factory=list)
    #: True: the gradients are set to None after every optimizer step (None: as the run
    #: would, the Workload's ``set_to_none`` or the script's own ``zero_grad``).
    free_gradients: bool | None = None
    #: The optimizer steps fp32 copies of the parameters (see :func:`with_master_weights`).
    master_weights: bool = False
    #: Sharded as rank 0 of ``ranks``: "zero1", "zero2" or "zero3" (see
    #: :mod:`memprof.advisor.sharded_steps`).
    shard: str | None = None
    ranks: int = 1
    notes: list[str] = field(default_factory=list)
    #: The class and defaults of the workload's second, third, ... optimizer (a workload of
    #: several, see :class:`Stage`); the first's are ``optimizer_class`` and ``defaults``. A
    #: param group of the n-th carries ``{OPTIMIZER_KEY: n}``.
    more_optimizers: list[tuple[type[torch.optim.Optimizer], dict[str, Any]]] = field(
        default_factory=list)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer the change asks for, over the param groups that kept parameters
        (the original's class and defaults, so the copy reports the same hyperparameters)."""
        if self.more_optimizers:
            raise ValueError("this workload has several optimizers: use build_optimizers()")
        built = self.build_optimizers()[0]
        assert built is not None
        return built

    def build_optimizers(self) -> list[torch.optim.Optimizer | None]:
        """One optimizer per optimizer of the workload, in its order (see
        :meth:`build_optimizer`); a change's ``make_optimizer`` replaces each, its
        ``wrap_optimizer`` wraps each. None where no
        group of that optimizer kept a parameter (LoRA trains the adapters only)."""
        specs = [(self.optimizer_class, self.defaults), *self.more_optimizers]
        built: list[torch.optim.Optimizer | None] = []
        for index, (cls, defaults) in enumerate(specs):
            groups = [{k: v for k, v in g.items() if k != OPTIMIZER_KEY}
                      for g in self.param_groups
                      if g["params"] and g.get(OPTIMIZER_KEY, 0) == index]
            if not groups and len(specs) > 1:
                built.append(None)
                continue
            make = self.make_optimizer
            if make is None:
                assert cls is not None
                make = _constructor(cls, defaults)
            if self.wrap_optimizer is not None:
                make = self.wrap_optimizer(make)
            built.append(with_master_weights(groups, make) if self.master_weights
                         else make(groups))
        return built


def _constructor(cls: type[torch.optim.Optimizer], defaults: dict[str, Any]) -> OptimizerMaker:
    options = accepted_options(cls, defaults)

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return cls(groups, **options)

    return make


def with_master_weights(
    groups: list[dict[str, Any]], make: OptimizerMaker
) -> torch.optim.Optimizer:
    """An optimizer built by ``make`` over fp32 copies ("masters") of the parameters in
    ``groups``: a step pre-hook gives each master the fp32 copy of its parameter's gradient, a
    post-hook copies the masters back into the parameters, drops those fp32 gradients and, once
    the step has initialized their state, lists each master in it; ``zero_grad`` clears the
    parameters' gradients too."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    master_groups = []
    for group in groups:
        masters = []
        for p in group["params"]:
            master = p.detach().float().requires_grad_(True)
            pairs.append((p, master))
            masters.append(master)
        master_groups.append(
            {**{k: v for k, v in group.items() if k != "params"}, "params": masters}
        )
    optimizer = make(master_groups)

    def before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p, master in pairs:
            master.grad = None if p.grad is None else p.grad.float()

    @torch.no_grad()
    def after_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p, master in pairs:
            p.copy_(master)
            master.grad = None
            state = opt.state.get(master)
            if state:
                state.setdefault("master", master)

    real_zero_grad = optimizer.zero_grad

    def zero_grad(set_to_none: bool = True) -> None:
        real_zero_grad(set_to_none=set_to_none)
        for p, _ in pairs:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    optimizer.register_step_pre_hook(before_step)
    optimizer.register_step_post_hook(after_step)
    optimizer.zero_grad = zero_grad  # type: ignore[method-assign]
    return optimizer


@dataclass(frozen=True)
class Measurement:
    peak_bytes: int
    step_time_s: float
    output_drift: float | None
    loss_drift: float | None
    final_loss: float | None
    profile: Profile
    outputs: torch.Tensor | None = field(default=None, repr=False, compare=False)


def copy_state(workload: Workload, *, batch: Any = None) -> SimState:
    """Deep copies of the model and the optimizer's hyperparameters (never its state)."""
    memo: dict[int, Any] = {}
    model = copy.deepcopy(workload.model, memo)
    b = workload.batch if batch is None else batch
    state = SimState(model=model, batch=_clone(b), optimizer_class=None, param_groups=[])
    copy_optimizers(workload, memo, state)
    return state


def copy_optimizers(workload: Workload, memo: dict[int, Any], state: SimState) -> None:
    """Give ``state`` the classes, defaults and param groups (over the copies ``memo`` maps
    the parameters to) of every optimizer of ``workload``, never their state."""
    for index, optimizer in enumerate(workload.optimizer_list()):
        spec = (type(optimizer), copy.deepcopy(dict(optimizer.defaults)))
        if index == 0:
            state.optimizer_class, state.defaults = spec
        else:
            state.more_optimizers.append(spec)
        for g in optimizer.param_groups:
            hyper = {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
            hyper["params"] = [memo[id(p)] for p in g["params"] if id(p) in memo]
            if index:
                hyper[OPTIMIZER_KEY] = index
            state.param_groups.append(hyper)


def accepted_options(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """The ``options`` that ``cls.__init__`` takes (an optimizer's ``defaults`` can hold
    keys its constructor does not: AdamW's ``decoupled_weight_decay``)."""
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in params}


def _clone(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.detach().clone()
    if isinstance(batch, dict):
        return {k: _clone(v) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_clone(v) for v in batch)
    return copy.deepcopy(batch)


def cast_floats(batch: Any, dtype: torch.dtype, *, pair_target: bool = True) -> Any:
    """``batch`` with its floating tensors cast to ``dtype``; with ``pair_target``, the second
    of an ``(x, y)`` pair keeps its dtype (the default loss computes it in fp32)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if torch.is_floating_point(batch) else batch
    if isinstance(batch, dict):
        return {k: cast_floats(v, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        items = list(batch)
        if len(items) == 2 and pair_target:
            return type(batch)([cast_floats(items[0], dtype), items[1]])
        return type(batch)(cast_floats(v, dtype, pair_target=False) for v in items)
    return batch


def step_batch(workload: Workload, state: SimState) -> Any:
    """The batch the steps are given: ``state.batch``, cast as the change asks, unless the
    workload's batch is cast in the step (``batch_in_step``, see :func:`cast_in_step`)."""
    if workload.batch_in_step:
        return state.batch
    return cast_batch(workload, state, state.batch)


def cast_batch(workload: Workload, state: SimState, batch: Any) -> Any:
    """``batch`` cast as the change asks (every floating tensor of a staged workload's batch:
    its stages, not an ``(x, y)`` loss, read it)."""
    if state.cast_batch is None:
        return batch
    return cast_floats(batch, state.cast_batch, pair_target=workload.stages is None)


def step_input(workload: Workload, batch: Any) -> Any:
    """The batch one step runs on: with ``batch_in_step`` a new copy made at the step's
    start (the loop's loader makes it there, and holds it through the step: it counts),
    otherwise ``batch`` itself (alive before the steps)."""
    return _clone(batch) if workload.batch_in_step else batch


def cast_in_step(workload: Workload, state: SimState, loss_of: StepFn) -> StepFn:
    """``loss_of`` casting its batch on entry where the workload's batch is cast in the step
    (``batch_in_step``): the copy lives as long as the step needs it, beside the original."""
    if state.cast_batch is None or not workload.batch_in_step:
        return loss_of

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        return loss_of(model, cast_batch(workload, state, batch))

    return loss


def run(
    workload: Workload, state: SimState, *, reference: Measurement | None = None,
    backend: Any = "auto",
) -> Measurement:
    """Run ``workload.steps`` steps of ``state`` under memprof (its ``backend``) and measure
    them."""
    if state.shard is not None:
        from memprof.advisor.sharded_steps import run_sharded

        return run_sharded(workload, state)
    model = state.model
    training = state.optimizer_class is not None or state.make_optimizer is not None
    device = _device_type(model)
    one_step = SimStep.of(workload, state, device)
    with torch.no_grad(), (torch.autocast(device, dtype=state.autocast)
                           if state.autocast is not None else contextlib.nullcontext()):
        model.eval()
        cast = cast_batch(workload, state, one_step.batch)
        outputs = workload.outputs(model, cast).detach().float().clone()
        del cast
    model.train()
    optimizers = state.build_optimizers() if training else []
    first = next((o for o in optimizers if o is not None), None)
    last = None
    scaler = torch.amp.GradScaler(device) if state.grad_scaler and optimizers else None

    with session.profile(model, first, backend=backend) as prof:
        stepped = attempts = 0
        while stepped < workload.steps:
            attempts += 1
            scale = scaler.get_scale() if scaler is not None else 0.0
            # scaler.step skips the step when the scaled gradients overflowed
            loss = one_step(optimizers, scaler=scaler)
            if scaler is not None and scaler.get_scale() < scale \
                    and attempts < workload.steps + MAX_SKIPPED_STEPS:
                stepped -= 1  # skipped: not the steady state (no optimizer state yet)
            assert loss is not None
            last = float(loss.detach().float())
            del loss
            prof.step()
            stepped += 1
    profile = prof.profile
    durations = [float(d) for d in profile.steps()["duration_s"]]
    step_time = statistics.median(durations[1:] or durations)
    out_drift = loss_drift = None
    if reference is not None:
        out_drift = _rel(outputs, reference.outputs)
        if reference.final_loss is not None and last is not None and reference.final_loss != 0:
            loss_drift = abs(last - reference.final_loss) / abs(reference.final_loss)
    return Measurement(
        int(profile.peak().total_bytes), step_time, out_drift, loss_drift, last, profile, outputs
    )


def step_plans(workload: Workload, state: SimState) -> list[StagePlan]:
    """The workload's stages, each clearing its gradients as the change says
    (``free_gradients``) or as the stage does."""
    plans = workload.stage_plans()
    if state.free_gradients is None:
        return plans
    return [replace(plan, set_to_none=state.free_gradients) for plan in plans]


@dataclass(frozen=True)
class SimStep:
    """One step of ``workload`` on ``state``'s copies, as simulation and the fake runs take
    it: :func:`memprof.training_step.training_step` (or, with no optimizer, its forward alone)
    on a copy of the batch where the loop makes one (:func:`step_input`), each loss cast and
    wrapped as the change says, the stages clearing gradients as it says."""

    workload: Workload
    state: SimState
    batch: Any
    autocast: tuple[str, torch.dtype] | None
    plans: list[StagePlan]

    @classmethod
    def of(cls, workload: Workload, state: SimState, device: str) -> SimStep:
        """The step on ``device`` (the device type autocast is for)."""
        return cls(workload, state, step_batch(workload, state),
                   None if state.autocast is None else (device, state.autocast),
                   step_plans(workload, state))

    def prepare(self, loss_of: StepFn) -> StepFn:
        """``loss_of`` as the change runs it: the batch cast in the step
        (:func:`cast_in_step`), then the change's ``wrap_step``."""
        loss_of = cast_in_step(self.workload, self.state, loss_of)
        for wrap in self.state.wrap_step:
            loss_of = wrap(loss_of)
        return loss_of

    def __call__(
        self, optimizers: Sequence[torch.optim.Optimizer | None], *,
        scaler: torch.amp.GradScaler | None = None,
        around_backward: Callable[[], contextlib.AbstractContextManager[Any]] = (
            contextlib.nullcontext),
        step_optimizer: Callable[[torch.optim.Optimizer], None] | None = None,
    ) -> torch.Tensor | None:
        """Run the step with ``optimizers`` (from :meth:`SimState.build_optimizers`; none:
        inference); the hooks are :func:`~memprof.training_step.training_step`'s. Returns
        the last loss."""
        model = self.state.model
        held = step_input(self.workload, self.batch)
        if not optimizers:
            return forward_only(model, held, self.prepare(self.workload.loss), self.autocast)
        return training_step(model, held, self.plans, optimizers, autocast=self.autocast,
                             scaler=scaler, prepare_loss=self.prepare,
                             around_backward=around_backward, step_optimizer=step_optimizer)


def _device_type(model: nn.Module) -> str:
    for p in model.parameters():
        return p.device.type
    return "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor | None) -> float | None:
    if b is None or a.shape != b.shape:
        return None
    denom = float(b.norm())
    return float((a - b).norm()) / denom if denom else float((a - b).norm())


def baseline(workload: Workload) -> Measurement:
    """The unchanged workload, measured the way every change is."""
    return run(workload, copy_state(workload))


def simulate(
    workload: Workload,
    applies: list[Callable[[SimState], None]],
    reference: Measurement,
    *,
    batch: Any = None,
) -> Measurement:
    """Apply ``applies`` in order to fresh copies and measure the steps."""
    state = copy_state(workload, batch=batch)
    for apply in applies:
        apply(state)
    return run(workload, state, reference=reference)


@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Same random state for every run (dropout masks), restored afterwards."""
    saved = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(saved)
