"""``memprof.profile``: the context manager that wraps a training loop.

It installs, for its lifetime only:

* a ``TorchDispatchMode`` that shows every operator output to the storage ledger (this also
  works under ``FakeTensorMode``, where nothing is allocated);
* global module forward hooks (the module stack) and, per call, a pre-hook on the output's
  ``grad_fn`` (the module whose backward is running; in C++ with memprof's recorder);
* ``saved_tensors_hooks`` whose pack hook marks what autograd saves as activations;
* ``post_accumulate_grad`` hooks on parameters (gradients) and global optimizer step hooks
  (the optimizer phase and its persistent state);
* a global module registration hook (which DDP modules are built inside the profile: the
  buckets of the others are entered from their reducer's report, see
  :class:`~memprof.tracking.distributed.BucketsBefore`).

Everything is removed on exit, also when the body raises; the partial profile stays usable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd.function import BackwardCFunction
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils._pytree import tree_flatten

from memprof import oom as oom_report
from memprof.categories import PHASES
from memprof.errors import ProfileActiveError
from memprof.tracking import kernel_corrections, native
from memprof.tracking.compiled import (
    COMPILED_AUTOGRAD_WARNING,
    CompiledOwners,
    compile_loaded,
    compiled_autograd_on,
    compiled_inner,
    is_compiled,
)
from memprof.tracking.events import EventStream, RecorderSource
from memprof.tracking.leak import LEAK_MIN_BYTES as LEAK_MIN_BYTES  # re-exported (#28)
from memprof.tracking.leak import LEAK_MIN_GROWTHS as LEAK_MIN_GROWTHS
from memprof.tracking.leak import MemoryLeakWarning as MemoryLeakWarning
from memprof.tracking.ledger import (
    ACTIVATION,
    BACKWARD,
    FORWARD,
    FRAME_BACKWARD,
    FRAME_FORWARD,
    FRAME_RECOMPUTE,
    GRADIENT,
    INPUT,
    OPTIMIZER,
    OPTIMIZER_STATE,
    OTHER,
    OTHER_PHASE,
    OUTSIDE,
    RAW_DTYPE,
    TEMPORARY,
    Entry,
    Facts,
    StorageLedger,
    facts_of,
    keep_out_of_dynamo,
)
from memprof.tracking.ledger_mode import LedgerMode
from memprof.tracking.modules import ModuleRegistry, module_geometry
from memprof.tracking.oom_watch import OomWatch
from memprof.tracking.op_trace import OpTraces
from memprof.tracking.optimizer_state import OptimizerStates
from memprof.tracking.records import StepRecords, build_profile, device_info, module_name
from memprof.tracking.reserved import ReservedModel
from memprof.tracking.results import ProfileResults
from memprof.tracking.schedule import StepAction, every_step
from memprof.tracking.source import SourceSampler, user_source
from memprof.tracking.thread_state import (
    in_accumulate_grad,
    leave_for_collectives,
    process_group_running,
)

_graph_task_id = torch._C._current_graph_task_id
#: Whether torch.compile is tracing this call. The hooks then leave nothing in the graph (no
#: graph break either): the compiled region's memory goes to the module that called it. (The
#: function itself, which dynamo answers True while tracing: no wrapper frame per module call.)
_compiling = torch.compiler.is_compiling
_STRIDED = torch.strided
#: The autograd sequence counter: inside a pack hook, the number of the node being made, plus 1.
_sequence_nr = torch._C._autograd._get_sequence_nr

#: What ``backend="auto"`` picks for real tensors (fake tensors always use "dispatch"); None:
#: "events" where memprof's C++ recorder can be built (it is what makes that backend cheap:
#: see :mod:`memprof.tracking.native`), else "dispatch".
AUTO_BACKEND: Literal["events", "dispatch"] | None = None
#: The events backend reads (and replays) its events every this many steps...
EVENTS_FLUSH_STEPS = 32
#: ...or sooner, once this many wait (24 bytes each in the recorder's buffer).
EVENTS_FLUSH_PENDING = 1 << 19

Backend = Literal["auto", "events", "dispatch"]


class Profiler(ProfileResults):
    """The live profiling session returned by :func:`memprof.profile`.

    Call :meth:`step` at the end of each training step. After the ``with`` block, the tables
    and the peak are available directly (``prof.modules()``, ``prof.peak()``, ...), or as a
    :class:`~memprof.profile.Profile` from :attr:`profile`.
    """

    _active: Profiler | None = None

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        schedule: Callable[[int], StepAction] | None = None,
        timeline_points: int = 256,
        top_tensors: int = 20,
        round_to: int = 1,
        step_on_optimizer: bool = False,
        optimizer_steps_per_step: int = 1,
        max_steps: int | None = None,
        device_modelled: str | None = None,
        backend: Backend = "auto",
        allocator_conf: str | None = None,
        model_reserved: bool = True,
        source_lines_above: int | None = None,
        record_ops: bool = False,
    ) -> None:
        if backend not in ("auto", "events", "dispatch"):
            raise ValueError(f"backend must be 'auto', 'events' or 'dispatch', not {backend!r}")
        self._backend_choice = backend
        self._model = model
        self._optimizer = optimizer
        self._schedule = schedule or every_step
        self._timeline_points = timeline_points
        self._top_tensors = top_tensors
        self._round_to = round_to
        self._step_on_optimizer = step_on_optimizer
        #: With ``step_on_optimizer``: every this many optimizer steps end a step (a GAN's
        #: D and G steps are one training step).
        self._optimizer_steps_per_step = max(1, optimizer_steps_per_step)
        self._optimizer_steps = 0
        #: The optimizers whose step is running, outermost first: ZeRO-1's
        #: ZeroRedundancyOptimizer steps its own inner optimizer inside its step.
        self._stepping: list[torch.optim.Optimizer] = []
        self._max_steps = max_steps
        self._device_modelled = device_modelled
        #: The caching allocator's options to replay with (None: this process's
        #: PYTORCH_CUDA_ALLOC_CONF); ``model_reserved=False`` turns the replay off.
        self._allocator_conf = allocator_conf
        self._model_reserved = model_reserved
        #: Also record the source line of every storage above this many bytes (None: only the
        #: candidates for the largest at the peak).
        self._source_lines_above = source_lines_above
        #: Record the operator trace of the first two active steps (see
        #: :mod:`memprof.tracking.op_trace`; never under fake tensors).
        self._record_ops = record_ops
        self._result = None
        self._entered = False

    # ------------------------------------------------------------- lifecycle
    def __enter__(self) -> Profiler:
        if Profiler._active is not None:
            raise ProfileActiveError(
                "memprof.profile is already active: nested profiles are not supported "
                "(close the outer one first)"
            )
        if self._entered:
            raise ProfileActiveError("this memprof.profile was already used; create a new one")
        self._entered = True
        Profiler._active = self
        self._fake = _fake_mode_active()
        backend = self._backend_choice
        if backend == "auto":
            backend = _auto_backend() if not self._fake else "dispatch"
        if backend == "events" and self._fake:
            Profiler._active = None
            raise ValueError("the events backend needs real tensors: under FakeTensorMode "
                             "nothing is allocated (use backend='dispatch' or 'auto')")
        #: The measurement backend in use: "events" or "dispatch".
        self.backend = backend
        self.ledger = StorageLedger(round_all_to=self._round_to, by_ptr=backend == "events")
        self._reserved: ReservedModel | None = None
        self._warnings: list[str] = []
        if self._model_reserved:
            self._reserved, problem = ReservedModel.create(self._allocator_conf)
            if problem:
                self._warnings.append(problem)
            if self._reserved is not None:
                # (the C++ NativeModel where it builds: the same interface and figures)
                self.ledger.allocator = self._reserved.model  # type: ignore[assignment]
        self._sources = SourceSampler(self._top_tensors, self._source_lines_above)
        self.ledger.sources = self._sources
        self.ledger.source_floor = self._sources.floor
        self._events: EventStream | None = None
        if backend == "events":
            self._events = EventStream(self.ledger, self._alloc_phase, self._on_backward_node,
                                       on_module_backward=self._backward_enter_apply,
                                       next_phase=self._next_alloc_phase)
        #: memprof's recorder marks the modules' backward starts itself, from C++ hooks
        self._recorder = (self._events.source
                          if self._events is not None
                          and isinstance(self._events.source, RecorderSource) else None)
        #: The recorder's C++ watch_backward, called directly per module call (None: a
        #: Python grad_fn pre-hook marks the module's backward start)
        self._watch_backward = (self._recorder.module.watch_backward
                                if self._recorder is not None else None)
        self._live_recording = False
        self._live_stack: list[tuple[int, Any, int]] = []  # (module index, token, id(module))
        #: Compiled modules (by index), and the saved tensors' facts packed while one of them
        #: runs, held back until its forward ends tells whose code made each (events backend).
        self._compiled_modules: set[int] = set()
        self._compiled_packs: list[tuple[Facts, int, str, int]] = []
        self._compiled_attributed = 0  # saved tensors given their source module
        self._compiled_seen = 0  # id of the last compiled forward's output node read
        self._live_active = 0
        self._applied_step = 0
        self._replay_bwd = False
        self._since_flush = 0
        self.registry = ModuleRegistry(self.ledger)
        self._corrections = (
            kernel_corrections.for_profile()
            if self._fake and self._device_modelled != "cuda" and self._round_to == 1 else None
        )
        self._mode = LedgerMode(self.ledger, self._corrections)
        self._mode_entered = False
        self._op_traces = OpTraces(self._record_ops and not self._fake, self._trace_parameters,
                                   self._trace_module)
        self._handles: list[Any] = []
        self._grad_fn_handles: list[Any] = []
        self._forward_started: list[float] = []
        self._records = StepRecords(self._name, timeline_points=self._timeline_points,
                                    top_tensors=self._top_tensors)
        self._optimizer_states = OptimizerStates()
        self._inputs_seen: list[dict[str, Any]] = []
        self._step = 0
        self._forwards_in_step = 0
        self._active_steps = 0
        self._step_start_live: dict[int, Entry] = {}
        self._step_start_bytes = 0
        self._step_started = 0.0
        self._in_backward = False
        from memprof.tracking.distributed import BucketsBefore, EngineWatch

        self._engines = EngineWatch()  # DDP/FSDP2 modules, read at each step
        self._buckets = BucketsBefore()  # DDP's buckets made before the profile
        self._buckets_scanned = 0  # registered modules looked at for them
        #: Whether collectives can run (a real process group exists): read at each step and
        #: where modules are registered (a DDP module's first forward: its group exists)
        self._collectives = process_group_running() and not self._fake
        self._oom = OomWatch(self.ledger, self._name)
        oom_report.attach_cuda_observer()
        oom_report.take_cuda_oom()  # forget failures from before this profile
        try:
            self._install()
            self._begin_step()
            if self._events is not None:
                self._events.prior.watch(self._prior_tensors())
                self.registry.defer = self._events.buffer
                self._events.start()
                if self._recorder is not None:
                    self._recorder.on_backward_end(self._on_backward_end)
                    self._recorder.set_live(self._live_recording)
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if self._events is not None:
                self._events.flush(restart=False)
            oom_error = oom_report.oom_in_chain(exc)
            if oom_error is not None and self._oom.seen != id(oom_error):
                # Failed outside a forward (backward, optimizer): the replayed stack is where.
                self._oom.snapshot(self._name(self.ledger.current_module),
                                   PHASES[self.ledger.phase])
            # Under step_on_optimizer, what runs after the last optimizer step (zero_grad, the
            # script's last lines) is no step of its own unless a forward ran in it.
            trailing = self._step_on_optimizer and self._step > 0 and not self._forwards_in_step
            if self.ledger.logging and self.ledger.log and not trailing:
                self._end_step(partial=exc_type is not None, device=_device_stats())
            self._op_traces.stop(self._step)
            self._build(interrupted=exc_type is not None)
            assert self._result is not None
            self._result.warnings.extend(self._engines.warnings())
            if oom_error is not None and self._oom.where is not None:
                self._result.oom = self._oom.build(oom_error, self._result, self._applied_step)
        finally:
            self._teardown()

    def _install(self) -> None:
        ledger = self.ledger
        self._handles.append(
            nn.modules.module.register_module_module_registration_hook(self._buckets.note_built)
        )
        self.registry.grad_sink = self._on_grad  # (before the model's parameters get hooks)
        if self._model is not None:
            self.registry.register_tree(self._model, "", None)
            self._ddp_buckets()
        if self._optimizer is not None:
            self._track_state(self._optimizer_state(self._optimizer))
        self._handles.append(
            nn.modules.module.register_module_forward_pre_hook(self._on_forward_pre)
        )
        self._handles.append(
            nn.modules.module.register_module_forward_hook(self._on_forward, always_call=True)
        )
        if self._model is not None:  # global pre-hooks never see keyword arguments
            self._handles.append(
                self._model.register_forward_pre_hook(self._on_root_kwargs, with_kwargs=True)
            )
        self._handles.append(register_optimizer_step_pre_hook(self._on_optimizer_pre))
        self._handles.append(register_optimizer_step_post_hook(self._on_optimizer_post))
        #: The pack hook as pushed (a bound method is a new object at each access): the one
        #: the hooks stack holds (:func:`memprof.tracking.thread_state.leave_for_collectives`).
        self._pack_hook = self._pack
        self._saved_hooks: Any = torch.autograd.graph.saved_tensors_hooks(self._pack_hook,
                                                                          _unpack)
        self._saved_hooks.__enter__()
        self._compiled = CompiledOwners()
        if self._events is not None and compile_loaded():  # dispatch: nothing is compiled
            self._compiled.install()  # else at the first compiled module, if any
        del ledger

    def _prior_tensors(self) -> list[Any]:
        """The tensors tracked at the start whose frees no CPU allocation event will report:
        the model's parameters, their gradients and buffers, the optimizer's state."""
        tensors: list[Any] = []
        if self._model is not None:
            for param in self._model.parameters():
                tensors += [param, param.grad]
            tensors += self._model.buffers()
        if self._optimizer is not None:
            for group in self._optimizer.param_groups:
                for param in group["params"]:
                    tensors += [param, param.grad]
            for values in self._optimizer.state.values():
                tensors += values.values()
        return tensors

    def _teardown(self) -> None:
        traces = getattr(self, "_op_traces", None)
        if traces is not None:
            traces.stop(None)
        self._model = self._optimizer = None  # the profile must not keep them alive
        self._set_mode(False)
        events = getattr(self, "_events", None)
        if events is not None:
            events.stop()
            events.clear()
        compiled = getattr(self, "_compiled", None)
        if compiled is not None:
            compiled.remove()
        saved = getattr(self, "_saved_hooks", None)
        if saved is not None:
            saved.__exit__(None, None, None)
            self._saved_hooks = None
        for handle in self._handles + self._grad_fn_handles:
            handle.remove()
        self._handles.clear()
        self._grad_fn_handles.clear()
        if hasattr(self, "registry"):
            self.registry.remove_hooks()
        if hasattr(self, "ledger"):
            self.ledger.recording = self.ledger.logging = False
            self.ledger.clear()
        if Profiler._active is self:
            Profiler._active = None

    def _set_mode(self, on: bool) -> None:
        """Enter or leave the dispatch mode (only while it is the innermost mode)."""
        if self._events is not None:
            return
        if on and not self._mode_entered:
            self._mode.__enter__()
            self._mode_entered = True
        elif not on and self._mode_entered and _get_current_dispatch_mode() is self._mode:
            self._mode.__exit__(None, None, None)
            self._mode_entered = False
            # else: another mode sits above ours; the ledger's flags make ours a pass-through.

    # ------------------------------------------------------------------ steps
    def step(self) -> None:
        """Mark the end of a training step (call it once per iteration, like torch.profiler)."""
        if Profiler._active is not self:
            raise RuntimeError("prof.step() called outside its `with memprof.profile(...)` block")
        device = _device_stats() if self._live_recording else None
        self._collectives = process_group_running() and not self._fake
        if self._live_recording:
            self._watch_engines()
            self._ddp_buckets()  # (a DDP module that died: its buckets went with it)
        oom_report.attach_cuda_observer()  # once CUDA is initialised; then a flag check
        self._step += 1
        self._forwards_in_step = 0
        # Keep the handles of grad_fn hooks only while their graph lives (to remove them at
        # exit): the list would otherwise grow by one per module call for the whole run.
        self._grad_fn_handles = [h for h in self._grad_fn_handles
                                 if h.hooks_dict_ref() is not None]
        action = self._next_action()
        events = self._events
        if events is None:
            self._step_apply(device, self._step, action)
            return
        for facts, module, source, node in self._compiled_packs:  # a compiled forward cut short
            events.buffer(self._pack_apply, facts, module, source, node)
        self._compiled_packs.clear()
        events.point(self._step_apply, device, self._step, action)
        self._since_flush += 1
        waiting = events.source.pending()
        if self._since_flush >= EVENTS_FLUSH_STEPS or waiting > EVENTS_FLUSH_PENDING:
            self._since_flush = 0
            events.flush(restart=True)

    def _next_action(self) -> StepAction:
        """The schedule's action for the step starting now (decided live, applied later)."""
        action = self._schedule(self._step)
        if self._max_steps is not None and self._live_active >= self._max_steps:
            action = StepAction.SKIP
        if action is StepAction.ACTIVE:
            self._live_active += 1
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.reset_peak_memory_stats()
        self._live_recording = action is not StepAction.SKIP
        if self._recorder is not None:
            self._recorder.set_live(self._live_recording)
        self._op_traces.stop(self._step - 1)
        self._set_mode(self._live_recording)
        if action is StepAction.ACTIVE:
            self._op_traces.start()
        return action

    def _step_apply(self, device: tuple[int, int] | None, step: int, action: StepAction) -> None:
        self._replay_bwd = False
        self.ledger.rotate_node_sources()
        if self.ledger.recording:
            self._end_step(partial=False, device=device)
        self._applied_step = step
        self._begin_step_apply(action)

    def _begin_step(self) -> None:
        self._begin_step_apply(self._next_action())

    def _begin_step_apply(self, action: StepAction) -> None:
        ledger = self.ledger
        ledger.recording = action is not StepAction.SKIP
        ledger.logging = action is StepAction.ACTIVE
        if ledger.logging:
            self._step_started = ledger.clock()
            self._step_start_live = ledger.begin_step()
            self._step_start_bytes = ledger.total

    def _end_step(self, *, partial: bool, device: tuple[int, int] | None) -> None:
        ledger = self.ledger
        if ledger.logging:
            self._active_steps += 1
            self._record_step(partial=partial, device=device)
        # Temporaries that outlive their step hold memory with no role: call them "other".
        for entry in list(ledger.entries.values()):
            if entry.category == TEMPORARY:
                ledger.reclassify(entry, OTHER, entry.module)

    def _record_step(self, *, partial: bool, device: tuple[int, int] | None) -> None:
        self._records.record(self.ledger, step=self._applied_step,
                             start_live=self._step_start_live,
                             start_bytes=self._step_start_bytes, started=self._step_started,
                             device=device)
        if partial:
            self._records.interrupted.add(self._applied_step)
            self._warnings.append(
                f"step {self._applied_step} was interrupted: its figures are partial"
            )

    # ------------------------------------------------------------------ hooks
    # Each hook has a live part (runs in the hook: decides, captures facts) and an apply part
    # (mutates the ledger). The dispatch backend applies at once, with the tensors themselves;
    # the events backend leaves a marker (or buffers the facts for the next one) and applies at
    # replay, in time order with the allocation events, with :class:`Facts`.
    def _on_forward_pre(self, module: nn.Module, args: Any) -> None:
        if not self._live_recording or _compiling():
            return
        self._forwards_in_step += 1
        recompute = _graph_task_id() != -1  # checkpointing runs this forward again in backward
        events = self._events
        if events is None:
            ledger = self.ledger
            idx = self.registry.index_of(module, ledger.current_module)
            if len(self.registry.index) != self._buckets_scanned or self._buckets.rebuild_ahead:
                self._ddp_buckets()
            inputs = None if recompute or ledger.frames else _held(ledger, _tensors(args))
            self._forward_pre_apply(idx, recompute, inputs)
            return
        stack = self._live_stack
        known = self.registry.index.get(module)  # (registered: the common case, one lookup)
        idx = (known if known is not None
               else self.registry.index_of(module, stack[-1][0] if stack else OUTSIDE))
        if len(self.registry.index) != self._buckets_scanned or self._buckets.rebuild_ahead:
            self._ddp_buckets()  # (buffered: applied at this module's marker, before its frame)
        if is_compiled(module):  # with the module it runs (whose hooks may run outside it)
            self._op_traces.abandon()  # before dynamo sees the frame: it must run compiled
            self._compiled_modules.add(idx)
            self._compiled_modules.add(self.registry.index_of(compiled_inner(module), idx))
            self._compiled.install()  # compiled inside the block: before it first runs
        facts = None
        if not recompute and not stack:
            facts = [facts_of(t) for t in _held(self.ledger, _tensors(args))]
        # (the module's identity: its exit finds its own entry without a registry lookup)
        stack.append((idx, events.enter(self._forward_pre_apply, idx, recompute, facts),
                      id(module)))

    def _on_root_kwargs(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        """The profiled model's keyword arguments (``model(**batch)``: labels, attention
        masks) are inputs too, saved for backward or not; runs just after the global pre-hook
        opened the model's frame, so an outermost call has exactly one frame open."""
        if not kwargs or not self._live_recording or _compiling() or _graph_task_id() != -1:
            return
        tensors = _held(self.ledger, _tensors(kwargs))
        if not tensors:
            return
        events = self._events
        if events is None:
            if len(self.ledger.frames) == 1:
                self._kwargs_inputs_apply(tensors)
        elif len(self._live_stack) == 1:
            events.point(self._kwargs_inputs_apply, [facts_of(t) for t in tensors])

    def _kwargs_inputs_apply(self, inputs: list[Any]) -> None:
        if self.ledger.recording:
            self._mark_inputs(inputs)

    def _ddp_buckets(self) -> None:
        """Enter the buckets of the DDP modules registered since the last call that were made
        before the profile, and end those freed since (see
        :class:`~memprof.tracking.distributed.BucketsBefore`)."""
        index = self.registry.index
        if len(index) != self._buckets_scanned:
            self._collectives = process_group_running() and not self._fake
            new = list(index.items())[self._buckets_scanned:]
            self._buckets_scanned = len(index)
            for module, idx in new:
                sizes = self._buckets.found(module)
                if sizes:
                    keys = [self.ledger.unseen_key() for _ in sizes]
                    self._buckets.entered(module, keys)
                    self._defer(self._buckets_enter_apply, keys, sizes, idx)
        gone = self._buckets.gone()
        if gone:
            self._defer(self._buckets_end_apply, gone)

    def _defer(self, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` now (dispatch backend, or the events backend before it records), or
        with the next marker (events)."""
        if self._events is not None and self.registry.defer is not None:
            self._events.buffer(fn, *args)
        else:
            fn(*args)

    def _buckets_enter_apply(self, keys: list[int], sizes: list[int], idx: int) -> None:
        for key, size in zip(keys, sizes, strict=True):
            self.ledger.alloc(key, size, OTHER, idx, (size,), RAW_DTYPE)

    def _buckets_end_apply(self, keys: list[int]) -> None:
        for key in keys:
            self.ledger.free(key)

    def _forward_pre_apply(self, idx: int, recompute: bool, inputs: list[Any] | None) -> None:
        ledger = self.ledger
        if not ledger.recording:
            return
        info = self.registry.infos[idx]
        if recompute:
            info.recompute_calls += 1
            ledger.push_frame(idx, FRAME_RECOMPUTE)
        else:
            self._replay_bwd = False
            if inputs is not None and not ledger.frames:
                self._mark_inputs(inputs)
            info.forward_calls += 1
            if ledger.phase != 0:
                ledger.phase = 0
            ledger.push_frame(idx, FRAME_FORWARD)
        self._forward_started.append(ledger.clock())
        ledger.sample()

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._live_recording or _compiling():
            return
        if output is None:
            # always_call: the forward may have raised
            self._oom.check(module, self.registry, self._events)
        events = self._events
        if events is None:
            idx = self.registry.index.get(module)
            forward = self._forward_apply(idx)
        else:
            stack = self._live_stack
            if not stack or stack[-1][2] != id(module):
                return  # hooks were installed in the middle of this forward
            idx, token, _ = stack.pop()
            if (type(output) is torch.Tensor and output.layout is _STRIDED
                    and output.nbytes >= self._sources.floor):
                # The events backend sees this storage only as bytes: name its shape and the
                # line that called the module (it may be among the largest at a peak).
                events.buffer(self.ledger.learn_facts, facts_of(output),
                              self._sources.take(output.nbytes))
            if idx in self._compiled_modules:
                self._compiled_owners(module, idx, output)
            events.exit(token, self._forward_apply, idx)
            forward = _graph_task_id() == -1
        if idx is None:
            return
        info = self.registry.infos[idx]
        if info.geometry is None:
            info.geometry = module_geometry(module, args, output)
        if forward:
            made: torch.Tensor | None = output
            if type(output) is torch.Tensor:  # (what _first_with_grad_fn gives, read inline)
                grad_fn = output.grad_fn
            else:
                made = _first_with_grad_fn(output)
                grad_fn = None if made is None else made.grad_fn
            # An identity module (Dropout(p=0), nn.Identity) returns its input: the node is
            # the previous module's, whose backward it would otherwise take over.
            if (grad_fn is not None
                    and grad_fn is not (args[0].grad_fn if type(args) is tuple and len(args) == 1
                                        and type(args[0]) is torch.Tensor
                                        else _first_grad_fn(args))):
                if compiled_autograd_on():
                    self._warn_compiled_autograd()
                elif self._watch_backward is not None:
                    self._watch_backward(made, idx)
                else:
                    handle = grad_fn.register_prehook(_BackwardEnter(self, idx))
                    self._grad_fn_handles.append(handle)

    def _warn_compiled_autograd(self) -> None:
        """Under compiled autograd no module's backward start is marked: its graph runs no
        C++ hook of the recorder's, and the engine's end-of-backward callback, which the
        Python hook queues, is refused there ("queue_callback() is only supported when
        Compiled Autograd is enabled with fullgraph=True"), ending the user's backward."""
        if COMPILED_AUTOGRAD_WARNING not in self._warnings:
            self._warnings.append(COMPILED_AUTOGRAD_WARNING)

    def _forward_apply(self, idx: int | None) -> bool:
        """Close the module's frame; whether it was a forward (not a recompute)."""
        ledger = self.ledger
        if not ledger.recording or not ledger.frames or idx is None:
            return False
        frame = ledger.frames[-1]
        if frame[0] != idx or frame[2] == FRAME_BACKWARD:
            return False  # hooks were installed in the middle of this forward
        ledger.pop_frame()
        info = self.registry.infos[idx]
        now = ledger.clock()
        started = self._forward_started.pop() if self._forward_started else now
        forward = frame[2] == FRAME_FORWARD
        if forward:
            info.peak_forward = max(info.peak_forward, frame[1])
            if ledger.logging:
                info.forward_time_s += now - started
        if not ledger.frames and ledger.phase == 0:
            ledger.phase = OTHER_PHASE
        ledger.sample()
        return forward

    def _on_backward_enter(self, idx: int) -> None:
        """A module's backward starts (live part of the grad_fn pre-hook)."""
        if not self._live_recording:
            return
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
        if self._events is None:
            self._backward_enter_apply(idx)
        else:
            self._events.point(self._backward_enter_apply, idx)

    def _backward_enter_apply(self, idx: int) -> None:
        """Make the module stack the module's path from the root."""
        ledger = self.ledger
        if not ledger.recording:
            return
        if ledger.phase != BACKWARD:
            ledger.set_phase(BACKWARD)
        info = self.registry.infos[idx]
        frames = ledger.frames
        if frames and frames[-1][2] == FRAME_BACKWARD:
            top = frames[-1][0]
            if top == idx or idx in self.registry.infos[top].ancestors:
                return  # an enclosing module sharing the node: the inner one stays current
        while frames and frames[-1][2] == FRAME_BACKWARD and frames[-1][0] not in info.ancestors:
            self._close_backward_frame()
        if frames and frames[-1][0] == info.parent and frames[-1][2] == FRAME_BACKWARD:
            # A sibling's backward came before (the common case): the parent's backward frame
            # is on top, and below it the parent's ancestors (pushed before it, popped after).
            ledger.push_frame(idx, FRAME_BACKWARD)
            ledger.sample()
            return
        present = {f[0] for f in frames}
        chain = sorted(info.ancestors - present, key=lambda a: self.registry.infos[a].depth)
        for ancestor in [*chain, idx]:
            ledger.push_frame(ancestor, FRAME_BACKWARD)
        ledger.sample()

    def _close_backward_frame(self) -> None:
        frame = self.ledger.pop_frame()
        info = self.registry.infos[frame[0]]
        info.peak_backward = max(info.peak_backward, frame[1])

    def _on_backward_end(self) -> None:
        self._in_backward = False
        if not self._live_recording:
            return
        if self._events is None:
            self._backward_end_apply()
        else:
            self._events.point(self._backward_end_apply)

    def _backward_end_apply(self) -> None:
        ledger = self.ledger
        self._replay_bwd = False
        ledger.node = -1
        if not ledger.recording:
            return
        while ledger.frames and ledger.frames[-1][2] == FRAME_BACKWARD:
            self._close_backward_frame()
        ledger.set_phase(OTHER_PHASE)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._live_recording and _graph_task_id() == -1:
            kind = type(tensor)
            if (kind is torch.Tensor or kind is nn.Parameter) and tensor.layout is _STRIDED:
                self._pack_part(tensor)  # (what ledger.parts gives a plain tensor or weight)
            else:
                for part in self.ledger.parts(tensor):  # one, unless sparse
                    self._pack_part(part)
            if self._op_traces.trace is not None:
                self._op_traces.trace.saved_tensor(tensor)
        grad_fn = tensor.grad_fn
        if grad_fn is None:
            return tensor
        if type(tensor) is FakeTensor and _made_before_this_node(grad_fn):
            return tensor  # an input of the node being made: no cycle, and no fake detach
        # Never give autograd back the tensor itself: a node that saves its own output (exp,
        # sigmoid, softmax) would then hold, through the packed object, a tensor whose grad_fn
        # is that node, a cycle of C++ references no collector breaks. Backward releases it;
        # a branch that never reaches backward (``A = -torch.exp(self.A_log)`` left unused)
        # would keep the output, the node and the parameters behind it alive for ever.
        # Autograd saves outputs without their grad_fn for this reason, and reattaches it on
        # unpacking, as it does to what :func:`_unpack` returns. Same storage, same values.
        return tensor.detach()

    def _pack_part(self, tensor: torch.Tensor) -> None:
        # A large saved tensor's line is the line of the forward op whose node saves it: noted
        # under the node's sequence number, it names the backward temporaries that node makes
        # (where the events backend sees only bytes). Small ones cost nothing more.
        events = self._events
        sources = self._sources
        if events is None:
            ledger = self.ledger
            self._pack_apply(tensor, ledger.current_module)
            if tensor.untyped_storage().nbytes() >= sources.floor:
                ledger.note_node(_sequence_nr() - 1, user_source())
            return
        stack = self._live_stack
        facts = facts_of(tensor)
        source = sources.take(facts[1]) if facts[1] >= sources.floor else ""
        node = _sequence_nr() - 1 if source else -1
        if stack and stack[-1][0] in self._compiled_modules:
            self._compiled_packs.append((facts, stack[-1][0], source, node))  # _compiled_owners
        elif stack:  # alive until the module's next marker: the graph holds it
            events.buffer(self._pack_apply, facts, stack[-1][0], source, node)
        else:
            # Outside modules (the loss) the next marker may come in backward, after the
            # tensor is freed: the facts would then find no entry and make up an input that
            # no longer exists. Mark the moment itself.
            events.point(self._pack_apply, facts, OUTSIDE, source, node)

    def _pack_apply(self, tensor: torch.Tensor | Facts, module: int, source: str = "",
                    node: int = -1) -> None:
        """Autograd saved ``tensor`` during ``module``'s forward: an activation (and the node
        numbered ``node``, which saved it, was made at ``source``)."""
        ledger = self.ledger
        if not ledger.recording:
            return
        ledger.note_node(node, source)
        entry = ledger.lookup(tensor)
        if entry is None:
            ledger.track(tensor, INPUT, OUTSIDE)
            return
        ledger.learn(entry, tensor, source)
        if entry.category == TEMPORARY:
            ledger.reclassify(entry, ACTIVATION, module)

    def _compiled_owners(self, module: nn.Module, idx: int, output: Any) -> None:
        """A compiled module's forward ended: the tensors its compiled regions saved go to the
        modules whose code made them (see :mod:`memprof.tracking.compiled`), the others to
        the compiled module, as the packs would have."""
        packs, self._compiled_packs = self._compiled_packs, []
        owners: dict[int, int] = {}
        grad_fn = _first_grad_fn(output) if _graph_task_id() == -1 else None
        if not packs and id(grad_fn) == self._compiled_seen:
            return  # the enclosing OptimizedModule's exit, just after its inner module's
        self._compiled_seen = id(grad_fn)
        if grad_fn is not None:
            inner = self.registry.index.get(compiled_inner(module), idx)
            name = self.registry.infos[inner].name
            prefix = f"{name}." if name else ""
            for tensor, path in self._compiled.saved(grad_fn):
                owner = self.registry.by_name.get(prefix + path)
                if owner is not None:
                    for part in self.ledger.parts(tensor):
                        owners[facts_of(part)[0]] = owner
        self._compiled_attributed += len(owners)
        events = self._events
        assert events is not None
        for facts, packed_in, source, node in packs:
            events.buffer(self._pack_apply, facts, owners.pop(facts[0], packed_in), source, node)
        if owners:  # saved without a pack (AOT autograd's no-version-check tensors)
            events.buffer(self._compiled_apply, list(owners.items()))

    def _compiled_apply(self, owners: list[tuple[int, int]]) -> None:
        ledger = self.ledger
        if not ledger.recording:
            return
        for key, owner in owners:
            entry = ledger.entries.get(key)
            if entry is not None and entry.category in (TEMPORARY, ACTIVATION):
                ledger.reclassify(entry, ACTIVATION, owner)

    def _mark_inputs(self, values: list[Any]) -> None:
        """Tensors handed to the outermost module: batch data, unless they have a role."""
        ledger = self.ledger
        for value in values:
            entry = ledger.lookup(value)
            if entry is None:
                ledger.track(value, INPUT, OUTSIDE)
            elif entry.category in (TEMPORARY, OTHER) and entry.module == OUTSIDE:
                ledger.reclassify(entry, INPUT, OUTSIDE)
            if len(self._inputs_seen) < 8:
                shape, dtype = (value[2], value[3]) if type(value) is tuple else (value.shape,
                                                                                  value.dtype)
                self._inputs_seen.append(
                    {"shape": list(shape), "dtype": str(dtype).replace("torch.", "")}
                )

    def _on_grad(self, owner: int, param: torch.Tensor) -> None:
        """A gradient was accumulated into ``param.grad``, owned by module ``owner`` (live
        part)."""
        if self._collectives and in_accumulate_grad():
            # DDP's reducer launches its all-reduce from this node's post hooks, next: its
            # work must not capture memprof's hooks or mode (a hang at teardown, #25)
            leave_for_collectives(self._pack_hook, (self._mode, self._op_traces.mode))
        grad = param.grad
        if not self._live_recording or grad is None:
            return
        if self._op_traces.trace is not None:
            self._op_traces.trace.gradient(grad)
        events = self._events
        if events is None:
            for part in self.ledger.facts(grad):  # one, unless sparse (nn.Embedding(sparse=True))
                self._grad_apply(part, owner)
            return
        if type(grad) is torch.Tensor and grad.layout is _STRIDED:
            events.buffer(self._grad_apply, facts_of(grad), owner)  # (ledger.facts' one)
        else:
            for part in self.ledger.facts(grad):
                events.buffer(self._grad_apply, part, owner)
        if self._recorder is not None:
            events.seal()  # applied before the next module's backward start (recorder.cpp)

    def _grad_apply(self, grad: torch.Tensor | Facts, owner: int) -> None:
        if self.ledger.recording:
            self.ledger.track(grad, GRADIENT, owner)

    def _on_optimizer_pre(self, optimizer: torch.optim.Optimizer, args: Any, kw: Any) -> None:
        if optimizer in self._stepping:  # its last step raised: no post hook ran
            del self._stepping[self._stepping.index(optimizer):]
        self._stepping.append(optimizer)
        if not self._live_recording or len(self._stepping) > 1:
            return  # an optimizer stepped inside another's step is part of that step
        self._op_traces.in_optimizer(True)
        if self._events is None:
            self._optimizer_pre_apply()
        else:
            self._events.point(self._optimizer_pre_apply)

    def _optimizer_pre_apply(self) -> None:
        ledger = self.ledger
        self._replay_bwd = False
        if not ledger.recording:
            return
        ledger.in_optimizer = True
        ledger.set_phase(OPTIMIZER)

    def _on_optimizer_post(self, optimizer: torch.optim.Optimizer, args: Any, kw: Any) -> None:
        if optimizer in self._stepping:
            del self._stepping[self._stepping.index(optimizer):]
        if self._stepping:  # inside another optimizer's step (ZeRO-1's inner optimizer)
            self._optimizer_states.wrapped_by(optimizer, self._stepping[0])
            if self._live_recording:
                state = self._optimizer_state(optimizer)
                if self._events is None:
                    self._track_state_apply(state)
                else:
                    self._events.point(self._track_state_apply, state)
            return
        self._op_traces.in_optimizer(False)
        if self._live_recording:
            state = self._optimizer_state(optimizer)
            if self._events is None:
                self._optimizer_post_apply(state)
            else:
                self._events.point(self._optimizer_post_apply, state)
        if self._step_on_optimizer:
            self._optimizer_steps += 1
            if self._optimizer_steps % self._optimizer_steps_per_step == 0:
                self.step()

    def _optimizer_state(self, optimizer: torch.optim.Optimizer) -> list[tuple[Any, int]]:
        """The optimizer's persistent state tensors with their owning modules (live part)."""
        return self._optimizer_states.collect(optimizer, self.ledger, self.registry.param_owner,
                                              owners_version=self.registry.owners_version,
                                              round_to=self._round_to)

    def _track_state_apply(self, state: list[tuple[Any, int]]) -> None:
        if self.ledger.recording:
            self._track_state(state)

    def _track_state(self, state: list[tuple[Any, int]]) -> None:
        for value, module in state:
            self.ledger.track(value, OPTIMIZER_STATE, module)

    # ------------------------------------------ fake runs: one backward, several optimizers
    def pause(self) -> bool:
        """See nothing (operators, hooks) until :meth:`resume`: a fake run makes an optimizer's
        state after the backward it shares (memprof.advisor.fake_prediction). False, changing
        nothing, unless the dispatch ledger's mode is the innermost one."""
        if self._events is not None or not self._mode_entered or not self._live_recording \
                or _get_current_dispatch_mode() is not self._mode:
            return False
        self._set_mode(False)
        self._live_recording = False
        return True

    def resume(self) -> None:
        """End a :meth:`pause`."""
        self._live_recording = True
        self._set_mode(True)

    def innermost_ledger_mode(self) -> LedgerMode | None:
        """The dispatch ledger's mode when it is the innermost dispatch mode now (the
        operators it runs are the ones run), else None."""
        if self._events is None and self._mode_entered and \
                _get_current_dispatch_mode() is self._mode:
            return self._mode
        return None

    def track_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Track ``optimizer``'s state now, as that of the optimizer given at the start is."""
        self._track_state(self._optimizer_state(optimizer))

    def _optimizer_post_apply(self, state: list[tuple[Any, int]]) -> None:
        ledger = self.ledger
        if not ledger.recording:
            return
        self._track_state(state)
        ledger.in_optimizer = False
        ledger.set_phase(OTHER_PHASE)

    # ----------------------------------------------------------- events replay
    def _alloc_phase(self) -> None:
        """Set the phase of an allocation being replayed (what ``see`` does live)."""
        phase = self._next_alloc_phase(False)
        if phase != self.ledger.phase:
            self.ledger.set_phase(phase)

    def _next_alloc_phase(self, after_node: bool) -> int:
        """The phase :meth:`_alloc_phase` sets now (``after_node``: once an autograd node
        started, :meth:`_on_backward_node`)."""
        ledger = self.ledger
        if ledger.in_optimizer:
            return OPTIMIZER
        if after_node or self._replay_bwd or ledger.phase == BACKWARD:
            return BACKWARD
        if ledger.frames:
            return FORWARD
        return OTHER_PHASE

    def _on_backward_node(self, node: int) -> None:
        """The autograd node numbered ``node`` started (replay): backward is running."""
        self._replay_bwd = True
        self.ledger.node = node

    def _trace_parameters(self) -> set[int]:
        return {id(p.untyped_storage()) for p in list(self.registry.param_owner)}

    def _trace_module(self) -> int:
        if self._events is None:
            return self.ledger.current_module
        return self._live_stack[-1][0] if self._live_stack else OUTSIDE

    # ---------------------------------------------------------------- results
    def _name(self, module: int) -> str:
        return module_name(self.registry, module)

    def _build(self, *, interrupted: bool) -> None:
        """Build the finished profile into ``_result``."""
        device = device_info(self._model, fake=self._fake,
                             device_modelled=self._device_modelled, round_to=self._round_to,
                             corrections=self._corrections)
        records = self._records
        self._result = build_profile(
            self.ledger, self.registry, records,
            active_steps=self._active_steps,
            warnings_so_far=self._warnings,
            ran_eagerly=self._events is None and not self._fake,
            compiled_attributed=self._compiled_attributed,
            device=device,
            optimizers=self._optimizer_states.summaries(),
            allocator=self._reserved.summary() if self._reserved is not None else None,
            op_trace=self._op_traces.result(records.steps, device.kind, self._name),
            meta={
                "interrupted": interrupted,
                "steps_seen": self._step + 1,
                "inputs": self._inputs_seen,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "backend": self.backend if self._events is None
                else f"events from {self._events.source.name}",
                **self._distributed_meta(),
            },
        )

    def _distributed_meta(self) -> dict[str, Any]:
        """``{"distributed": ...}`` for a rank of a multi-process run or a model wrapped by
        DDP/FSDP2 (see :mod:`memprof.tracking.distributed`); empty otherwise."""
        from memprof.tracking import distributed

        self._watch_engines()
        info = distributed.describe(self._engines, distributed.rank_from_env(),
                                    self._records.peak)
        return {"distributed": info} if info else {}

    def _watch_engines(self) -> None:
        self._engines.update(self.registry)


class _BackwardEnter:
    """A grad_fn pre-hook: the module's backward starts. Holds no tensor."""

    __slots__ = ("idx", "profiler")

    def __init__(self, profiler: Profiler, idx: int) -> None:
        self.profiler = profiler
        self.idx = idx

    def __call__(self, grad_outputs: Any) -> None:
        if Profiler._active is self.profiler:
            if compiled_autograd_on():  # a forward run eagerly, its backward compiled
                self.profiler._warn_compiled_autograd()
                return
            self.profiler._on_backward_enter(self.idx)


keep_out_of_dynamo(
    Profiler._pack, Profiler._on_grad, Profiler._on_forward_pre, Profiler._on_forward,
    Profiler._on_root_kwargs, Profiler._on_optimizer_pre, Profiler._on_optimizer_post,
    Profiler._on_backward_end, _BackwardEnter.__call__,
)


def _auto_backend() -> Literal["events", "dispatch"]:
    if AUTO_BACKEND is not None:
        return AUTO_BACKEND
    return "events" if native.load() is not None else "dispatch"


def _device_stats() -> tuple[int, int] | None:
    """CUDA's max allocated and reserved bytes for the step ending now, if CUDA is in use."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), int(torch.cuda.memory_reserved())
    return None


def _tensors(args: Any) -> list[torch.Tensor]:
    return [v for v in tree_flatten(args)[0] if isinstance(v, torch.Tensor)]


def _held(ledger: StorageLedger, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The storage-holding parts of ``tensors`` (a sparse batch's indices and values)."""
    return [part for tensor in tensors for part in ledger.parts(tensor)]


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _made_before_this_node(grad_fn: Any) -> bool:
    """Whether a saved tensor's ``grad_fn`` is an older node than the one saving it, so that
    the saved tensor cannot lead back to it (no cycle: see :meth:`Profiler._pack`). A built-in
    op's node is the newest (numbered the counter less one: nothing is made between its node
    and its saving), so an older number is an input's node; a custom Function's forward may
    make nodes before it saves, so its outputs are never taken for inputs."""
    return (not isinstance(grad_fn, BackwardCFunction)
            and grad_fn._sequence_nr() < _sequence_nr() - 1)


def _first_grad_fn(output: Any) -> Any:
    made = _first_with_grad_fn(output)
    return None if made is None else made.grad_fn


def _first_with_grad_fn(output: Any) -> torch.Tensor | None:
    """The first tensor of ``output`` that an autograd node made."""
    if isinstance(output, torch.Tensor):
        return output if output.grad_fn is not None else None
    if type(output) is tuple and all(isinstance(v, torch.Tensor) for v in output):
        values: Any = output  # a module's positional arguments, mostly: no pytree walk needed
    else:
        values = tree_flatten(output)[0]
    for value in values:
        if isinstance(value, torch.Tensor) and value.grad_fn is not None:
            return value
    return None


def _fake_mode_active() -> bool:
    try:
        from torch._guards import detect_fake_mode

        return detect_fake_mode() is not None
    except ImportError:  # pragma: no cover - very old torch
        return False


def profile(
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    schedule: Callable[[int], StepAction] | None = None,
    timeline_points: int = 256,
    top_tensors: int = 20,
    backend: Backend = "auto",
    source_lines_above: int | None = None,
    record_ops: bool = False,
) -> Profiler:
    """Profile the memory of the training steps run inside the ``with`` block.

    ``model`` and ``optimizer`` are optional: without them every module and optimizer that runs
    is tracked, and the first module to run is the root. Call ``prof.step()`` once per step.
    The largest tensors at the peak carry the source line that made them where a hook or the
    dispatch ledger saw them (a temporary made in backward: the line of the forward op whose
    autograd node made it, where that node saved a large tensor); ``source_lines_above=N`` also
    records it for every storage over N bytes (dispatch backend; the events backend sees only
    saved tensors, module outputs and backward temporaries). ``record_ops=True`` records
    the operator trace of one of the first two steps (:mod:`memprof.tracking.op_trace`) so
    that a saved profile can replay its step under autocast's rules (``memprof run`` does;
    off by default: in the traced steps its dispatch mode re-wraps Python scalars as 8-byte
    tensors that the events backend counts).

    Example::

        with memprof.profile(model, optimizer) as prof:
            for x, y in loader:
                loss_fn(model(x), y).backward()
                optimizer.step(); optimizer.zero_grad()
                prof.step()
        print(prof.modules())
    """
    return Profiler(
        model,
        optimizer,
        schedule=schedule,
        timeline_points=timeline_points,
        top_tensors=top_tensors,
        backend=backend,
        source_lines_above=source_lines_above,
        record_ops=record_ops,
    )
