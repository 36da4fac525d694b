"""Predict a change's peak by running it on fake tensors: the model's own code, nothing allocated.

For each change, :func:`fake_state` builds a copy of the workload whose parameters, buffers and
batch are fake (:class:`torch._subclasses.fake_tensor.FakeTensorMode`): the module tree is
deep-copied with every parameter and buffer replaced *before* the copy by a fake tensor made
from its metadata (so no real weight is copied and tied weights stay tied). The change's own
``apply`` edits that copy as it edits a simulation's, and :func:`fake_peak` runs the workload's
step (forward under the change's autocast, backward, optimizer step, ``zero_grad``) for
:data:`FAKE_STEPS` steps under memprof's profiler, whose dispatch ledger works on fake tensors
and charges the real CPU kernels' scratch (:mod:`memprof.tracking.kernel_corrections`).

One profiled step, not two, where the optimizer state can be made without one (every fake op
costs about 0.15 ms in FakeTensor's dispatch; the forward and backward are most of a step's
ops): before the profiler starts, :func:`_warm_optimizer` gives every trained parameter a zero
gradient and steps the optimizer once (its state now exists, as after a first step; torch's
optimizers step with foreach then, which makes the same state in fewer ops), then drops the
gradients; the profiled step is the run's second. A torch Adam or AdamW, and memprof's
AdamW8bit, are given that state directly (:func:`_direct_state`), with no gradient and no step
(fp32 master weights are not warmed: their gradients come in a step pre-hook). That holds only
when every trained
parameter gets a gradient (a parameter the loss never reaches gets no state in a real run), so
the profiled backward is checked, and a run where one did not, or whose gradients are kept
between steps (``zero_grad(set_to_none=False)``), is run again the old way: two profiled steps.

The rows that change the optimizer alone (a class, ZeRO-1) share one forward and backward,
the unchanged run's (:func:`fake_peaks`): each row's peak is composed from it and the row's own
optimizer step, the same bytes as its own run.

What a fake run cannot do raises :class:`FakeRunError` with the reason, and the advisor keeps the
analytic prediction for that row: code that reads tensor values (``.item()`` in the model,
data-dependent shapes). A sharded change runs as rank 0 of a fake process group
(:mod:`memprof.advisor.sharded_steps`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from memprof import fake_kernels
from memprof.advisor import sharded_steps
from memprof.advisor.workload import SimState, SimStep, Workload, copy_optimizers, step_plans
from memprof.errors import FakeRunError, KernelNotMeasured, first_line

#: Profiled steps of a fake run whose optimizer state cannot be made by a warm-up (see
#: :func:`_warm_optimizer`): the second has the optimizer state the first creates.
FAKE_STEPS = 2


#: Skip the profiled optimizer step's updates in place of tracked tensors (see
#: :func:`_tracked_updates_mode`); False runs every op (the tests compare the two).
SKIP_TRACKED_UPDATES = True


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
            if isinstance(tensor, nn.Parameter) and (
                    fake is tensor or not isinstance(fake, nn.Parameter)
                    or fake.requires_grad != tensor.requires_grad):
                # (from_tensor gives a new parameter a fake one already, without the
                # detach that a wrap costs: one fake op per parameter per run)
                fake = nn.Parameter(fake, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = fake
    model = copy.deepcopy(workload.model, memo)
    state = SimState(model=model, batch=_fake_batch(mode, workload.batch),
                     optimizer_class=None, param_groups=[])
    copy_optimizers(workload, memo, state)
    return state


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


def fake_peak(workload: Workload, applies: list[Any] | None = None, *, round_to: int = 1,
              device: str = "cpu") -> int:
    """The step peak of ``workload`` with ``applies`` (changes' ``apply``) run on fake copies.

    ``round_to`` and ``device`` are the profiler's (a ``memprof estimate`` of a CUDA step
    charges 512-byte blocks and models ``cuda``), so the run compares with the profile."""
    mode = _mode_of(workload.model) or fake_mode()
    try:
        with mode, contextlib.ExitStack() as ranks:
            ranks.callback(forget_last_step, workload)
            ranks.enter_context(fake_kernels.active())  # kernels fake mode lacks for the CPU
            state = fake_state(workload, mode)
            for apply in applies or []:
                apply(state)
            if state.shard is not None:  # rank 0 of a fake process group (advisor.sharded_steps)
                mesh = ranks.enter_context(sharded_steps.one_rank(state.ranks))
                sharded_steps.shard(state, mesh)
            one_step = _warm_optimizer(workload, state)
            if one_step is not None:
                optimizer, warm = one_step
                with _profiler(state, optimizer, round_to, device) as prof:
                    missed = _steps(workload, state, [optimizer] if optimizer else [], prof,
                                    steps=1, warm=warm)
                if not missed:
                    return int(prof.profile.peak().total_bytes)
                state = fake_state(workload, mode)  # the warm-up's state is not the real one's
                for apply in applies or []:
                    apply(state)
                if state.shard is not None:
                    sharded_steps.shard(state, mesh)
            optimizers = _optimizers(state)
            stepped = next((o for o in optimizers if o is not None), None)
            with _profiler(state, stepped, round_to, device) as prof:
                _steps(workload, state, optimizers, prof, steps=FAKE_STEPS)
            return int(prof.profile.peak().total_bytes)
    except (FakeRunError, KernelNotMeasured):  # the second: see memprof.advisor.parallel
        raise
    except Exception as exc:
        first = first_line(exc)
        raise FakeRunError(f"the fake run failed: {type(exc).__name__}: {first}"[:300]) from exc


def fake_peaks(workload: Workload, rows: list[list[Any]], *, round_to: int = 1,
               device: str = "cpu") -> tuple[int, list[int | None]]:
    """The unchanged step's peak (:func:`fake_peak` of ``workload``) and, per row (a change's
    ``apply`` list), its :func:`fake_peak`, where the row changes the optimizer alone (see
    :func:`_optimizer_only`); None for a row to run alone.

    Those rows share one forward and backward, the unchanged run's: neither reads the
    optimizer, whose state only adds its bytes to every moment of them. So a row's peak is
    the larger of the shared forward and backward's peak plus its state's bytes, and of its
    own optimizer step's peak, that step run on the shared backward's gradients with its state
    made there as its own run makes it before profiling (:func:`_warm_optimizer`), the profiler
    paused. The same bytes as each row's own run (tested); a row that cannot be composed so
    (its state needs two profiled steps, or its step left bytes behind) is run alone."""
    results: list[int | None] = [None] * len(rows)
    try:
        shared = _shared_backward(workload, rows, results, round_to, device)
    except (FakeRunError, KernelNotMeasured):
        raise
    except Exception:  # the rows' own runs will say what fails
        shared = None
    if shared is None:
        return fake_peak(workload, round_to=round_to, device=device), [None] * len(rows)
    return shared, results


def optimizer_only_rows(workload: Workload, rows: list[list[Any]]) -> list[int]:
    """The indices of ``rows`` that :func:`fake_peaks` may compose from a shared backward: the
    changes of optimizer alone (:func:`_optimizer_only`), tried on one fake copy of the state
    (nothing is run); none where the step cannot share one (:func:`_one_stage`)."""
    if not _one_stage(workload):
        return []
    try:
        mode = _mode_of(workload.model) or fake_mode()
        with mode:
            base = fake_state(workload, mode)
            if base.optimizer_class is None and base.make_optimizer is None:
                return []
            return [i for i, applies in enumerate(rows) if _optimizer_only(base, applies)]
    except Exception:  # each row's own run will say what fails
        return []


def _one_stage(workload: Workload) -> bool:
    """Whether the step is one backward and one optimizer's step, then zero_grad."""
    plans = workload.stage_plans()
    return len(plans) == 1 and plans[0].zero_grad == "after" and plans[0].optimizers == (0,)


#: SimState fields a change of optimizer alone may set (see :func:`_optimizer_only`).
_OPTIMIZER_FIELDS = frozenset({"optimizer_class", "defaults", "make_optimizer",
                               "wrap_optimizer", "param_groups", "notes", "shard", "ranks"})


class _Untouchable:
    """The model and batch of a probe state: a change that reads them is not a change of
    optimizer alone (any attribute raises)."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"a probe state has no model or batch ({name})")


def _optimizer_only(base: SimState, applies: list[Any]) -> bool:
    """Whether ``applies`` change the optimizer alone: run on a probe copy of ``base`` whose
    model and batch cannot be read, they set no field but the optimizer's (class, maker,
    hyperparameters; ZeRO-1, which :func:`memprof.advisor.sharded_steps.shard` makes a wrapper
    of the optimizer), keep every group's parameters, and freeze or unfreeze none."""
    import dataclasses

    probe = _row_state(base, model=_Untouchable(), batch=_Untouchable())
    trained = [(p, p.requires_grad) for g in base.param_groups for p in g["params"]]
    try:
        for apply in applies:
            apply(probe)
    except Exception:  # it reads the model or the batch
        return False
    for f in dataclasses.fields(SimState):
        if f.name in _OPTIMIZER_FIELDS or f.name in ("model", "batch"):
            continue
        if getattr(probe, f.name) != getattr(base, f.name):
            return False
    if not isinstance(probe.model, _Untouchable) or not isinstance(probe.batch, _Untouchable):
        return False
    if probe.shard not in (None, "zero1"):
        return False
    if len(probe.param_groups) != len(base.param_groups) or any(
            len(a["params"]) != len(b["params"])
            or any(x is not y for x, y in zip(a["params"], b["params"], strict=True))
            for a, b in zip(probe.param_groups, base.param_groups, strict=True)):
        return False
    return all(p.requires_grad == flag for p, flag in trained)


def _row_state(base: SimState, **fields: Any) -> SimState:
    """A copy of ``base`` for one change to edit: its own groups, defaults and lists; the
    model and batch ``base``'s (or ``fields``')."""
    import dataclasses

    return dataclasses.replace(
        base, param_groups=[dict(g, params=list(g["params"])) for g in base.param_groups],
        defaults=dict(base.defaults), notes=list(base.notes), wrap_step=list(base.wrap_step),
        more_optimizers=list(base.more_optimizers), **fields)


class _SharedStep:
    """Stands for the optimizer in the shared run's step
    (:func:`~memprof.training_step.training_step`): its step is every row's (see
    :func:`_shared_backward`); zero_grad leaves the gradients to the next row."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        del set_to_none


def _shared_backward(workload: Workload, rows: list[list[Any]], results: list[int | None],
                     round_to: int, device: str) -> int | None:
    """:func:`fake_peaks`' run: the unchanged peak, ``results`` filled for the rows composed;
    None where nothing can be shared (the caller runs :func:`fake_peak`)."""
    if not _one_stage(workload):
        return None
    mode = _mode_of(workload.model) or fake_mode()
    with mode, contextlib.ExitStack() as stack:
        stack.callback(forget_last_step, workload)
        stack.enter_context(fake_kernels.active())
        base = fake_state(workload, mode)
        if base.optimizer_class is None and base.make_optimizer is None:
            return None
        shared = [i for i, applies in enumerate(rows) if _optimizer_only(base, applies)]
        reference: list[int | None] = [None]
        from memprof.estimate.grad_accumulation import grad_sums_in_place

        with _profiler(base, None, round_to, device) as prof:

            def steps(_: Any) -> None:
                fb_peak, start = prof.ledger.peak.total, prof.ledger.total
                for index in [-1, *shared]:
                    if prof.ledger.total != start:  # a row left bytes: the rest run alone
                        break
                    try:
                        peak = _row_step(workload, base, rows[index] if index >= 0 else [],
                                         prof, fb_peak)
                    except Exception:  # its own run will say why (the next rows run alone
                        peak = None    # if this one left bytes behind)
                    if index < 0:
                        reference[0] = peak
                        if peak is None:
                            break
                    else:
                        results[index] = peak

            base.model.train()
            loss = SimStep.of(workload, base, "cpu")(
                [_SharedStep()],  # type: ignore[list-item]
                around_backward=lambda: grad_sums_in_place(prof.innermost_ledger_mode()),
                step_optimizer=steps)  # as _steps'
            del loss
            prof.step()
    if reference[0] is None:
        results[:] = [None] * len(rows)
    return reference[0]


def _row_step(workload: Workload, base: SimState, applies: list[Any], prof: Any,
              fb_peak: int) -> int | None:
    """One row's peak after the shared backward (see :func:`fake_peaks`), or None where it
    cannot be composed. The row's optimizer and process group are made and dropped with the
    profiler paused; the caller checks that the ledger's live bytes are back where they were."""
    with contextlib.ExitStack() as ranks:
        made = _row_optimizer(workload, base, applies, prof, ranks)
        if made is None:
            return None
        optimizer, warm = made
        if any(p.grad is None for p in warm):  # its own run would be made again: two steps
            return None
        ledger = prof.ledger
        before = ledger.total
        prof.track_optimizer_state(optimizer)
        state_bytes = ledger.total - before
        replaced = ledger.restart_peak()
        try:
            with _tracked_updates(prof) if SKIP_TRACKED_UPDATES else _scalar_stand_ins():
                optimizer.step()
            step_peak = ledger.peak.total
        finally:
            ledger.peak = replaced
            paused = prof.pause()
            try:
                del optimizer, made
                if ledger.total != before:
                    import gc

                    gc.collect()  # an optimizer in a reference cycle keeps its state
                ranks.close()
            finally:
                if paused:
                    prof.resume()
    return max(fb_peak + state_bytes, step_peak)


def _row_optimizer(workload: Workload, base: SimState, applies: list[Any], prof: Any,
                   ranks: contextlib.ExitStack) -> tuple[torch.optim.Optimizer, list[Any]] | None:
    """The row's optimizer with its state made as :func:`fake_peak` makes it before profiling
    (the profiler paused; the shared gradients put aside meanwhile) and the parameters it
    warmed; None where the row's own run would not be one warmed step."""
    if not prof.pause():
        return None
    made = None
    try:
        row = _row_state(base)
        for apply in applies:
            apply(row)
        if row.shard is not None:  # ZeRO-1 (see _optimizer_only): wraps the optimizer
            sharded_steps.shard(row, ranks.enter_context(sharded_steps.one_rank(row.ranks)))
        params = list(row.model.parameters())
        params += [p for g in row.param_groups for p in g["params"]]
        grads = {id(p): (p, p.grad) for p in params}
        for p, _ in grads.values():
            p.grad = None
        try:
            made = _warm_optimizer(workload, row)
        finally:
            for p, grad in grads.values():
                p.grad = grad
    finally:
        if made is None or made[0] is None:
            ranks.close()
        prof.resume()
    if made is None or made[0] is None:
        return None
    return made[0], made[1]


def _scalar_stand_ins() -> Any:
    from memprof.fake_scalars import ScalarStandIns

    return ScalarStandIns()


def _profiler(state: SimState, optimizer: torch.optim.Optimizer | None, round_to: int,
              device: str) -> Any:
    """The fake run's profiler. Only its peak is read, so the caching allocator's replay (the
    reserved bytes, which no fake run's row reports) is not made."""
    from memprof.tracking.session import Profiler

    return Profiler(state.model, optimizer, round_to=round_to, device_modelled=device,
                    model_reserved=False)


def forget_last_step(workload: Workload) -> None:
    """Drop what the workload's step function keeps of its last call (a script's replayed
    step holds the script's variables, and with them that step's graph and gradients): the
    next fake run must not start with this one's tensors alive, or free them while it is
    profiled."""
    losses = [workload.step_fn, *(stage.loss for stage in workload.stages or [])]
    for loss in losses:
        forget = getattr(getattr(loss, "__self__", loss), "forget", None)
        if callable(forget):
            forget()


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


def _optimizers(state: SimState) -> list[torch.optim.Optimizer | None]:
    if state.optimizer_class is None and state.make_optimizer is None:
        return []
    return state.build_optimizers()


def _warm_optimizer(
    workload: Workload, state: SimState
) -> tuple[torch.optim.Optimizer | None, list[torch.Tensor]] | None:
    """The optimizer with its state made by one step on zero gradients (see the module
    docstring), and the parameters it stepped; None where one profiled step cannot stand for
    the run's second (gradients kept between steps, or several optimizers: the profiler is
    given the state of one made before it starts)."""
    if state.optimizer_class is None and state.make_optimizer is None:
        return None, []
    plans = step_plans(workload, state)
    if state.more_optimizers or not all(plan.set_to_none and plan.zero_grad == "after"
                                        for plan in plans):
        return None
    if state.master_weights:
        # fp32 masters get their gradients in a step pre-hook, after the check that every
        # warmed parameter got one: the one-step run would always be made again (and a
        # state made without the step misses a master-sized buffer the real step keeps)
        return None
    optimizer = state.build_optimizer()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if _direct_state(optimizer):
        return optimizer, params
    with torch.no_grad():
        for p in params:
            p.grad = torch.zeros_like(p)
    # torch's optimizers make the same state in their foreach and per-tensor implementations
    # (``_init_group``); foreach steps every tensor in a dozen ops instead of a dozen per tensor
    switched = [g for g in optimizer.param_groups
                if "foreach" in g and not g["foreach"] and not g.get("fused")]
    saved = [g["foreach"] for g in switched]
    for g in switched:
        g["foreach"] = True
    try:
        with _state_only():
            optimizer.step()
    except Exception:  # an optimizer that cannot step on zeros: two profiled steps will tell
        return None
    finally:
        for g, value in zip(switched, saved, strict=True):
            g["foreach"] = value
        optimizer.zero_grad(set_to_none=True)
    return optimizer, params


#: torch optimizers whose first step's state :func:`_direct_state` makes without a step (and
#: memprof's AdamW8bit).
_DIRECT_STATE = (torch.optim.Adam, torch.optim.AdamW)


def _direct_state(optimizer: torch.optim.Optimizer) -> bool:
    """Give a torch Adam or AdamW the state its first step makes for every trained parameter
    (``_init_group``: a step count, then zeroed moments like the parameter), in the same order,
    without a step: no gradients to make, no fake op but the state's own. False, touching
    nothing, for any other optimizer (or a fused or differentiable Adam): the warm-up step
    makes its state."""
    from torch.optim.optimizer import _get_scalar_dtype

    from memprof.advisor.optimizer import AdamW8bit, lowbit_layout

    if type(optimizer) is AdamW8bit:  # memprof's own: its step makes lowbit_layout's state
        with torch.no_grad():
            for p in (p for g in optimizer.param_groups for p in g["params"]):
                if p.requires_grad and not optimizer.state[p]:
                    optimizer.state[p].update(lowbit_layout(p))
        return True
    if type(optimizer) not in _DIRECT_STATE or any(
            g.get("fused") or g.get("differentiable") for g in optimizer.param_groups):
        return False
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    new = _NewFakeTensors.for_params(params) or _NewTensors()
    with torch.no_grad(), new:
        for group in optimizer.param_groups:
            moments = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
            for p in group["params"]:
                if not p.requires_grad or optimizer.state[p]:
                    continue
                state = optimizer.state[p]
                # (``_init_group``'s ``torch.tensor(0.0)`` and ``zeros_like``: the same
                # tensors, made with fewer fake ops; their values are never read, the
                # profiled step's ``.item()`` gets a stand-in, memprof.fake_scalars)
                state["step"] = new.scalar(_get_scalar_dtype(),
                                           p.device if group["capturable"] else _CPU)
                for name in moments:
                    state[name] = new.like(p)
    return True


_CPU = torch.device("cpu")


class _NewTensors(contextlib.AbstractContextManager[None]):
    """The optimizer state's new tensors, made by torch's factories (any parameter)."""

    def __exit__(self, *exc: object) -> None:
        return None

    def scalar(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.zeros((), dtype=dtype, device=device)

    def like(self, p: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(p, memory_format=torch.preserve_format)


class _NewFakeTensors(_NewTensors):
    """The same tensors for fake parameters, made as FakeTensorMode makes a factory's output
    (a meta tensor of the layout, wrapped as a fake one on the device) without the trip
    through the dispatch modes and FakeTensor's cache: on GPT-2 small's unchanged fake run
    its AdamW state's 444 tensors were 14% of the run's fake ops. Entered, the dispatch modes
    are set aside (the meta tensors are made by ATen alone; no profiler is seeing ops here)."""

    def __init__(self, mode: Any) -> None:
        self.mode = mode
        self.modes = contextlib.ExitStack()

    @classmethod
    def for_params(cls, params: list[torch.Tensor]) -> _NewFakeTensors | None:
        """One for ``params`` when they are all plain fake tensors of one mode, laid out
        densely (``empty_like`` then keeps their strides); else None."""
        from torch._prims_common import is_non_overlapping_and_dense_or_false
        from torch._subclasses.fake_tensor import FakeTensor

        modes = {id(p.fake_mode) for p in params if type(p) is FakeTensor}
        if not params or len(modes) != 1 or not all(
                type(p) is FakeTensor and is_non_overlapping_and_dense_or_false(p)
                for p in params):
            return None
        return cls(params[0].fake_mode)  # type: ignore[attr-defined]

    def __enter__(self) -> None:
        from torch.utils._python_dispatch import _disable_current_modes

        self.modes.enter_context(_disable_current_modes())

    def __exit__(self, *exc: object) -> None:
        self.modes.close()

    def scalar(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self._wrap(torch.empty((), dtype=dtype, device="meta"), device)

    def like(self, p: torch.Tensor) -> torch.Tensor:
        meta = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="meta")
        return self._wrap(meta, p.device)

    def _wrap(self, meta: torch.Tensor, device: torch.device) -> torch.Tensor:
        converter = self.mode.fake_tensor_converter
        return converter.from_meta_and_device(self.mode, meta, device)


def _state_only_mode() -> type:
    from memprof.fake_scalars import ScalarStandIns

    class StateOnly(ScalarStandIns):
        """The warm-up's step on fake tensors: values are never read, so an update in place
        that keeps its tensors' shapes (a pointwise ``add_``, a ``_foreach_*_`` op) is skipped.
        The optimizer state the step makes (``zeros_like`` in ``_init_group``, a step count)
        is made as before; skipping its updates saves most of the warm-up's fake ops (each
        ``_foreach_*`` one runs its fake kernel once per parameter)."""

        def __torch_dispatch__(  # type: ignore[no-untyped-def]
            self, func, types, args=(), kwargs=None
        ):
            skip = _SKIPPED.get(func)
            if skip is None:
                skip = _SKIPPED[func] = _skippable(func)
            if skip == 1:  # a _foreach_*_ op: returns nothing
                return None
            if skip == 2:  # a pointwise update of its first argument: returns it
                return args[0]
            return super().__torch_dispatch__(func, types, args, kwargs)

    return StateOnly


#: Per op: 0 run it, 1 skip it and return None, 2 skip it and return its first argument.
_SKIPPED: dict[Any, int] = {}


def _skippable(func: Any) -> int:
    name = func.overloadpacket.__name__
    schema = func._schema
    if not (name.endswith("_") and not name.endswith("__") and schema.is_mutable):
        return 0
    if name.startswith("_foreach_") and not schema.returns:
        return 1
    if torch.Tag.pointwise in func.tags and len(schema.returns) == 1 and schema.arguments \
            and schema.arguments[0].alias_info is not None \
            and schema.arguments[0].alias_info.is_write:
        return 2
    return 0


def _tracked_updates_mode() -> type:
    from memprof.fake_scalars import ScalarStandIns
    from memprof.tracking.kernel_corrections import corrects
    from memprof.tracking.ledger import storage_tensor

    class TrackedUpdatesSkipped(ScalarStandIns):
        """The profiled optimizer step on fake tensors: an update in place of tensors whose
        storages the ledger already tracks (a pointwise ``mul_``, ``addcdiv_``, a
        ``_foreach_*_`` op) allocates nothing and changes no shape, and the ledger would only
        be shown a storage it knows (a no-op), so it is skipped: the bytes are the same, and
        FakeTensor runs no fake kernel for it (a ``_foreach_*`` op runs one per tensor). An op
        whose kernel memory the ledger corrects, or that updates a tensor the ledger has not
        seen (it would start tracking it), is run."""

        def __init__(self, ledger: Any) -> None:
            super().__init__()
            # the events backend keys storages by address (fake runs use the dispatch one)
            self.entries = {} if ledger.by_ptr else ledger.entries

        def __torch_dispatch__(  # type: ignore[no-untyped-def]
            self, func, types, args=(), kwargs=None
        ):
            skip = _SKIPPED.get(func)
            if skip is None:
                skip = _SKIPPED[func] = _skippable(func)
            if skip and args and not corrects(func, args) and self._tracked(args[0]):
                return None if skip == 1 else args[0]
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _tracked(self, updated: Any) -> bool:
            tensors = updated if isinstance(updated, list | tuple) else [updated]
            try:
                return all(isinstance(t, torch.Tensor)
                           and id(storage_tensor(t).untyped_storage()) in self.entries
                           for t in tensors)
            except (NotImplementedError, RuntimeError):  # no storage to look up: run it
                return False

    return TrackedUpdatesSkipped


def _tracked_updates(prof: Any) -> Any:
    """A new mode for the profiled optimizer step (its class is made on first use)."""
    global _TRACKED_UPDATES
    if _TRACKED_UPDATES is None:
        _TRACKED_UPDATES = _tracked_updates_mode()
    return _TRACKED_UPDATES(prof.ledger)


_TRACKED_UPDATES: type | None = None


def _state_only() -> Any:
    """A new warm-up mode (its class is made on first use: memprof.estimate loads late)."""
    global _STATE_ONLY
    if _STATE_ONLY is None:
        _STATE_ONLY = _state_only_mode()
    return _STATE_ONLY()


_STATE_ONLY: type | None = None


def _steps(workload: Workload, state: SimState,
           optimizers: list[torch.optim.Optimizer | None], prof: Any, *, steps: int,
           warm: list[torch.Tensor] | None = None) -> bool:
    """The step :func:`memprof.advisor.workload.run` profiles, without reading any value;
    ``steps`` times. Returns whether a parameter of ``warm`` (given state by the warm-up) got
    no gradient in the backward: then the warm-up made state a real run does not."""
    from memprof.estimate.grad_accumulation import grad_sums_in_place
    from memprof.fake_scalars import ScalarStandIns

    one_step = SimStep.of(workload, state, "cpu")
    state.model.train()
    scaler = torch.amp.GradScaler("cpu") if state.grad_scaler and optimizers else None
    missed = False
    warm_ids = {id(p) for p in warm or []}
    if scaler is not None and warm is not None:
        # a first step would have made the scaler's scale and growth tracker: so does this
        # (update() then leaves them as they are; sizes are what matter here)
        scaler.scale(torch.zeros(()))

    def step(optimizer: torch.optim.Optimizer) -> None:
        nonlocal missed
        if scaler is not None:  # scaler.step reads found_inf: unscale, then step as it would
            scaler.unscale_(optimizer)
        if warm_ids and any(p.grad is None for g in optimizer.param_groups for p in g["params"]
                            if id(p) in warm_ids):
            missed = True
        # an optimizer reading a value (Adafactor) gets a stand-in; its updates in place of
        # tensors the ledger tracks are skipped (they allocate nothing)
        with _tracked_updates(prof) if SKIP_TRACKED_UPDATES else ScalarStandIns():
            optimizer.step()

    for _ in range(steps):
        # autograd sums a tensor's gradients in place where a real run would (it never does
        # for fake tensors: one buffer too many, a Mamba's scan +5.7%)
        loss = one_step(optimizers, scaler=scaler, step_optimizer=step,
                        around_backward=lambda: grad_sums_in_place(prof.innermost_ledger_mode()))
        del loss
        prof.step()
    return missed


def is_fake_model(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are fake (a change is being predicted, not simulated)."""
    return any(is_fake(p) for p in model.parameters())


def is_fake(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a fake tensor: data-dependent transforms (pruning by magnitude,
    quantization scales) pick by a data-independent rule then, as only shapes matter."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)
