"""The step's operator trace: what a file needs to replay the step under a change's rules.

While one training step runs, :class:`OpTraceMode` records each operator that makes a new
storage or reads one: its name, phase and module, the storages it read and the ones it made.
Each storage the step touched is one record: its bytes and dtype, the operator that made it
and the one after which it was freed, whether it was there before the step (a parameter, the
batch), whether autograd saved it (and when) and whether it became a gradient. No tensor is
kept: storages are held by weak references, as the ledger holds them.

The record is columnar (parallel lists, names interned), so a GPT-2 small step is a few hundred
kilobytes of JSON. :mod:`memprof.advisor.trace_replay` replays it under autocast's rules.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Storage kinds.
MADE, EXTERNAL, PARAMETER = 0, 1, 2
#: Operator phases.
FORWARD, BACKWARD, OPTIMIZER, OTHER = 0, 1, 2, 3
TRACE_VERSION = 1

_graph_task_id = torch._C._current_graph_task_id
_LIFT_FRESH = torch.ops.aten.lift_fresh.default
_sequence_nr = torch._C._autograd._get_sequence_nr


class _Ref(weakref.ref):  # type: ignore[type-arg,unused-ignore]
    __slots__ = ("index", "key")
    index: int
    key: int


class OpTrace:
    """The record being built (live) and its JSON form (:meth:`to_dict`)."""

    def __init__(self, parameters: set[int], current_module: Callable[[], int]) -> None:
        self._parameters = parameters  # id() of the parameters' storages
        self._current_module = current_module
        self._index: dict[int, int] = {}  # id(storage) -> storage index
        self._refs: list[_Ref] = []
        self.names: list[str] = []
        self._name_index: dict[str, int] = {}
        self.dtypes: list[str] = []
        self._dtype_index: dict[torch.dtype, int] = {}
        # operators
        self.op_name: list[int] = []
        self.op_phase: list[int] = []
        self.op_module: list[int] = []
        self.op_in: list[list[int]] = []
        self.op_out: list[list[int]] = []
        # storages
        self.nbytes: list[int] = []
        self.dtype: list[int] = []
        self.kind: list[int] = []
        self.made: list[int] = []  # operator index that made it (-1: before the step)
        self.freed: list[int] = []  # operator count when it was freed (-1: outlived the trace)
        self.shape: list[list[int]] = []
        #: (storage, operator count when autograd saved it, 1 if saved as its maker's output)
        self.saves: list[tuple[int, int, int]] = []
        self.grad: list[bool] = []
        self.in_optimizer = False
        self.closed = False

    # ------------------------------------------------------------ live part
    def _storage(self, tensor: torch.Tensor, made: int) -> int:
        """The index of ``tensor``'s storage, recorded on first sight."""
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):
            return -1
        key = id(storage)
        index = self._index.get(key)
        if index is not None:
            return index
        index = len(self.nbytes)
        self._index[key] = index
        dtype = self._dtype_index.get(tensor.dtype)
        if dtype is None:
            dtype = self._dtype_index[tensor.dtype] = len(self.dtypes)
            self.dtypes.append(str(tensor.dtype).replace("torch.", ""))
        self.nbytes.append(int(storage.nbytes()))
        self.dtype.append(dtype)
        if made >= 0:
            self.kind.append(MADE)
        else:
            self.kind.append(PARAMETER if key in self._parameters else EXTERNAL)
        self.made.append(made)
        self.freed.append(-1)
        self.shape.append([int(d) for d in tensor.shape])
        self.grad.append(False)
        ref = _Ref(storage, self._on_free)
        ref.index = index
        ref.key = key
        self._refs.append(ref)
        return index

    def _on_free(self, ref: _Ref) -> None:
        if not self.closed:
            self.freed[ref.index] = len(self.op_name)
            # the next storage at this address is another one
            if self._index.get(ref.key) == ref.index:
                del self._index[ref.key]

    def record(self, func: Any, args: tuple[Any, ...], out: Any) -> None:
        """One operator call: what it read and what new storages it made (views make none
        and are left out: a view's reader reads its storage)."""
        if func.is_view and func is not _LIFT_FRESH:
            return
        inputs: list[int] = []
        for arg in args:  # first: an in-place operator's output is one of these
            if isinstance(arg, torch.Tensor):
                inputs.append(self._storage(arg, -1))
            elif isinstance(arg, (list, tuple)):
                inputs.extend(self._storage(a, -1) for a in arg if isinstance(a, torch.Tensor))
        if self.in_optimizer:  # the optimizer's reads change under no rule here
            phase, inputs = OPTIMIZER, []
        else:
            phase = BACKWARD if _graph_task_id() != -1 else FORWARD
        op = len(self.op_name)
        outputs = []
        before = len(self.nbytes)
        for item in out if isinstance(out, (list, tuple)) else (out,):
            if isinstance(item, torch.Tensor):
                index = self._storage(item, op)
                if index >= before:
                    outputs.append(index)
        if not outputs and not inputs:
            return
        name = str(func.overloadpacket.__name__)
        code = self._name_index.get(name)
        if code is None:
            code = self._name_index[name] = len(self.names)
            self.names.append(name)
        self.op_name.append(code)
        self.op_phase.append(phase)
        self.op_module.append(self._current_module())
        self.op_in.append(inputs)
        self.op_out.append(outputs)

    def saved_tensor(self, tensor: torch.Tensor) -> None:
        """Autograd saved ``tensor`` (the pack hook): inputs are saved before their operator
        runs, outputs after it, by the node just made (the newest sequence number)."""
        index = self._storage(tensor, -1)
        if index >= 0:
            node = tensor.grad_fn
            output = node is not None and node._sequence_nr() == _sequence_nr() - 1
            self.saves.append((index, len(self.op_name), int(output)))

    def gradient(self, tensor: torch.Tensor) -> None:
        index = self._storage(tensor, -1)
        if index >= 0:
            self.grad[index] = True

    def close(self) -> None:
        """Stop watching frees (what outlives the trace stays -1) and drop the references."""
        self.closed = True
        self._refs.clear()
        self._index.clear()

    # ------------------------------------------------------------- the file
    def to_dict(
        self, *, step: int, start_bytes: int, device: str, module_names: Callable[[int], str]
    ) -> dict[str, Any]:
        modules: list[str] = []
        seen: dict[int, int] = {}
        op_module = []
        for m in self.op_module:
            code = seen.get(m)
            if code is None:
                code = seen[m] = len(modules)
                modules.append(module_names(m))
            op_module.append(code)
        return {
            "version": TRACE_VERSION,
            "step": step,
            "start_bytes": start_bytes,
            "device": device,
            "names": self.names,
            "modules": modules,
            "dtypes": self.dtypes,
            "ops": {
                "name": self.op_name,
                "phase": self.op_phase,
                "module": op_module,
                "inputs": self.op_in,
                "outputs": self.op_out,
            },
            "storages": {
                "nbytes": self.nbytes,
                "dtype": self.dtype,
                "kind": self.kind,
                "made": self.made,
                "freed": self.freed,
                "shape": self.shape,
                "grad": [int(g) for g in self.grad],
            },
            "saves": [list(pair) for pair in self.saves],
        }


class OpTraceMode(TorchDispatchMode):
    """Shows each operator call to an :class:`OpTrace`."""

    def __init__(self, trace: OpTrace) -> None:
        super().__init__()
        self.trace = trace

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __torch_dispatch__(  # type: ignore[no-untyped-def]
        self, func, types, args=(), kwargs=None
    ):
        out = func(*args, **(kwargs or {}))
        if not self.trace.closed:
            self.trace.record(func, args, out)
        return out


class OpTraces:
    """The session's side: traces the first ``steps`` active steps, one at a time, and keeps
    the one of the step with the highest peak (the later one on a tie: the steady state)."""

    def __init__(
        self,
        enabled: bool,
        parameters: Callable[[], set[int]],
        current_module: Callable[[], int],
        steps: int = 2,
    ) -> None:
        self._enabled = enabled
        self._parameters = parameters
        self._current_module = current_module
        self._left = steps
        self.trace: OpTrace | None = None
        self._mode: OpTraceMode | None = None
        self._done: list[tuple[int, OpTrace]] = []

    @property
    def mode(self) -> OpTraceMode | None:
        """The dispatch mode recording now (None: none)."""
        return self._mode

    def start(self) -> None:
        if not self._enabled or self._left <= 0 or self.trace is not None:
            return
        self._left -= 1
        self.trace = OpTrace(self._parameters(), self._current_module)
        self._mode = OpTraceMode(self.trace)
        self._mode.__enter__()

    def stop(self, step: int | None) -> None:
        """End the running trace; keep it as ``step``'s (None: drop it)."""
        trace, mode = self.trace, self._mode
        if trace is None or mode is None:
            return
        self.trace = self._mode = None
        trace.close()
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        if _get_current_dispatch_mode() is mode:
            mode.__exit__(None, None, None)
        else:  # another mode sits above ours: it stays, recording nothing more
            self._enabled = False
        if step is not None and trace.op_name:
            self._done.append((step, trace))

    def abandon(self) -> None:
        """Record no more: a compiled module runs (dynamo compiles nothing while a dispatch mode
        is active, so tracing would make it run eagerly) -- the file then carries no trace."""
        self.stop(None)
        self._enabled = False
        self._done.clear()

    def in_optimizer(self, on: bool) -> None:
        if self.trace is not None:
            self.trace.in_optimizer = on

    def result(
        self, steps: list[Any], device: str, module_names: Callable[[int], str]
    ) -> dict[str, Any] | None:
        """The kept trace as JSON (see :meth:`OpTrace.to_dict`), or None."""
        by_step = {s.step: s for s in steps}
        best: tuple[int, int, OpTrace] | None = None
        for step, trace in self._done:
            stats = by_step.get(step)
            if stats is None:
                continue
            if best is None or stats.peak_bytes >= best[1]:
                best = (step, stats.peak_bytes, trace)
        if best is None:
            return None
        step, _, trace = best
        return trace.to_dict(
            step=step,
            start_bytes=int(by_step[step].start_bytes),
            device=device,
            module_names=module_names,
        )
