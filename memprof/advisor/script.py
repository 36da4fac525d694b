"""Simulation on an unchanged script: run it again with a change applied to its live model.

The script cannot be handed a copy, so each run starts from scratch (the caller's
``run_script`` executes it, as ``memprof run`` does) and the change is applied to the script's
own objects at the first moment they all exist: the first call of the root module (the first
module to run, which the profile names ``""``). Then

- the model is edited in place by the change's ``apply`` (checkpoint wrappers, quantized or
  narrower layers, ``model.to(bfloat16)``) through a :class:`~memprof.advisor.workload.SimState`
  that holds the live model;
- autocast wraps every call of the root module, and ``cast_batch`` casts its float inputs;
- when the change picks another optimizer, other parameters or fp32 master weights, a new
  optimizer is built and takes the place of the script's own (same object, new class and
  state), before its first step;
- when the change adds a GradScaler (autocast fp16), every scalar ``.backward()`` runs on the
  scaled loss and the optimizer's ``step()`` runs as ``scaler.step(optimizer)`` then
  ``scaler.update()`` (the optimizer must exist by the model's first call).

Each run is profiled like ``memprof run`` and stopped after ``steps`` training steps (the
script's remaining work is skipped). A training step ends at an optimizer step; in a script
that steps several optimizers (a GAN's D step then G step) at the last of them: the first run
learns how many there are (it runs on until the first optimizer steps again, then runs
again). Quality compares the root module's first output and the
last loss (the value ``.backward()`` was called on) with the unchanged run's.
"""

from __future__ import annotations

import contextlib
import gc
import io
import itertools
import random
import statistics
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils._python_dispatch import _disable_current_modes

from memprof.advisor.capture import ScriptCapture
from memprof.advisor.core import Change
from memprof.advisor.workload import (
    Measurement,
    SimState,
    _logits,
    _rel,
    cast_floats,
)
from memprof.errors import ScriptFailed

#: While the optimizer steps of a training step are not known and the script has made an
#: optimizer that has not stepped yet, the first run goes on, its profile complete, at most
#: this many optimizer steps beyond those it profiles, for that one to step: a WGAN steps its
#: critic 5 times per generator step, and stopping at the third critic step measured critic
#: steps alone as training steps.
CYCLE_LOOKAHEAD = 16

#: Called after each profiled optimizer step with the number of steps done.
Progress = Callable[[int], None]


class _Enough(BaseException):
    """Raised from the optimizer's post-step hook once the steps are measured: a
    BaseException, so the script's own ``except Exception`` does not swallow it."""


@dataclass
class _Observed:
    """What one run saw, besides its profile."""

    outputs: torch.Tensor | None = None
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    applied: bool = False
    error: str | None = None
    optimizer_steps: int = 0
    #: The optimizers stepped, in order, while the steps per training step are being learned.
    stepped: list[int] = field(default_factory=list)
    #: Optimizer steps per training step, once this run found them (see :func:`_cycle`).
    cycle: int | None = None


class ScriptSimulator:
    """Measures a script unchanged (:meth:`reference`) and with changes (:meth:`measure`).

    ``run_script()`` runs the script once in this process (raising what it raises);
    ``steps`` is the number of optimizer steps profiled per run (a script that never steps an
    optimizer runs to its end as one inference step).
    """

    def __init__(self, run_script: Callable[[], None], *, steps: int = 3, seed: int = 0) -> None:
        if steps < 1:
            raise ValueError("steps must be at least 1")
        self.run_script = run_script
        self.steps = steps
        self.seed = seed
        self.output_log = ""  # the script's stdout and stderr in the last run
        #: Optimizer steps per training step (a GAN's D step and G step: 2): learned by the
        #: first run, which, once a second optimizer steps, runs on until the first steps
        #: again and is then run again with whole steps (None: not known yet).
        self.cycle: int | None = None

    def reference(
        self, progress: Progress | None = None, *, capture: ScriptCapture | None = None
    ) -> Measurement:
        """The unchanged script, profiled the way every change is; ``capture`` (installed
        for this run) takes what fake runs need from it."""
        measured = self._run([], None, progress, capture)
        if isinstance(measured, str):
            raise ScriptFailed(measured)
        return measured

    def measure(
        self, changes: list[Change], reference: Measurement, progress: Progress | None = None
    ) -> Measurement | str:
        """The script with ``changes`` applied, or a one-line reason it could not run."""
        missing = [c.technique for c in changes if c.apply is None]
        if missing:
            return f"not simulated: {', '.join(missing)} cannot run here"
        return self._run(changes, reference, progress)

    # ------------------------------------------------------------------ one run
    def _run(
        self,
        changes: list[Change],
        reference: Measurement | None,
        progress: Progress | None,
        capture: ScriptCapture | None = None,
        backend: Literal["auto", "dispatch"] = "auto",
    ) -> Measurement | str:
        from memprof.tracking.session import MemoryLeakWarning, Profiler

        seen = _Observed()
        patcher = _Patcher(changes, seen)
        captured = io.StringIO()
        # The allocator's events (where the recorder runs), as memprof run and the
        # simulations on copies measure: the dispatch backend counts operator outputs only,
        # not the scratch a CPU kernel takes (a 16-bit convolution's oneDNN scratchpad or
        # columns: 1.5% to 7.3% of a small CNN's autocast step). An edit at the model's first
        # call that makes new weights (see _Patcher._pre) must stay out of the measurement,
        # which only a dispatch mode can be told: such a run is measured again that way.
        cycle = self.cycle or 1
        existing = _optimizers() if self.cycle is None else set()  # made before the script
        profiler = Profiler(step_on_optimizer=True, optimizer_steps_per_step=cycle,
                            max_steps=self.steps, backend=backend)
        stop_after = self.steps

        stepping = [0]  # optimizer steps running: ZeRO-1 steps its inner one inside its own

        def before_step(*_: Any) -> None:
            stepping[0] += 1

        def after_step(optimizer: torch.optim.Optimizer, *_: Any) -> None:
            stepping[0] = max(stepping[0] - 1, 0)
            if stepping[0]:
                return  # part of the optimizer step around it (as the profiler counts)
            if self.cycle is None:
                seen.cycle = _cycle(seen.stepped, optimizer)
                if seen.cycle is not None:
                    raise _Enough  # measured again with whole steps
                if len(set(seen.stepped)) > 1:
                    return  # a second optimizer: on until the first steps again
            seen.optimizer_steps += 1
            if seen.optimizer_steps % cycle:
                return  # another optimizer of the same training step
            seen.steps += 1
            if progress is not None:
                progress(seen.steps)
            if seen.steps >= stop_after:
                if (self.cycle is None and len(seen.stepped) < stop_after + CYCLE_LOOKAHEAD
                        and _unstepped_optimizer(existing, set(seen.stepped))):
                    return  # unprofiled now: on, for the other optimizer (WGAN's G) to step
                raise _Enough

        import warnings

        _seed(self.seed)
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stdout(captured))
            stack.enter_context(contextlib.redirect_stderr(captured))
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore", MemoryLeakWarning)
            stack.enter_context(_record_losses(seen, patcher))
            if capture is not None:
                stack.enter_context(capture)
            # The patcher's hooks run before the profiler's: a model edited at its first call
            # is registered by the profiler as edited (a bf16 weight is a parameter).
            stack.enter_context(patcher)
            try:
                with profiler:
                    # ... and the step counter after them: the profiler closes the step first.
                    hook = register_optimizer_step_post_hook(after_step)
                    stack.callback(hook.remove)
                    pre = register_optimizer_step_pre_hook(before_step)
                    stack.callback(pre.remove)
                    try:
                        self.run_script()
                    except SystemExit as exc:
                        if exc.code not in (None, 0):
                            seen.error = f"the script exited with {exc.code!r}"
                    finally:
                        if capture is not None:  # its trace closes inside the profiler's mode
                            capture.stop()
            except _Enough:
                pass
            except Exception as exc:
                seen.error = f"{type(exc).__name__}: {_first_line(exc)}"
        self.output_log = captured.getvalue()
        gc.collect()
        if seen.cycle is not None and seen.error is None and patcher.error is None:
            self.cycle = seen.cycle  # this run split its steps: again, with whole ones
            return self._run(changes, reference, progress, None, backend)
        if self.cycle is None and seen.error is None and seen.steps:
            self.cycle = 1
        if seen.error is None and patcher.error is not None:
            seen.error = patcher.error
        if seen.error is not None:
            return f"simulation failed: {seen.error}"
        if patcher.new_weights and profiler.backend != "dispatch":
            return self._run(changes, reference, progress, capture, backend="dispatch")
        if changes and not seen.applied:
            return "simulation failed: no module ran, so the change was never applied"
        profile = profiler.profile
        if profile.peak_info is None:
            return "simulation failed: no step was profiled"
        durations = [float(d) for d in profile.steps()["duration_s"]]
        step_time = statistics.median(durations[1:] or durations) if durations else 0.0
        final = seen.losses[-1] if seen.losses else None
        out_drift = loss_drift = None
        if reference is not None and seen.outputs is not None:
            out_drift = _rel(seen.outputs, reference.outputs)
        if reference is not None and final is not None and reference.final_loss:
            loss_drift = abs(final - reference.final_loss) / abs(reference.final_loss)
        return Measurement(
            int(profile.peak_info.total_bytes),
            step_time,
            out_drift,
            loss_drift,
            final,
            profile,
            seen.outputs,
        )


class _Patcher:
    """Applies changes to the script's root module at its first call, and undoes the global
    hooks on exit (the edited model dies with the script)."""

    def __init__(self, changes: list[Change], seen: _Observed) -> None:
        self.changes = changes
        self.seen = seen
        self.error: str | None = None
        self.root: weakref.ref[nn.Module] | None = None
        self.state: SimState | None = None
        self.autocast_stack: list[Any] = []
        self.pending_optimizer = False
        self.scaler: torch.amp.GradScaler | None = None
        self.new_weights = False  # the edit replaced a parameter's or buffer's storage
        self._handles: list[Any] = []

    def __enter__(self) -> _Patcher:
        reg = nn.modules.module
        self._handles = [
            reg.register_module_forward_pre_hook(self._pre),
            reg.register_module_forward_hook(self._post, always_call=True),
            register_optimizer_step_pre_hook(self._optimizer_pre),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        while self.autocast_stack:
            self.autocast_stack.pop().__exit__(None, None, None)

    # ------------------------------------------------------------------ hooks
    def _pre(self, module: nn.Module, args: Any) -> Any:
        if self.root is None:
            self.root = weakref.ref(module)
            # What the edit itself allocates (a weight being quantized) is no part of the
            # step: a dispatch mode does not see it (the events backend does: a run whose
            # edit made new weights is measured again by dispatch), and the storages that stay
            # (new weights) are tracked when the profiler registers the edited model right after.
            with _disable_current_modes():
                self._apply_changes(module)
        if module is not self._root():
            return None
        state = self.state
        if state is not None and state.autocast is not None:
            ctx = torch.autocast(_device_type(module), dtype=state.autocast)
            ctx.__enter__()
            self.autocast_stack.append(ctx)
        if state is not None and state.cast_batch is not None:
            return cast_floats(tuple(args), state.cast_batch)
        return None

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if module is not self._root():
            return
        if self.autocast_stack:
            self.autocast_stack.pop().__exit__(None, None, None)
        if self.seen.outputs is None:
            # memprof's copy (for the drift) is no part of the script's step: out of the
            # profiler's sight, or its measured peak holds the logits twice
            with _disable_current_modes(), contextlib.suppress(TypeError):
                self.seen.outputs = untracked_copy(_logits(output))

    def _optimizer_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.pending_optimizer:
            self.error = (
                "the change replaces the optimizer, but the script built it after the model's "
                "first forward, too late to swap it before its first step"
            )
            raise RuntimeError(self.error)

    def _root(self) -> nn.Module | None:
        return self.root() if self.root is not None else None

    # ------------------------------------------------------------------ the change
    def _apply_changes(self, model: nn.Module) -> None:
        if not self.changes:
            return
        optimizer = _optimizer_of(model)
        state = SimState(
            model=model,
            batch=None,
            optimizer_class=type(optimizer) if optimizer is not None else None,
            param_groups=[
                {**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])}
                for g in (optimizer.param_groups if optimizer is not None else [])
            ],
            defaults=dict(optimizer.defaults) if optimizer is not None else {},
        )
        before = [[id(p) for p in g["params"]] for g in state.param_groups]
        storages = _weight_storages(model)
        for change in self.changes:
            assert change.apply is not None
            try:
                change.apply(state)
            except KeyError as exc:  # a module path the first model called does not have
                raise RuntimeError(
                    f"the change edits layers ({exc}) of another model than the first one the "
                    "script calls (a GAN's second model), and a script's simulation edits that "
                    "first model only") from exc
        self.new_weights = _weight_storages(model) != storages
        if state.model is not model:
            raise RuntimeError("the change replaced the whole model: it cannot run in a script")
        if state.wrap_step:
            raise RuntimeError("the change rewrites the training step: it cannot run in a script")
        if state.shard is not None:
            raise RuntimeError(
                "the change shards the model over several processes: it cannot run in a script"
            )
        self.state = state
        self.seen.applied = True
        new_params = [[id(p) for p in g["params"]] for g in state.param_groups] != before
        if state.make_optimizer is not None or new_params or state.master_weights:
            if optimizer is None:
                self.pending_optimizer = True
            else:
                _take_place(optimizer, state.build_optimizer())
        if state.free_gradients:
            if optimizer is None:
                raise RuntimeError(
                    "the change frees the gradients after each optimizer step, but the script "
                    "built its optimizer after the model's first forward"
                )
            optimizer.register_step_post_hook(_set_gradients_to_none)
        if state.grad_scaler:
            if optimizer is None:
                raise RuntimeError(
                    "the change steps the optimizer through a GradScaler, but the script built "
                    "its optimizer after the model's first forward, too late to wrap its step"
                )
            self.scaler = torch.amp.GradScaler(_device_type(model))
            _step_through(optimizer, self.scaler)


def _weight_storages(model: nn.Module) -> set[int]:
    """The data pointers of the model's parameters and buffers."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return {t.untyped_storage().data_ptr() for t in tensors}


def untracked_copy(tensor: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of ``tensor``'s values in memory no profiled allocator hands out: a host
    copy of a GPU tensor, a numpy array for a CPU one (the events backend sees every block of
    torch's CPU allocator, a dispatch mode only what runs under it)."""
    import numpy

    values = tensor.detach()
    if values.device.type != "cpu":
        return values.cpu().float()
    if values.dtype == torch.bfloat16:  # no numpy bf16: its bits are an fp32's top half
        bits = values.view(torch.int16).numpy().view(numpy.uint16).astype(numpy.uint32)
        return torch.from_numpy((bits << 16).view(numpy.float32))
    return torch.from_numpy(values.numpy().astype(numpy.float32))


def _step_through(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Make the script's ``optimizer.step()`` run as ``scaler.step(optimizer)`` followed by
    ``scaler.update()``: the gradients unscaled in place, the step skipped when they overflowed.
    ``scaler.step`` calls ``optimizer.step`` back, which then runs the real step."""
    real = optimizer.step
    inside = False

    def step(*args: Any, **kwargs: Any) -> Any:
        nonlocal inside
        if inside:
            return real(*args, **kwargs)
        inside = True
        try:
            result = scaler.step(optimizer, *args, **kwargs)
        finally:
            inside = False
        scaler.update()
        return result

    optimizer.step = step  # type: ignore[method-assign]


def _optimizers() -> set[int]:
    """The ids of the optimizers alive in this process."""
    import warnings

    with warnings.catch_warnings():  # isinstance of a deprecated alias warns (reduce_op)
        warnings.simplefilter("ignore")
        return {id(o) for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer)}


def _unstepped_optimizer(existing: set[int], stepped: set[int]) -> bool:
    """Whether the script made an optimizer that has not stepped (not one of ``existing``,
    alive before it ran)."""
    return bool(_optimizers() - existing - stepped)


def _cycle(stepped: list[int], optimizer: torch.optim.Optimizer) -> int | None:
    """Record that ``optimizer`` stepped; once the first optimizer steps again after another
    one did, the optimizer steps of one training step (D, G, D: 2; D, D, G, D: 3), else None."""
    stepped.append(id(optimizer))
    first = stepped[0]
    if len(stepped) > 1 and stepped[-1] == first and any(o != first for o in stepped):
        return len(stepped) - 1
    return None


def _set_gradients_to_none(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """After the step: the script's own ``zero_grad(set_to_none=False)`` then finds None."""
    optimizer.zero_grad(set_to_none=True)


def _take_place(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Make the script's optimizer object behave as ``new`` (it has taken no step yet)."""
    old.__class__ = type(new)
    old.__dict__.clear()
    old.__dict__.update(new.__dict__)


def _optimizer_of(model: nn.Module) -> torch.optim.Optimizer | None:
    """The live optimizer that holds most of ``model``'s parameters, if one exists yet."""
    params = {id(p) for p in model.parameters()}
    if not params:
        return None
    best, best_count = None, 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.optim.Optimizer):  # type() skips proxies' __class__
            count = sum(id(p) in params for g in obj.param_groups for p in g["params"])
            if count > best_count:
                best, best_count = obj, count
    return best


def _device_type(module: nn.Module) -> str:
    for p in module.parameters():
        return p.device.type
    return "cpu"


@contextlib.contextmanager
def _record_losses(seen: _Observed, patcher: _Patcher | None = None) -> Iterator[None]:
    """Record the value of every scalar ``.backward()`` is called on (and, when the change
    adds a GradScaler, run the backward on the scaled loss)."""
    original = torch.Tensor.backward

    def backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.numel() == 1:
            seen.losses.append(float(self.detach().float()))
            if patcher is not None and patcher.scaler is not None:
                return original(patcher.scaler.scale(self), *args, **kwargs)
        return original(self, *args, **kwargs)

    torch.Tensor.backward = backward  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.backward = original  # type: ignore[method-assign]


def _seed(seed: int) -> None:
    """Every run starts from the same random state (a script that seeds itself overrides it)."""
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy

        numpy.random.seed(seed)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
