"""Predict a change's peak by running it on fake tensors: the model's own code, nothing allocated.

For each change, :func:`fake_state` builds a copy of the workload whose parameters, buffers and
batch are fake (:class:`torch._subclasses.fake_tensor.FakeTensorMode`): the module tree is
deep-copied with every parameter and buffer replaced *before* the copy by a fake tensor made
from its metadata (so no real weight is copied and tied weights stay tied). The change's own
``apply`` edits that copy as it edits a simulation's, and :func:`fake_peak` runs the workload's
step (forward under the change's autocast, backward, optimizer step, ``zero_grad``) for
:data:`FAKE_STEPS` steps under memprof's profiler, whose dispatch ledger works on fake tensors
and charges the real CPU kernels' scratch (:mod:`memprof.tracking.kernel_corrections`).

What a fake run cannot do raises :class:`FakeRunError` with the reason, and the advisor keeps the
analytic prediction for that row: sharded runs (several processes), code that reads tensor
values (``.item()`` in the model, data-dependent shapes).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from memprof.advisor.workload import SimState, StepFn, Workload, cast_floats

#: Steps per fake run: the second has the optimizer state the first creates.
FAKE_STEPS = 2


class FakeRunError(RuntimeError):
    """A change that cannot be predicted by a fake run (the message says why)."""


def fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    # real constants the model keeps outside its parameters and buffers (a cached mask, a
    # table) are lifted to fake ones when an op meets them
    return FakeTensorMode(allow_non_fake_inputs=True)


def fake_state(workload: Workload, mode: Any) -> SimState:
    """A :class:`SimState` like :func:`~memprof.advisor.workload.copy_state`'s, on fake tensors."""
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for tensor in _tensors_of(workload.model):
            if id(tensor) in memo:
                continue
            fake = mode.from_tensor(tensor)
            if isinstance(tensor, nn.Parameter):
                fake = nn.Parameter(fake, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = fake
    model = copy.deepcopy(workload.model, memo)
    groups: list[dict[str, Any]] = []
    opt_class = None
    defaults: dict[str, Any] = {}
    if workload.optimizer is not None:
        opt_class = type(workload.optimizer)
        defaults = copy.deepcopy(dict(workload.optimizer.defaults))
        for g in workload.optimizer.param_groups:
            hyper = {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
            hyper["params"] = [memo[id(p)] for p in g["params"] if id(p) in memo]
            groups.append(hyper)
    return SimState(model=model, batch=_fake_batch(mode, workload.batch),
                    optimizer_class=opt_class, param_groups=groups, defaults=defaults)


def _tensors_of(model: nn.Module) -> Iterator[torch.Tensor]:
    for module in model.modules():
        yield from (p for p in module._parameters.values() if p is not None)
        yield from (b for b in module._buffers.values() if b is not None)


def _fake_batch(mode: Any, batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return mode.from_tensor(batch)
    if isinstance(batch, dict):
        return {k: _fake_batch(mode, v) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_fake_batch(mode, v) for v in batch)
    return copy.deepcopy(batch)


def fake_peak(workload: Workload, applies: list[Any] | None = None) -> int:
    """The step peak of ``workload`` with ``applies`` (changes' ``apply``) run on fake copies."""
    from memprof.tracking.session import Profiler

    mode = _mode_of(workload.model) or fake_mode()
    try:
        with mode:
            state = fake_state(workload, mode)
            for apply in applies or []:
                apply(state)
            if state.shard is not None:
                raise FakeRunError("a sharded run needs several processes: not run on fake tensors")
            optimizer = _optimizer(state)
            with Profiler(state.model, optimizer, device_modelled="cpu") as prof:
                _steps(workload, state, optimizer, prof)
            return int(prof.profile.peak().total_bytes)
    except FakeRunError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise FakeRunError(f"the fake run failed: {type(exc).__name__}: {first}"[:300]) from exc


def _mode_of(model: nn.Module) -> Any:
    """The fake mode of a model already on fake tensors (a script's captured copy, see
    :mod:`memprof.advisor.capture`): its runs stay in it, as fake modes cannot mix."""
    for t in model.parameters():
        if is_fake(t):
            return t.fake_mode  # type: ignore[attr-defined]
    return None


def cast_floating(state: SimState, dtype: torch.dtype) -> None:
    """``state.model.to(dtype)`` for fake parameters, which cannot be swapped in place: new
    parameters (tied ones stay tied) and buffers, and the optimizer's groups pointed at them."""
    new: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for module in state.model.modules():
            for table in (module._parameters, module._buffers):
                for name, t in list(table.items()):
                    if t is None or not t.is_floating_point() or t.dtype == dtype:
                        continue
                    if id(t) not in new:
                        cast = t.detach().to(dtype)
                        if isinstance(t, nn.Parameter):
                            cast = nn.Parameter(cast, requires_grad=t.requires_grad)
                        new[id(t)] = cast
                    table[name] = new[id(t)]  # type: ignore[assignment]
    for group in state.param_groups:
        group["params"] = [new.get(id(p), p) for p in group["params"]]


def _optimizer(state: SimState) -> torch.optim.Optimizer | None:
    if state.optimizer_class is None and state.make_optimizer is None:
        return None
    return state.build_optimizer()


def _steps(workload: Workload, state: SimState, optimizer: torch.optim.Optimizer | None,
           prof: Any) -> None:
    """The step :func:`memprof.advisor.workload.run` profiles, without reading any value."""
    from memprof.estimate import _ScalarStandIns

    model = state.model
    batch = cast_floats(state.batch, state.cast_batch) if state.cast_batch else state.batch
    loss_of: StepFn = workload.loss
    for wrap in state.wrap_step:
        loss_of = wrap(loss_of)

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if state.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=state.autocast)

    model.train()
    scaler = torch.amp.GradScaler("cpu") if state.grad_scaler and optimizer else None
    for _ in range(FAKE_STEPS):
        if optimizer is None:
            with torch.no_grad(), autocast():
                loss = loss_of(model, batch)
        else:
            with autocast():
                loss = loss_of(model, batch)
            if scaler is None:
                loss.backward()
            else:  # scaler.step reads found_inf: unscale, then step as it would
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            with _ScalarStandIns():  # an optimizer reading a value (Adafactor) gets a stand-in
                optimizer.step()
            if scaler is not None:
                scaler.update()
            free = state.free_gradients
            optimizer.zero_grad(set_to_none=workload.set_to_none if free is None else free)
        del loss
        prof.step()


def is_fake_model(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are fake (a change is being predicted, not simulated)."""
    return any(is_fake(p) for p in model.parameters())


def is_fake(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a fake tensor: data-dependent transforms (pruning by magnitude,
    quantization scales) pick by a data-independent rule then, as only shapes matter."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)
