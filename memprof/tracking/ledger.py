"""The storage ledger: every live tracked storage, its size, role and owning module.

This is the hot path. Each operator output reaches :meth:`StorageLedger.see`; each free reaches
:meth:`StorageLedger._on_free` through a weak reference to the storage. Both are O(1): running
totals per category and per module are updated in place, nothing is scanned. Roles learned later
(autograd saved it, it became a ``.grad``, the optimizer kept it as state) move a storage's bytes
between categories with :meth:`StorageLedger.reclassify`.

Only the storage's Python object is referenced weakly; the ledger never keeps a tensor alive.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from memprof.categories import CATEGORIES, PHASES
from memprof.units import round_up

if TYPE_CHECKING:
    from memprof.allocator import CachingAllocatorModel
    from memprof.tracking.source import SourceSampler

# Category and phase indices: the hot path works with ints, tables with names.
PARAMETER, BUFFER, GRADIENT, OPTIMIZER_STATE, ACTIVATION, TEMPORARY, INPUT, OTHER = range(8)
FORWARD, BACKWARD, OPTIMIZER, OTHER_PHASE = range(4)
assert len(CATEGORIES) == 8 and len(PHASES) == 4
OUTSIDE = 0  # module index of "no module running"

#: Frame kinds on the module stack.
FRAME_FORWARD, FRAME_BACKWARD, FRAME_RECOMPUTE = 0, 1, 2

_graph_task_id = torch._C._current_graph_task_id
_current_node = torch._C._current_autograd_node


class Entry:
    """One tracked storage. ``nbytes`` is what the allocator is charged (rounded on CUDA)."""

    __slots__ = ("category", "dtype", "key", "module", "nbytes", "phase", "raw_nbytes", "ref",
                 "shape", "source")

    def __init__(
        self, key: int, nbytes: int, raw_nbytes: int, category: int, module: int, phase: int,
        shape: tuple[int, ...], dtype: torch.dtype,
    ) -> None:
        self.key = key
        self.nbytes = nbytes
        self.raw_nbytes = raw_nbytes
        self.category = category
        self.module = module
        self.phase = phase
        self.shape = shape
        self.dtype = dtype
        self.ref: _StorageRef | None = None
        self.source = ""  # file:line in function, for the few storages worth it


#: What a hook learned about a tensor, without holding it (events backend): ``(key, nbytes,
#: shape, dtype)``, ``key`` being the storage's data pointer, the address its allocation event
#: carries. A plain tuple of atoms, so that the cyclic GC stops tracking it while it waits for
#: the replay (an object with slots would be scanned at every collection until then).
Facts = tuple[int, int, tuple[int, ...], torch.dtype]


def storage_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage holds ``tensor``'s memory: itself, or for a wrapper subclass
    that owns no storage (DTensor, FSDP2's sharded parameters and gradients) its largest inner
    tensor (a DTensor's only one: the local shard)."""
    if type(tensor) is torch.Tensor:  # the hot path: an operator's plain output
        return tensor
    while is_traceable_wrapper_subclass(tensor):
        attrs, _ = tensor.__tensor_flatten__()
        inner = [x for x in (getattr(tensor, a) for a in attrs) if isinstance(x, torch.Tensor)]
        if not inner:
            break
        tensor = max(inner, key=lambda t: t.numel() * t.element_size())
    return tensor


#: The accessors of a compressed sparse tensor's parts, by layout.
_COMPRESSED_PARTS = {
    torch.sparse_csr: ("crow_indices", "col_indices", "values"),
    torch.sparse_bsr: ("crow_indices", "col_indices", "values"),
    torch.sparse_csc: ("ccol_indices", "row_indices", "values"),
    torch.sparse_bsc: ("ccol_indices", "row_indices", "values"),
}
_STRIDED = torch.strided
_PARAMETER = torch.nn.Parameter


def held_tensors(tensor: torch.Tensor, uncounted: dict[str, int] | None = None
                 ) -> list[torch.Tensor]:
    """The tensors with a readable storage that hold ``tensor``'s memory: itself for a plain
    tensor; a sparse tensor's indices and values (COO: ``_indices``, ``_values``; CSR/CSC/BSR/
    BSC: the compressed and plain indices and the values), which own no storage of their own;
    every inner tensor of a wrapper subclass (a jagged nested tensor's values and offsets).

    A tensor none of whose memory can be read (an MKL-DNN or other opaque tensor) is left out
    and counted in ``uncounted`` under its kind, so that the profile can name what it missed:
    the profiler must never raise out of the user's training step."""
    if type(tensor) is torch.Tensor and tensor.layout is _STRIDED:
        return [tensor]
    found: list[torch.Tensor] = []
    _collect_held(tensor, found, uncounted, 0)
    return found


def _no_entries(tensor: torch.Tensor) -> bool:
    try:
        return tensor.layout is not torch.sparse_coo or tensor._nnz() == 0
    except Exception:
        return True


def _collect_held(tensor: torch.Tensor, found: list[torch.Tensor],
                  uncounted: dict[str, int] | None, depth: int) -> None:
    try:
        layout = tensor.layout
        if layout is not _STRIDED and isinstance(tensor, FakeTensor) and _no_entries(tensor):
            # PyTorch's fake sparse tensors hold no entries (how many depends on values):
            # charging their empty parts would pass 0 bytes off as an estimate. (memprof's
            # fake runs give a sparse gradient its entries: memprof/fake_kernels.py.)
            raise NotImplementedError("a fake sparse tensor's size depends on values")
        if layout is torch.sparse_coo:
            parts = [tensor._indices(), tensor._values()]
        elif layout in _COMPRESSED_PARTS:
            parts = [getattr(tensor, name)() for name in _COMPRESSED_PARTS[layout]]
        elif is_traceable_wrapper_subclass(tensor) and depth < 8:
            attrs, _ = tensor.__tensor_flatten__()
            parts = [x for x in (getattr(tensor, a) for a in attrs)
                     if isinstance(x, torch.Tensor)]
        else:
            tensor.untyped_storage()
            found.append(tensor)
            return
    except Exception:  # whatever the tensor kind, the step must go on
        if uncounted is not None:
            shown: Any = getattr(tensor, "layout", None)
            kind = (f"fake {shown} tensor (its size depends on values)"
                    if isinstance(tensor, FakeTensor) else f"{type(tensor).__name__} ({shown})")
            uncounted[kind] = uncounted.get(kind, 0) + 1
        return
    for part in parts:
        _collect_held(part, found, uncounted, depth + 1)


def on_cuda(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` lives (or, fake, pretends to live) on a CUDA device. A plain tensor
    answers ``is_cuda`` in C++; any other (a fake tensor) is asked its ``device``, a Python
    property: its ``is_cuda`` would dispatch ``prim.device`` through every mode on the stack."""
    if type(tensor) is torch.Tensor:
        return tensor.is_cuda
    return tensor.device.type == "cuda"


def charged_bytes(raw: int, tensor: torch.Tensor, round_to: int) -> int:
    """The bytes a storage of ``raw`` bytes holds: CUDA's caching allocator (real or fake
    tensors on a CUDA device) rounds to 512-byte blocks, and a modelled device (``round_to``
    over 1) to its own block, at least 512."""
    if round_to > 1 or on_cuda(tensor):
        return round_up(raw, max(round_to, 512))
    return raw


def facts_of(tensor: torch.Tensor) -> Facts:
    """The :data:`Facts` of ``tensor`` (one with a readable storage: see :func:`held_tensors`
    for the others)."""
    kind = type(tensor)
    if kind is torch.Tensor or kind is _PARAMETER:  # the hot path (a hook's plain tensor or
        storage = tensor.untyped_storage()          # a saved weight): no calls to make
        raw = storage.nbytes()
        return (storage.data_ptr(), round_up(raw, 512) if tensor.is_cuda else raw,
                tuple(tensor.shape), tensor.dtype)
    tensor = storage_tensor(tensor)
    storage = tensor.untyped_storage()
    raw = storage.nbytes()
    return (storage.data_ptr(), round_up(raw, 512) if on_cuda(tensor) else raw,
            tuple(tensor.shape), tensor.dtype)


def keep_out_of_dynamo(*functions: Any) -> None:
    """Make torch.compile's dynamo neither compile the frames of ``functions`` nor any frame
    they call (the recursive skip of ``torch._dynamo.disable``), at no cost per call: the mark
    is on the code objects, where the wrapper of ``torch._dynamo.disable`` would run at every
    call (the ledger's dispatch mode sees every operator). Without it, an operator run eagerly
    around a compiled region made dynamo compile the mode's ``__torch_dispatch__`` and trace
    the ledger until its recompile limit. Calls that dynamo *inlines* while tracing a module
    (the forward hooks) are not affected: they return at once while it compiles."""
    try:
        from torch._C._dynamo.eval_frame import (
            _FrameAction,
            _FrameExecStrategy,
            set_code_exec_strategy,
        )
    except ImportError:  # pragma: no cover - a torch without dynamo's C side
        return
    skip = _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP)
    for function in functions:
        code = getattr(getattr(function, "__func__", function), "__code__", None)
        if code is not None:
            set_code_exec_strategy(code, skip)


#: dtype of an entry known only from an allocation event (shape is then ``(nbytes,)``).
RAW_DTYPE = torch.uint8


class _StorageRef(weakref.ref):  # type: ignore[type-arg,unused-ignore]
    """A weak reference to a storage that remembers its ledger key (no cycle with the entry)."""

    __slots__ = ("key",)
    key: int


@dataclass
class StepPeak:
    """The running peak of the current step (live roles as known at that moment)."""

    total: int = -1
    seq: int = 0  # its position in the step's log (see live_at)
    order: int = 0  # the allocation count when it happened: the timeline samples' ``seq``
    phase: int = OTHER_PHASE
    module: int = OUTSIDE
    time: float = 0.0
    by_category: tuple[int, ...] = (0,) * 8
    reserved: int = 0  # the caching-allocator model's reserved bytes then (0 without one)


class StorageLedger:
    """Running byte totals per category and per module, and the current step's peak and log."""

    def __init__(self, *, round_all_to: int = 1, by_ptr: bool = False) -> None:
        #: Key entries by data pointer with no weak references (events backend): tensors then
        #: arrive as :class:`Facts` and allocations and frees through :meth:`alloc` / :meth:`free`.
        self.by_ptr = by_ptr
        #: The clock of peaks and samples (the events backend sets it to the event's time).
        self.clock = time.perf_counter
        #: Charge every storage in blocks of this many bytes (512 models CUDA on fake CPU tensors).
        self.round_all_to = round_all_to
        self.entries: dict[int, Entry] = {}
        self.totals = [0] * 8
        self.total = 0
        # Per module index: live bytes per category, and the most seen.
        self.module_live: list[list[int]] = [[0] * 8]
        self.module_max: list[list[int]] = [[0] * 8]
        # Module stack: frames are [module index, most total bytes seen, kind].
        self.frames: list[list[int]] = []
        self.top: list[int] | None = None
        self.current_module = OUTSIDE
        self.phase = OTHER_PHASE
        self.in_optimizer = False
        self.recording = False  # counting at all (warmup or active)
        self.logging = False  # also keeping the step's log and timeline samples (active)
        self.seq = 0
        self.log: list[Entry | int] = []
        self.samples: list[tuple[int, float, int, int, tuple[int, ...], int]] = []
        self.peak = StepPeak()
        #: The CUDA caching allocator's model (memprof.allocator), fed every storage's
        #: allocation and free in order; None: reserved memory is not modelled.
        self.allocator: CachingAllocatorModel | None = None
        self._free_callback = self._on_free
        #: Source lines for the storages that may be among the largest (see tracking.source).
        self.sources: SourceSampler | None = None
        self.source_floor: int = 1 << 62
        #: The forward source line of autograd nodes, by sequence number (a node's number is its
        #: forward op's): noted where the pack hook took the line of a large saved tensor, so a
        #: backward temporary made while that node runs is charged to the user's forward line.
        #: This step's and the last one's (a graph may outlive one step boundary); ints and
        #: strings only: no node or tensor is kept.
        self.node_sources: dict[int, str] = {}
        self.node_sources_before: dict[int, str] = {}
        #: The sequence number of the autograd node running, as the events replay last saw one.
        self.node = -1
        self._spikes = 0  # keys of spikes: negative, never a storage's id or address
        #: Tensors seen whose memory could not be read, by kind (see :func:`held_tensors`).
        self.uncounted: dict[str, int] = {}

    # ----------------------------------------------------------------- hot path
    def see(self, tensor: torch.Tensor) -> None:
        """Account an operator's output: a new storage is a temporary of the running module."""
        tensor = storage_tensor(tensor)
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse, opaque: free on the hot path
            for part in self.parts(tensor):
                self.see(part)
            return
        entry = self.entries.get(id(storage))
        if entry is not None:
            if entry.raw_nbytes != storage.nbytes():  # resize_ or an out= op grew it
                self._resize(entry, storage, tensor)
            return
        if self.in_optimizer:
            phase = OPTIMIZER
        elif _graph_task_id() != -1:
            phase = BACKWARD
        elif self.frames:
            phase = FORWARD
        else:
            phase = OTHER_PHASE
        if phase != self.phase:
            self.set_phase(phase)
        self.add(storage, tensor, TEMPORARY, self.current_module)

    def add(self, storage: Any, tensor: torch.Tensor, category: int, module: int) -> Entry:
        """Start tracking ``storage`` (whose view ``tensor`` gives shape and dtype)."""
        raw = storage.nbytes()
        nbytes = charged_bytes(raw, tensor, self.round_all_to)
        key = id(storage)
        entry = Entry(key, nbytes, raw, category, module, self.phase, tensor.shape, tensor.dtype)
        ref = _StorageRef(storage, self._free_callback)
        ref.key = key
        entry.ref = ref
        if nbytes >= self.source_floor and self.sources is not None:
            backward = self.phase == BACKWARD and category == TEMPORARY
            source = self.backward_source() if backward else ""
            if source:
                self.sources.admit(nbytes)
            else:
                source = self.sources.take(nbytes)
            entry.source = source
            self.source_floor = self.sources.floor
        return self._insert(entry)

    def alloc(self, key: int, nbytes: int, category: int, module: int,
              shape: tuple[int, ...], dtype: torch.dtype) -> Entry:
        """Start tracking the storage at ``key`` (no weak reference: :meth:`free` ends it)."""
        if key in self.entries:  # its free was missed (allocated before a gap): replace it
            self.free(key)
        entry = Entry(key, nbytes, nbytes, category, module, self.phase, shape, dtype)
        if self.phase == BACKWARD and category == TEMPORARY and self.node >= 0:
            entry.source = self.node_source(self.node)
        return self._insert(entry)

    def _insert(self, entry: Entry) -> Entry:
        key, nbytes, category, module = entry.key, entry.nbytes, entry.category, entry.module
        self.entries[key] = entry
        self.seq += 1
        allocator = self.allocator
        # (An events-backend transient promoted to an entry is already in the model.)
        if allocator is not None and entry.raw_nbytes and key not in allocator.live:
            allocator.malloc(key, entry.raw_nbytes)
        total = self.total + nbytes
        self.total = total
        self._charge(category, module, nbytes)
        top = self.top
        if top is not None and total > top[1]:
            top[1] = total
        if self.logging:
            self.log.append(entry)
            if total > self.peak.total:
                peak = self.peak
                peak.total = total
                peak.seq = len(self.log)
                peak.order = self.seq
                peak.phase = self.phase
                peak.module = self.current_module
                peak.time = self.clock()
                peak.by_category = tuple(self.totals)
                peak.reserved = allocator.reserved if allocator is not None else 0
        return entry

    def _on_free(self, ref: _StorageRef) -> None:
        self.free(ref.key)

    def free(self, key: int) -> None:
        """Stop tracking ``key``; unknown keys (allocated before profiling) are ignored."""
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        if self.allocator is not None:
            self.allocator.free(key)
        nbytes = entry.nbytes
        self.total -= nbytes
        self.totals[entry.category] -= nbytes
        self.module_live[entry.module][entry.category] -= nbytes
        if self.logging:
            self.log.append(entry.key)

    # -------------------------------------------------------------- role changes
    def parts(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """:func:`held_tensors`, noting the tensors it cannot read in :attr:`uncounted`."""
        return held_tensors(tensor, self.uncounted)

    def facts(self, tensor: torch.Tensor) -> list[torch.Tensor | Facts]:
        """What to hand to :meth:`lookup` / :meth:`track` later, one item per storage that
        holds ``tensor``'s memory (a sparse tensor has several): the tensor itself (dispatch,
        applied at once) or its :class:`Facts` (events, applied at replay)."""
        parts = self.parts(tensor)
        return [facts_of(p) for p in parts] if self.by_ptr else list(parts)

    def lookup(self, tensor: torch.Tensor | Facts) -> Entry | None:
        """The entry of ``tensor``'s storage (a sparse tensor's: its indices'), if tracked."""
        if isinstance(tensor, tuple):
            return self.entries.get(tensor[0])
        tensor = storage_tensor(tensor)
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):
            parts = self.parts(tensor)
            if not parts:
                return None
            storage = parts[0].untyped_storage()
        if self.by_ptr:
            return self.entries.get(storage.data_ptr())
        return self.entries.get(id(storage))

    def track(self, tensor: torch.Tensor | Facts, category: int, module: int) -> Entry | None:
        """Give ``tensor``'s storage a role, tracking it first if it is not yet. A tensor held
        in several storages (sparse) gives each the role; one that holds none readable (see
        :func:`held_tensors`) is left untracked (None)."""
        if not isinstance(tensor, tuple) and not (type(tensor) is torch.Tensor
                                                  and tensor.layout is _STRIDED):
            parts = self.parts(tensor)
            if len(parts) != 1 or parts[0] is not storage_tensor(tensor):
                entry = None
                for part in parts:
                    entry = self.track(part, category, module)
                return entry
        if self.by_ptr:
            key, nbytes, shape, dtype = tensor if isinstance(tensor, tuple) else facts_of(tensor)
            entry = self.entries.get(key)
            if entry is None:
                return self.alloc(key, nbytes, category, module, shape, dtype)
            self.learn(entry, (key, nbytes, shape, dtype))
            self.reclassify(entry, category, module)
            return entry
        assert isinstance(tensor, torch.Tensor)
        tensor = storage_tensor(tensor)
        storage = tensor.untyped_storage()
        entry = self.entries.get(id(storage))
        if entry is None:
            return self.add(storage, tensor, category, module)
        self.reclassify(entry, category, module)
        return entry

    def learn(self, entry: Entry, facts: torch.Tensor | Facts, source: str = "") -> None:
        """Give an entry known only from its allocation event (``uint8 [nbytes]``) the shape
        and dtype of the tensor a hook saw in it, and a source line if it has none."""
        if type(facts) is tuple and entry.dtype is RAW_DTYPE and entry.shape == (entry.nbytes,):
            entry.shape, entry.dtype = facts[2], facts[3]
        if source and not entry.source:
            entry.source = source

    def note_node(self, node: int, source: str) -> None:
        """The autograd node numbered ``node`` was made by the forward op at ``source``."""
        if node >= 0 and source:
            self.node_sources[node] = source

    def node_source(self, node: int) -> str:
        """The forward source line of the node numbered ``node`` ("" if not noted)."""
        return self.node_sources.get(node) or self.node_sources_before.get(node, "")

    def backward_source(self) -> str:
        """The forward source line of the autograd node running now ("" outside backward,
        or for a node whose line was not noted)."""
        if not self.node_sources and not self.node_sources_before:
            return ""
        node = _current_node()
        return "" if node is None else self.node_source(node._sequence_nr())

    def rotate_node_sources(self) -> None:
        """A step ends: forget the node lines of the step before it."""
        self.node_sources_before = self.node_sources
        self.node_sources = {}

    def learn_facts(self, facts: Facts, source: str = "") -> None:
        """:meth:`learn` for the entry at ``facts``' address, if one is live."""
        entry = self.entries.get(facts[0])
        if entry is not None:
            self.learn(entry, facts, source)

    def reclassify(self, entry: Entry, category: int, module: int) -> None:
        """Move an entry's bytes to another category and owning module."""
        if entry.category == category and entry.module == module:
            return
        nbytes = entry.nbytes
        self.totals[entry.category] -= nbytes
        self.module_live[entry.module][entry.category] -= nbytes
        entry.category = category
        entry.module = module
        self._charge(category, module, nbytes)

    def _charge(self, category: int, module: int, nbytes: int) -> None:
        """Add bytes to a category's total and to the module's live bytes (and its most seen)."""
        self.totals[category] += nbytes
        live = self.module_live[module]
        live[category] += nbytes
        most = self.module_max[module]
        if live[category] > most[category]:
            most[category] = live[category]

    def _resize(self, entry: Entry, storage: Any, tensor: torch.Tensor) -> None:
        """A storage changed size in place: re-add it at its new size."""
        category, module = entry.category, entry.module
        self.entries.pop(entry.key, None)
        if self.allocator is not None:
            self.allocator.free(entry.key)
        self.total -= entry.nbytes
        self.totals[category] -= entry.nbytes
        self.module_live[module][category] -= entry.nbytes
        if self.logging:
            self.log.append(entry.key)
        entry.ref = None  # drop the old weak reference and its callback
        self.add(storage, tensor, category, module)

    def recharge(self, entry: Entry, nbytes: int) -> None:
        """Charge a tracked storage ``nbytes`` from now on (what the real kernel allocates where
        a fake one allocated another size: see :mod:`memprof.tracking.kernel_corrections`)."""
        ref = entry.ref
        self.free(entry.key)
        fixed = Entry(entry.key, nbytes, entry.raw_nbytes, entry.category, entry.module,
                      entry.phase, entry.shape, entry.dtype)
        fixed.ref = ref
        if self.allocator is not None and nbytes:
            # The allocator model sees the real size (its raw size stays the fake one, which
            # the storage keeps reporting); _insert then finds the key already modelled.
            self.allocator.malloc(entry.key, nbytes)
        self._insert(fixed)

    def unseen_key(self) -> int:
        """A key for memory whose address the ledger never learns (negative: never a
        storage's id or address, nor a spike's)."""
        self._spikes -= 1
        return self._spikes

    def spike(self, nbytes: int) -> None:
        """A moment's scratch of the running op: ``nbytes`` allocated and freed at once."""
        self._spikes -= 1
        self.alloc(self._spikes, nbytes, TEMPORARY, self.current_module, (nbytes,), RAW_DTYPE)
        self.free(self._spikes)

    # ----------------------------------------------------------- modules, phases
    def new_module(self) -> int:
        """Make room for one more module; returns its index."""
        self.module_live.append([0] * 8)
        self.module_max.append([0] * 8)
        return len(self.module_live) - 1

    def push_frame(self, module: int, kind: int) -> None:
        frame = [module, self.total, kind]
        self.frames.append(frame)
        self.top = frame
        self.current_module = module

    def pop_frame(self) -> list[int]:
        """Pop the top frame; its peak also counts for the frame below it."""
        frame = self.frames.pop()
        if self.frames:
            below = self.frames[-1]
            if frame[1] > below[1]:
                below[1] = frame[1]
            self.top = below
            self.current_module = below[0]
        else:
            self.top = None
            self.current_module = OUTSIDE
        return frame

    def set_phase(self, phase: int) -> None:
        self.phase = phase
        self.sample()

    def sample(self) -> None:
        """Record a timeline point (only in active steps)."""
        if self.logging:
            self.samples.append(
                (self.seq, self.clock(), self.phase, self.current_module, tuple(self.totals),
                 self.allocator.reserved if self.allocator is not None else 0)
            )

    # ----------------------------------------------------------------- steps
    def begin_step(self) -> dict[int, Entry]:
        """Reset the per-step peak, log and samples; returns the live entries at the start."""
        self.log = []
        self.samples = []
        self.peak = StepPeak(total=self.total, seq=0, order=self.seq, phase=self.phase,
                             module=self.current_module, time=self.clock(),
                             by_category=tuple(self.totals),
                             reserved=self.allocator.reserved if self.allocator else 0)
        self.sample()
        return dict(self.entries)

    def restart_peak(self) -> StepPeak:
        """Start the running peak afresh from the live bytes now (a fake run reads the peak of
        one optimizer's step of several after a shared backward); returns the one replaced,
        for the caller to put back."""
        replaced = self.peak
        self.peak = StepPeak(total=self.total, seq=len(self.log), order=self.seq,
                             phase=self.phase, module=self.current_module, time=self.clock(),
                             by_category=tuple(self.totals))
        return replaced

    def live_at(self, start: dict[int, Entry], seq: int) -> list[Entry]:
        """Replay the step's log up to position ``seq`` from its starting live set."""
        live = dict(start)
        for item in self.log[:seq]:
            if type(item) is int:
                live.pop(item, None)
            else:
                assert isinstance(item, Entry)
                live[item.key] = item
        return list(live.values())

    def clear(self) -> None:
        """Forget every storage. Dropping the weak references also drops their callbacks."""
        for entry in self.entries.values():
            entry.ref = None
        self.entries.clear()
        self.log = []
        self.samples = []


keep_out_of_dynamo(StorageLedger.see, StorageLedger.free, StorageLedger._on_free, facts_of)
