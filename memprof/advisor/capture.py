"""What a fake run needs from a script that runs unchanged: its model, optimizer, batch and loss.

:class:`ScriptCapture` is installed around a script's run (``memprof run``, or
``memprof advise SCRIPT.py``'s unchanged run) and keeps, without holding any of the script's
tensors:

- the **model**: the root module (the first module called) is deep-copied at its first call
  with every parameter, buffer and tensor attribute replaced by a fake tensor made from its
  metadata (nothing real is copied: fake tensors live on the meta device), in one
  :class:`~torch._subclasses.fake_tensor.FakeTensorMode` that every later fake run reuses;
- the **batch**: the root's first call's positional and keyword arguments, as fake tensors;
- the **optimizers**: at the first step (or the first backward, should that step never come),
  each one's class, defaults and param groups (over the fake copies of its parameters): every
  optimizer stepped after the first backward and before the model's next call (SparseAdam for
  sparse embeddings beside Adam) becomes one :class:`~memprof.advisor.workload.Stage`; an
  optimizer over parameters outside the model (a GAN's second model) is refused;
- the **loss**: the torch calls from the root's outputs to the first scalar ``.backward()``
  (recorded by a :class:`~torch.overrides.TorchFunctionMode` between the two moments and
  pruned to the calls the loss depends on), replayed on the fake run's outputs, each under the
  autocast the script had around it (a change's autocast stays on the model, as when the
  script itself is simulated). Outside tensors these calls read (the targets) are kept as
  shapes and dtypes only; at another batch (the batch rows) those that lead with the batch
  dimension are resized with the model's inputs (#24). What the script still holds after its
  backward (a ``logits`` variable) is held by the replay until its next step, as the script's
  variables are.

:meth:`ScriptCapture.workload` turns that into a :class:`~memprof.advisor.workload.Workload` for
:func:`memprof.advisor.advise` (``fake_model=``), or says why it cannot (the model was called
several times per optimizer step, the loss did not come from its outputs, ...).

Why a trace and not the script's code: the script's loop cannot be re-entered; its loss (a
criterion, a label shift, a scaling) costs memory that a default loss would not.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

from memprof.advisor.batch import batch_size
from memprof.advisor.workload import Stage, Workload
from memprof.errors import CaptureError, FakeRunError

if TYPE_CHECKING:
    from memprof.advisor.advice import Advice
    from memprof.profile import Profile


@dataclass(frozen=True)
class _Ref:
    """A tensor in a recorded op: ``kind`` "root" (the root's outputs, by leaf index),
    "op" (an earlier op's output) or "ext" (a tensor from outside, by index)."""

    kind: str
    index: int


@dataclass(frozen=True)
class _TensorMeta:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, t: torch.Tensor) -> _TensorMeta:
        return cls(tuple(t.shape), tuple(t.stride()), t.dtype, t.device)

    def make(self) -> torch.Tensor:
        """An empty tensor of this layout (under a fake mode: a fake one)."""
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)

    def at_batch(self, captured: int, size: int) -> _TensorMeta:
        """This tensor (taken at batch ``captured``) at batch ``size``: its leading dimension
        resized where it is the batch's, contiguous (raises :class:`FakeRunError` where the
        batch dimension cannot be told: a flattened batch, a batch in another dimension)."""
        if size == captured or not self.shape:
            return self
        if self.shape[0] == captured:
            shape = (size, *self.shape[1:])
            return _TensorMeta(shape, torch.empty(shape, device="meta").stride(), self.dtype,
                               self.device)
        flattened = captured > 1 and self.shape[0] % captured == 0
        if flattened or captured in self.shape[1:]:
            raise FakeRunError(
                f"the loss takes a tensor of shape {list(self.shape)} from outside the model "
                f"whose batch dimension cannot be told (the batch is {captured})")
        return self  # no batch dimension (a class weight)


@dataclass
class _Op:
    func: Any
    leaves: list[Any]  # args and kwargs flattened, tensors as _Ref
    spec: Any
    outputs: list[int | None]  # op slot per output leaf (None: not a tensor)
    autocast: torch.dtype | None  # the script's autocast around this call


class _LossTrace(TorchFunctionMode):
    """Records the torch calls from the root's outputs on (see the module docstring).

    At this level a call the script makes is seen even when it does nothing on this run
    (``logits.float()`` on fp32 logits returns them unchanged, but casts a change's bf16 ones),
    and a tensor is the very object the script holds."""

    def __init__(self, outputs: list[torch.Tensor | None], device: str) -> None:
        super().__init__()
        self.device = device
        self.slots: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.ops: list[_Op] = []
        self.externals: list[_TensorMeta] = []
        self.failed: str | None = None
        # each recorded tensor's storage, weakly: alive after the backward means the script
        # holds it in a variable (autograd has let go of what it saved)
        self.storages: dict[_Ref, weakref.ref[Any]] = {}
        for i, t in enumerate(outputs):
            if t is not None:
                self.slots[t] = _Ref("root", i)
                self._watch(_Ref("root", i), t)

    def _watch(self, ref: _Ref, t: torch.Tensor) -> None:
        with contextlib.suppress(TypeError, RuntimeError):
            self.storages[ref] = weakref.ref(t.untyped_storage())

    def held(self) -> list[_Ref]:
        """The recorded tensors whose storage is still alive (call it after the backward)."""
        return [ref for ref, storage in self.storages.items() if storage() is not None]

    def __torch_function__(  # type: ignore[no-untyped-def]
        self, func, types, args=(), kwargs=None
    ):
        out = func(*args, **(kwargs or {}))
        if self.failed is None:
            try:
                self._record(func, args, kwargs or {}, out)
            except Exception as exc:  # a capture problem must never reach the script
                self.failed = f"recording the loss failed: {type(exc).__name__}: {exc}"
        return out

    def _record(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        out_leaves = pytree.tree_leaves(out)
        if not any(isinstance(leaf, torch.Tensor) for leaf in out_leaves):
            return  # .item(), .shape, .data_ptr(): a constant for what follows
        if len(out_leaves) >= 1000:
            raise ValueError("a call with 1000 outputs or more")
        leaves, spec = pytree.tree_flatten((args, kwargs))
        refs: list[Any] = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                ref = self.slots.get(leaf)
                if ref is None:
                    ref = _Ref("ext", len(self.externals))
                    self.externals.append(_TensorMeta.of(leaf))
                    self.slots[leaf] = ref
                refs.append(ref)
            else:
                refs.append(leaf)
        index = len(self.ops)
        outputs: list[int | None] = []
        for j, leaf in enumerate(out_leaves):
            if isinstance(leaf, torch.Tensor):
                ref = _Ref("op", index * 1000 + j)
                self.slots[leaf] = ref  # the same object again (x.float(), x.add_()): its
                self._watch(ref, leaf)  # value is this call's from now on
                outputs.append(ref.index)
            else:
                outputs.append(None)
        self.ops.append(_Op(func, refs, spec, outputs, _autocast_dtype(self.device)))

    def loss_of(self, loss: torch.Tensor) -> Loss:
        """The pruned ops that compute ``loss`` (raises :class:`CaptureError`)."""
        if self.failed is not None:
            raise CaptureError(self.failed)
        ref = self.slots.get(loss)
        if ref is None:
            raise CaptureError("the loss was not computed from the model's outputs")
        needed = {ref}
        kept: list[_Op] = []
        for op in reversed(self.ops):
            if any(_Ref("op", o) in needed for o in op.outputs if o is not None):
                kept.append(op)
                needed.update(r for r in op.leaves if isinstance(r, _Ref))
        kept.reverse()
        used = sorted({r.index for op in kept for r in op.leaves
                       if isinstance(r, _Ref) and r.kind == "ext"})
        return Loss(kept, ref, {i: self.externals[i] for i in used})


@dataclass
class Loss:
    """The recorded loss: ops from the root's outputs (and outside tensors) to the loss."""

    ops: list[_Op]
    result: _Ref
    externals: dict[int, _TensorMeta]
    #: The outside tensors made so far, by index and shape (one per batch size).
    fakes: dict[tuple[int, tuple[int, ...]], torch.Tensor] = field(default_factory=dict)
    #: What the script still held after its backward (its ``logits`` variable, say), which
    #: lives on until the next step replaces it.
    held: list[_Ref] = field(default_factory=list)

    def replay(
        self, outputs: list[torch.Tensor | None], device: str, *,
        batch: tuple[int, int] | None = None,
    ) -> dict[_Ref, torch.Tensor]:
        """Every recorded tensor, recomputed from ``outputs`` (the loss is ``[self.result]``);
        ``batch`` (the captured batch size, this step's) resizes the outside tensors."""
        env: dict[_Ref, torch.Tensor] = {}
        for i, t in enumerate(outputs):
            if t is not None:
                env[_Ref("root", i)] = t
        for i, meta in self.externals.items():
            if batch is not None:
                meta = meta.at_batch(*batch)
            if (i, meta.shape) not in self.fakes:
                self.fakes[i, meta.shape] = meta.make()
            env[_Ref("ext", i)] = self.fakes[i, meta.shape]
        for op in self.ops:
            leaves = [env[x] if isinstance(x, _Ref) else x for x in op.leaves]
            args, kwargs = pytree.tree_unflatten(leaves, op.spec)
            # the script's own autocast, if any, else none (a change's stays on the model)
            with torch.autocast(device, dtype=op.autocast, enabled=op.autocast is not None):
                out_leaves = pytree.tree_leaves(op.func(*args, **kwargs))
            if len(out_leaves) != len(op.outputs):
                raise RuntimeError(f"{op.func} gave {len(out_leaves)} outputs, not "
                                   f"{len(op.outputs)}")
            for slot, leaf in zip(op.outputs, out_leaves, strict=True):
                if slot is not None:
                    env[_Ref("op", slot)] = leaf
        if self.result not in env:
            raise RuntimeError("the loss's inputs were not produced by the replay")
        return env


class ScriptCapture:
    """Hooks that take a fake-run :class:`Workload` from a script as it runs (see the module
    docstring). ``with capture:`` installs them; :meth:`stop` (call it inside the profiler's
    context, after the script) ends a loss trace still open; :meth:`workload` builds the
    result once the run is over."""

    def __init__(self) -> None:
        from memprof.advisor.fake_prediction import fake_mode

        self.mode = fake_mode()
        self.error: str | None = None
        self.model: nn.Module | None = None  # the fake copy
        self._root: Any = None  # weakref to the script's root module
        self._fakes: dict[int, torch.Tensor] = {}  # id(real parameter) -> its fake copy
        self.batch: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self.autocast: torch.dtype | None = None
        self.grad_enabled = True
        self.root_calls = 0  # before the first optimizer step
        #: Class, defaults and param groups of each optimizer stepped in the first step.
        self.optimizers: list[tuple[type, dict[str, Any], list[dict[str, Any]]]] = []
        self._step_over = False  # the model's call after the first step: no more optimizers
        self._stepped_ids: set[int] = set()  # ids of the optimizers the first step stepped
        self.loss: Loss | None = None
        self._trace: _LossTrace | None = None
        self._handles: list[Any] = []
        self._backward: Callable[..., Any] | None = None
        self._stepped = False
        self._traced = False
        self._trace_done: _LossTrace | None = None
        #: Whether the parameters had gradients when the second step's backward began (None:
        #: not seen); False with gradients kept between steps means the script frees them
        #: after its forward, which the fake step then does too.
        self.grads_at_backward: bool | None = None
        #: Whether the parameters had gradients when the second step's forward began (None:
        #: not seen): True when the script frees them after its forward, or never.
        self.grads_at_forward: bool | None = None

    def __enter__(self) -> ScriptCapture:
        reg = nn.modules.module
        self._handles = [
            reg.register_module_forward_pre_hook(self._pre),
            reg.register_module_forward_hook(self._post, always_call=True),
            register_optimizer_step_post_hook(self._optimizer_post),
        ]
        original = torch.Tensor.backward
        capture = self

        def backward(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            capture._on_backward(tensor)
            return original(tensor, *args, **kwargs)

        self._backward = original
        torch.Tensor.backward = backward  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._backward is not None:
            torch.Tensor.backward = self._backward  # type: ignore[method-assign]
            self._backward = None

    def stop(self) -> None:
        """End a loss trace still recording (the script never called ``.backward()``)."""
        trace, self._trace = self._trace, None
        if trace is None:
            return
        from torch.overrides import _get_current_function_mode_stack

        stack = _get_current_function_mode_stack()
        if stack and stack[-1] is trace:
            trace.__exit__(None, None, None)
        else:  # another mode went on top and stays: leave the stack to its owner
            self._fail("the loss trace could not be closed in order")

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason

    # ------------------------------------------------------------------ hooks
    def _pre(self, module: nn.Module, args: Any) -> None:
        root = self._root() if self._root is not None else None
        if self._stepped:
            if module is root:
                self._step_over = True
            if module is root and self.grads_at_forward is None:
                self.grads_at_forward = any(p.grad is not None for p in module.parameters())
                self._handles[0].remove()  # its work is done
            return
        if self._root is None:
            self._root = weakref.ref(module)
            kwargs = _call_kwargs()
            device = _device_of(module)
            if torch.is_autocast_enabled(device):
                self.autocast = torch.get_autocast_dtype(device)
            self.grad_enabled = torch.is_grad_enabled()
            try:
                with _disable_current_modes(), torch.no_grad():
                    self.model = self._fake_copy(module)
                    self.batch = self._fake_tree((tuple(args), dict(kwargs or {})))
            except Exception as exc:
                self._fail(f"the model could not be copied on fake tensors: "
                           f"{type(exc).__name__}: {_first_line(exc)}")
            root = module
        if module is root and not self._stepped:
            self.root_calls += 1

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._root is None or module is not self._root() or self.root_calls != 1:
            return
        if self._traced or self.error is not None or sys.exc_info()[1] is not None:
            return
        if not torch.is_grad_enabled():
            return  # inference: the fake run's step is the forward itself
        try:
            leaves = pytree.tree_leaves(output)
            tensors = [t if isinstance(t, torch.Tensor) else None for t in leaves]
            trace = _LossTrace(tensors, _device_of(module))
        except Exception as exc:
            self._fail(f"the model's outputs could not be read: {_first_line(exc)}")
            return
        trace.__enter__()
        self._trace = trace
        self._traced = True

    def _on_backward(self, tensor: torch.Tensor) -> None:
        if self._stepped and self.grads_at_backward is None and tensor.numel() == 1:
            # The second step's backward: a script that calls zero_grad between its forward
            # and its backward (gradients alive in the forward, gone in the backward)
            root = self._root() if self._root is not None else None
            if root is not None:
                self.grads_at_backward = any(p.grad is not None for p in root.parameters())
        trace = self._trace
        if trace is None or tensor.numel() != 1:
            return
        self.stop()
        self._trace_done = trace
        if self.error is None:
            try:
                self.loss = trace.loss_of(tensor)
            except CaptureError as exc:
                self._fail(str(exc))
        # The optimizer as it is before its first step, should that step never come (the
        # backward runs out of memory): the first step's own hook replaces it.
        from memprof.advisor.script import _optimizer_of

        root = self._root() if self._root is not None else None
        optimizer = _optimizer_of(root) if root is not None else None
        if optimizer is not None and not self._stepped:
            self.optimizers.clear()
            self._take_optimizer(optimizer)

    def _optimizer_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # After the step, not before: Lightning runs the forward and backward inside
        # optimizer.step(closure).
        self.stop()
        if self._root is None or self._step_over:
            return
        if self._stepped:  # another optimizer of the same step
            if id(optimizer) not in self._stepped_ids:
                self._stepped_ids.add(id(optimizer))
                self._take_optimizer(optimizer)
            return
        self._stepped = True
        self._stepped_ids = {id(optimizer)}
        self.optimizers.clear()  # the first backward's guess, now known
        # the forward hook's work is done; the pre-hook sees the next forward's gradients
        self._handles[1].remove()
        if self.loss is not None and self._trace_done is not None:
            self.loss.held = self._trace_done.held()
        self._trace_done = None
        self._take_optimizer(optimizer)

    def _take_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._fakes:
            return
        groups = []
        outside = 0
        for g in optimizer.param_groups:
            hyper = {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
            hyper["params"] = [self._fakes[id(p)] for p in g["params"] if id(p) in self._fakes]
            outside += len(g["params"]) - len(hyper["params"])
            groups.append(hyper)
        if not any(g["params"] for g in groups):
            self._fail(f"a {type(optimizer).__name__} optimizer steps parameters outside the "
                       "first module called (a second model, as a GAN's discriminator): a fake "
                       "run copies that module only")
            return
        if outside:
            self._fail(f"the optimizer steps {outside} parameter(s) outside the first module "
                       "called, which a fake run would leave out")
        self.optimizers.append(
            (type(optimizer), copy.deepcopy(dict(optimizer.defaults)), groups))

    # ------------------------------------------------------------------ copies
    def _fake_copy(self, module: nn.Module) -> nn.Module:
        memo: dict[int, Any] = {}
        for sub in module.modules():
            # the copy runs no one's hooks (a profiler's per-module hooks would drag the
            # profiler itself, and all it holds, into the copy)
            for name, value in vars(sub).items():
                if name.endswith(("_hooks", "_hooks_with_kwargs", "_hooks_always_called")) \
                        and isinstance(value, dict):
                    memo[id(value)] = type(value)()
            tables = (sub._parameters, sub._buffers,
                      {k: v for k, v in vars(sub).items() if isinstance(v, torch.Tensor)})
            for table in tables:
                for t in table.values():
                    if t is None or id(t) in memo:
                        continue
                    fake = self.mode.from_tensor(t)
                    if isinstance(t, nn.Parameter):
                        fake = nn.Parameter(fake, requires_grad=t.requires_grad)
                        self._fakes[id(t)] = fake
                    memo[id(t)] = fake
        return copy.deepcopy(module, memo)

    def _fake_tree(self, tree: Any) -> Any:
        return pytree.tree_map(
            lambda x: self.mode.from_tensor(x) if isinstance(x, torch.Tensor) else copy.copy(x),
            tree,
        )

    def release(self) -> None:
        """Drop the fake copies (and, through the model's class, the script's globals)."""
        self.model = None
        self.batch = None
        self.loss = None
        self.optimizers = []
        self._fakes.clear()
        self._trace_done = None
        self._fail("released")

    # ------------------------------------------------------------------ the result
    def workload(self) -> Workload:
        """The captured run as a Workload of fake tensors (raises :class:`CaptureError`)."""
        if self.error is not None:
            raise CaptureError(self.error)
        if self.model is None or self.batch is None:
            raise CaptureError("no module ran")
        if self.root_calls > 1:
            raise CaptureError(
                f"the script called its model {self.root_calls} times before its first "
                "optimizer step (gradient accumulation?): a fake run models one call per step")
        optimizers = []
        from memprof.advisor.workload import accepted_options

        for cls, defaults, groups in self.optimizers:
            try:
                with self.mode:
                    optimizers.append(cls(groups, **accepted_options(cls, defaults)))
            except Exception as exc:
                raise CaptureError(f"the optimizer could not be rebuilt on fake tensors: "
                                   f"{type(exc).__name__}: {_first_line(exc)}") from None
        if not optimizers and (self._stepped or self.loss is not None):
            raise CaptureError("the optimizer steps none of the model's parameters")
        if optimizers and self.loss is None:
            raise CaptureError("no scalar .backward() followed the model's first call")
        # gradients alive in the next forward (a script that zeroes them after its forward,
        # or in place): kept between the fake steps too, and freed where the script frees them
        alive = self.grads_at_forward is True
        step = _ReplayStep(self.loss, self.autocast,
                           free_grads=alive and self.grads_at_backward is False,
                           batch_size=batch_size(self.batch))
        if len(optimizers) > 1:  # one backward, then each optimizer's step
            return Workload(self.model, None, self.batch, batch_in_step=True, stages=[
                Stage(optimizers, step.stage_loss, set_to_none=not alive)])
        return Workload(self.model, optimizers[0] if optimizers else None, self.batch,
                        step_fn=step, set_to_none=not alive, batch_in_step=True)


class _ReplayStep:
    """The step a fake run repeats: the root's call on the batch (under the script's own
    autocast, if it had one), then the recorded loss with autocast off (as the script computed
    it, outside the model)."""

    def __init__(self, loss: Loss | None, autocast: torch.dtype | None, *,
                 free_grads: bool = False, batch_size: int | None = None) -> None:
        self.loss = loss
        self.autocast = autocast
        self.batch_size = batch_size  # the captured batch's (its outside tensors are at it)
        self.free_grads = free_grads  # zero_grad(set_to_none=True) after the loss, as the script
        # what the script's variables held from the last step, as the script holds it: its
        # outputs until the next forward returns, the rest until the next loss is computed
        self._model: weakref.ref[nn.Module] | None = None
        self._held_outputs: list[torch.Tensor] = []
        self._held: list[torch.Tensor] = []

    def forget(self) -> None:
        """End a fake run: let go of what the script's variables held from its last step."""
        self._model, self._held_outputs, self._held = None, [], []

    def stage_loss(self, model: nn.Module, batch: Any, carry: dict[str, Any]) -> torch.Tensor:
        """The step as a :class:`~memprof.advisor.workload.Stage`'s loss."""
        return self(model, batch)

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if self._model is None or self._model() is not model:  # a new fake run
            self._model = weakref.ref(model)
            self._held_outputs, self._held = [], []
        args, kwargs = batch
        device = _device_of(model)
        ctx = (torch.autocast(device, dtype=self.autocast) if self.autocast is not None
               else contextlib.nullcontext())
        with ctx:
            out = model(*args, **kwargs)
        leaves = pytree.tree_leaves(out)
        tensors = [t if isinstance(t, torch.Tensor) else None for t in leaves]
        if self.loss is None:  # inference
            return next(t for t in tensors if t is not None)
        held = set(self.loss.held)
        self._held_outputs = [t for i, t in enumerate(tensors)
                              if t is not None and _Ref("root", i) in held]
        size = batch_size(batch) if self.batch_size is not None else None
        env = self.loss.replay(tensors, device, batch=(
            None if size is None or self.batch_size is None else (self.batch_size, size)))
        self._held = [t for ref, t in env.items() if ref in held and ref.kind == "op"]
        if self.free_grads:
            for p in model.parameters():
                p.grad = None
        return env[self.loss.result]


def predict(
    profile: Profile,
    capture: ScriptCapture | None,
    *,
    budget: str | int | None,
    simulator: Any = None,
    reference: Any = None,
) -> Advice:
    """The advice for a script's ``profile``: by fake runs of what ``capture`` took from it
    (analytic when ``capture`` is None, or with the reason when it took nothing usable), with
    the time the fake runs took in ``fake_prediction_s`` and the reason in
    ``fake_prediction_skipped``. ``memprof run``, ``memprof advise SCRIPT.py`` and the
    Trainer/Lightning callbacks use it."""
    import time
    import warnings

    from memprof.advisor import advise

    workload = None
    skipped = None if capture is not None else "turned off"
    if capture is not None:
        try:
            workload = capture.workload()
        except CaptureError as exc:
            skipped = str(exc)
    started = time.perf_counter()
    with warnings.catch_warnings():
        # memprof's ledger reads fake storages' (null) pointers on purpose
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        advice = advise(profile, budget=budget, simulator=None if workload else simulator,
                        reference=reference, fake_model=workload,
                        prediction="fake" if workload else "analytic")
    if workload is not None:
        advice.extra["fake_prediction_s"] = round(time.perf_counter() - started, 3)
        if advice.extra.get("fake_baseline_peak_bytes") is None:
            skipped = "the unchanged step failed on fake tensors"
        if simulator is not None:
            # The fake copy's class keeps the script's globals (its real model and optimizer
            # state) alive: let them go before the script runs again with each change, then
            # measure with the predictions made (as a saved profile carries them).
            del workload
            assert capture is not None
            capture.release()
            gc.collect()
            advice = _measured(profile, advice, budget=budget, simulator=simulator,
                               reference=reference)
    if skipped is not None:
        advice.extra["fake_prediction_skipped"] = skipped
    return advice


def _measured(profile: Profile, predicted: Advice, **options: Any) -> Advice:
    """``predicted`` (fake runs) again, each row measured by ``options["simulator"]``."""
    import dataclasses

    from memprof.advisor import advise
    from memprof.advisor.advice import row_key

    data = predicted.to_dict()
    advice = advise(dataclasses.replace(profile, advice=data), **options)
    advice.extra.pop("fake_prediction_stored", None)
    for key in ("fake_baseline_peak_bytes", "fake_prediction_s"):
        advice.extra[key] = data.get(key)
    caveats = {row_key(r["technique"], r["options"]): r.get("caveats")
               for r in predicted.rows if r.get("predicted_by") == "analytic"}
    for i, row in enumerate(advice.rows):  # why a fake run could not predict a row
        why = caveats.get(row_key(row.technique, row.options or {}))
        if why and why not in (row.caveats or ""):
            advice.rows[i] = dataclasses.replace(row, caveats=why)
    return advice


def _call_kwargs() -> dict[str, Any]:
    """The keyword arguments of the module call in progress: global forward pre-hooks see only
    the positional ones, so they are read from ``Module._call_impl``'s frame."""
    frame = sys._getframe(1)
    for _ in range(4):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            break
        if frame.f_code.co_name == "_call_impl" and isinstance(frame.f_locals.get("kwargs"),
                                                                 dict):
            return dict(frame.f_locals["kwargs"])
    return {}


def _autocast_dtype(device: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _device_of(module: nn.Module) -> str:
    for p in module.parameters():
        return p.device.type
    return "cpu"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
