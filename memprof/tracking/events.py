"""The events backend: allocations as the allocators report them, roles from hooks.

The allocations come from an :class:`EventSource`: memprof's C++ recorder
(:mod:`memprof.tracking.native`; each allocation one locked append) where it can be built, else
the PyTorch profiler's C++ side with ``profile_memory``, recording only user-scope
record_functions, autograd-node events and allocations. Neither runs per-op Python. memprof's
hooks do not touch the ledger while the step runs; each one captures facts (module index, data
pointers, sizes, shapes) and leaves a *marker* (an event whose value indexes a Python payload of
deferred calls). Facts that need no exact ordering (what autograd saved inside a module, fresh
gradients) are buffered and ride on the next marker: the tensor is still alive then, so the live
allocation at its address is the right one (a tensor saved outside modules gets a marker of its
own: the next one may come in backward, after its free). :meth:`EventStream.replay` walks
allocations and markers in order and drives the same ledger and the same hook bodies the
dispatch backend uses, keyed by data pointer.

The events are read and replayed only every few steps and at exit. Most of them are transient
allocations (freed again before the next marker: an operator's scratch, every temporary of an
optimizer step, 70% of the events of 600 small modules): the replay's walk (``walk.cpp``, or
:class:`_Walk` where it cannot be built) keeps them from the ledger, feeds them to the caching
allocator's model (in C++ too: ``allocator_model.cpp``) and hands Python only what the ledger
must see. With the PyTorch profiler as source, reading its events costs another ~2.7x a step
(torch post-processes every event, ~5 us each, holding the GIL, and its event tree is read
through pybind, ~3 us an event).
"""

from __future__ import annotations

import gc
import time
from array import array
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch._C._autograd import _disable_profiler, _enable_profiler, _prepare_profiler
from torch._C._profiler import (
    ProfilerActivity,
    ProfilerConfig,
    ProfilerState,
    RecordScope,
    _EventType,
    _ExperimentalConfig,
)

from memprof.tracking import native
from memprof.tracking.ledger import RAW_DTYPE, TEMPORARY, StorageLedger
from memprof.tracking.prior import PriorStorages, end_prior

PREFIX = "memprof::"
POINT = PREFIX + "p"
INTERVAL = PREFIX + "i"
_SKIP = len(POINT)
_ALLOCATION = _EventType.Allocation
_TORCH_OP = _EventType.TorchOp
_BACKWARD_SCOPE = RecordScope.BACKWARD_FUNCTION
# The C++ entry point of ``_record_function_enter_new`` itself: the OpOverload wrappers cost
# ~30 us a marker in Python (the exit op scans its arguments for fake script objects), this
# ~3.5 us. No exit call is needed: the RecordFunction ends when its handle is dropped, so a
# point marker drops it at once and an interval marker when :meth:`EventStream.exit` runs.
_enter = getattr(
    torch.ops.profiler._record_function_enter_new.default,
    "_op",
    torch.ops.profiler._record_function_enter_new,
)

# Ranks at equal times: enters, then allocations, then exits.
_ENTER, _ALLOC, _EXIT = 0, 1, 2
#: The events' ``ptr`` where they are no allocation (see :class:`EventSource`).
_MARKER, _NODE, _MODULE_BACKWARD, _SEALED = -1, -2, -3, -4


class EventSource(Protocol):
    """Where the events come from: the allocations, markers and autograd-node starts of the
    program, as ``(time_ns, ptr, value)`` triples in order. ``ptr > 0``: an allocation
    (``value`` = +bytes) or a free (-bytes); ``ptr == -1``: marker ``value``; ``ptr == -2``:
    an autograd node started (backward is running), ``value`` its sequence number (the one its
    forward op had; -1 where none, as for AccumulateGrad). The recorder also gives ``ptr ==
    -3``: module ``value``'s backward started (a point marker calling ``on_module_backward``),
    and ``ptr == -4``: marker ``value``'s calls wait for the next marker of either kind
    (:meth:`EventStream.seal`)."""

    name: str
    offset_s: float  # perf_counter seconds minus the source's clock in seconds

    def start(self) -> None: ...

    def stop(self) -> list[tuple[int, int, int]]: ...

    def stop_raw(self) -> bytes: ...

    def drain_raw(self) -> bytes: ...

    def mark(self, index: int) -> None: ...

    def open(self, index: int) -> Any: ...

    def close(self, handle: Any, index: int) -> None: ...

    def pending(self) -> int: ...


class RecorderSource:
    """memprof's C++ recorder (:mod:`memprof.tracking.native`): each allocation is one locked
    append, each marker one call, and reading the events is a copy."""

    name = "recorder"

    def __init__(self, module: Any) -> None:
        self.module = module
        self.offset_s = 0.0
        self.buffer_bytes = 0  # the most its C++ buffer held (bookkeeping outside Python's heap)
        #: Opening and closing an interval are plain marks here: the event stream calls this
        #: C++ function itself (no Python frame per marker).
        self.direct_mark = module.mark

    def start(self) -> None:
        self.module.start()
        self.offset_s = time.perf_counter() - self.module.now_ns() / 1e9

    def stop(self) -> list[tuple[int, int, int]]:
        return _triples(self.stop_raw())

    def stop_raw(self) -> bytes:
        """:meth:`stop`'s events as native int64 triples."""
        raw: bytes = self.module.stop()
        self.buffer_bytes = max(self.buffer_bytes, len(raw))
        return raw

    def drain_raw(self) -> bytes:
        raw: bytes = self.module.drain()
        self.buffer_bytes = max(self.buffer_bytes, self.module.high_water_bytes())
        return raw

    def pending(self) -> int:
        return int(self.module.pending())

    def mark(self, index: int) -> None:
        self.module.mark(index)

    def open(self, index: int) -> Any:
        self.module.mark(index)
        return True

    def close(self, handle: Any, index: int) -> None:
        self.module.mark(index)

    # The module backward starts, marked from C++ (recorder.cpp: no Python runs in backward
    # for them); the replay applies each as a point marker calling ``on_module_backward``.
    def seal(self, index: int) -> None:
        self.module.seal(index)

    def watch_backward(self, output: torch.Tensor, module: int) -> None:
        self.module.watch_backward(output, module)

    def set_live(self, live: bool) -> None:
        self.module.set_live(live)

    def on_backward_end(self, callback: Callable[[], None] | None) -> None:
        self.module.on_backward_end(callback)


def _triples(raw: bytes) -> list[tuple[int, int, int]]:
    values = array("q")
    values.frombytes(raw)
    it = iter(values)
    return list(zip(it, it, it, strict=True))


def _raw(items: list[tuple[int, int, int]]) -> bytes:
    """Triples as native int64s (what the recorder gives)."""
    return array("q", [value for item in items for value in item]).tobytes()


class ProfilerSource:
    """The PyTorch profiler's C++ side with ``profile_memory``, recording only user-scope
    record_functions (the markers) and autograd nodes: no compiler needed, but stopping it
    post-processes every event (~5 us each) and its event tree is read through pybind."""

    name = "torch.profiler"

    def __init__(self) -> None:
        self.config = ProfilerConfig(
            ProfilerState.KINETO, False, True, False, False, False, _ExperimentalConfig()
        )
        self.offset_s = 0.0

    def start(self) -> None:
        activities = {ProfilerActivity.CPU}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            activities.add(ProfilerActivity.CUDA)
        _prepare_profiler(self.config, activities)
        _enable_profiler(  # type: ignore[call-arg]
            self.config, activities, {RecordScope.USER_SCOPE, RecordScope.BACKWARD_FUNCTION}
        )
        self.offset_s = time.perf_counter() - time.time_ns() / 1e9

    def stop(self) -> list[tuple[int, int, int]]:
        items = self._items(list(_disable_profiler().experimental_event_tree()))
        return [(when, ptr, value) for when, _rank, _seq, ptr, value in items]

    def drain(self) -> list[tuple[int, int, int]]:
        items = self.stop()
        self.start()
        return items

    def stop_raw(self) -> bytes:
        return _raw(self.stop())

    def drain_raw(self) -> bytes:
        return _raw(self.drain())

    def mark(self, index: int) -> None:
        _enter(POINT + str(index), None)  # dropped at once: a zero-length record

    def open(self, index: int) -> Any:
        return _enter(INTERVAL + str(index), None)

    def close(self, handle: Any, index: int) -> None:
        pass  # the caller drops the handle, the only reference: the record ends then

    def pending(self) -> int:
        return 0  # not known before its stop

    @staticmethod
    def _items(roots: list[Any]) -> list[tuple[int, int, int, int, int]]:
        """The events as ``(time, rank, seq, ptr, value)`` in time order: allocations (ptr, signed
        size), markers (-1, payload index) and autograd nodes (-2, sequence number). The tree
        is walked in order, so ``seq`` keeps a thread's order between events with equal
        times."""
        items: list[tuple[int, int, int, int, int]] = []
        append = items.append
        seq = 0
        stack = list(roots)
        stack.reverse()
        pop, extend = stack.pop, stack.extend
        while stack:
            node = pop()
            tag, fields = node.typed
            seq += 1
            if tag == _ALLOCATION:
                append((node.start_time_ns, _ALLOC, seq, fields.ptr, fields.alloc_size))
                continue
            if tag == _TORCH_OP:
                name = node.name
                if name.startswith(PREFIX):
                    index = int(name[_SKIP:])
                    append((node.start_time_ns, _ENTER, seq, -1, index))
                    if name.startswith(INTERVAL):
                        append((node.end_time_ns, _EXIT, seq, -1, index + 1))
                elif fields.scope == _BACKWARD_SCOPE:
                    append((node.start_time_ns, _ENTER, seq, -2, fields.sequence_number))
            children = node.children
            if children:
                children.reverse()
                extend(children)
        items.sort()
        return items


#: Which source the events backend uses: "auto" (the recorder where it can be built, else the
#: PyTorch profiler), "recorder" or "torch.profiler" (tests and benchmarks compare them).
PREFERRED_SOURCE = "auto"


def default_source() -> EventSource:
    """The source :data:`PREFERRED_SOURCE` names."""
    if PREFERRED_SOURCE == "torch.profiler":
        return ProfilerSource()
    module = native.load()
    if module is not None:
        return RecorderSource(module)
    if PREFERRED_SOURCE == "recorder":
        raise RuntimeError(f"memprof's recorder cannot be built: {native.unavailable_reason()}")
    return ProfilerSource()


class EventStream:
    """Keeps the C++ profiler running and turns its events back into ledger updates."""

    def __init__(
        self,
        ledger: StorageLedger,
        alloc_phase: Callable[[], None],
        on_backward_node: Callable[[int], None],
        source: EventSource | None = None,
        on_module_backward: Callable[[int], None] | None = None,
        next_phase: Callable[[bool], int] | None = None,
    ) -> None:
        self.ledger = ledger
        self._alloc_phase = alloc_phase
        #: The phase ``alloc_phase`` would set now (True: once an autograd node started), so
        #: that the walk stops for it only where it changes (None: stop at every first one).
        self._next_phase = next_phase
        self._on_backward_node = on_backward_node
        self._on_module_backward = on_module_backward
        #: Sealed markers met by the replay, waiting for the next marker of either kind.
        self._sealed: list[int] = []
        self.source = source if source is not None else default_source()
        self.running = False
        #: Storages tracked before recording started, whose frees no event reports: each
        #: marker first ends the entries of those that died since the last one.
        self.prior = PriorStorages(ledger)
        # Deferred calls, flat: [function code, number of arguments, *arguments] one after the
        # other, so that what waits for the replay (up to EVENTS_FLUSH_STEPS steps of it) is
        # ints and facts, not a list, a tuple and a bound method per call for the cyclic GC
        # to scan again and again. Marker ``base + i`` owns calls[starts[i]:ends[i]] (-1:
        # none, or already applied); calls from ``mark`` on wait for the next marker.
        self.calls: list[Any] = []
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.base = 0
        self.mark = 0
        self._codes: dict[Callable[..., Any], int] = {}
        self._fns: list[Callable[..., Any]] = []
        #: The source's mark function where opening and closing an interval are marks (the
        #: recorder's), called directly on the hot path; None: the source's open and close.
        self._direct_mark: Callable[[int], None] | None = getattr(self.source, "direct_mark",
                                                                  None)
        # Seconds spent in flushes, for the benchmark: all of it, and the part reading the
        # events (the C++ profiler's post-processing, stop and restart; the recorder's drain).
        self.replay_s = 0.0
        self.stop_s = 0.0

    # ------------------------------------------------------------- live side
    def start(self) -> None:
        self.source.start()
        self.running = True

    def stop(self) -> bytes:
        """Stop recording; returns the events not replayed yet (native int64 triples)."""
        if not self.running:
            return b""
        self.running = False
        return self.source.stop_raw()

    def clear(self) -> None:
        """Forget every deferred call (and the functions they name)."""
        self.prior.clear()
        self.calls, self.starts, self.ends = [], [], []
        self.mark = 0
        self._codes.clear()
        self._fns.clear()

    def buffer(self, fn: Callable[..., Any], *args: Any) -> None:
        """A fact for the next marker."""
        code = self._codes.get(fn)
        if code is None:
            code = self._code(fn)
        calls = self.calls
        calls.append(code)
        calls.append(len(args))
        calls += args

    def _code(self, fn: Callable[..., Any]) -> int:
        """``fn``'s number in the deferred calls, given the first time it is buffered."""
        code = self._codes[fn] = len(self._fns)
        self._fns.append(fn)
        return code

    def _close(self) -> int:
        """The marker owning the calls buffered so far (the last one its own): its index."""
        self.starts.append(self.mark)
        self.mark = len(self.calls)
        self.ends.append(self.mark)
        return self.base + len(self.starts) - 1

    def _end_dead_prior(self) -> None:
        """Buffer the ends of the prior storages that died since the last marker."""
        for ptr, entry in self.prior.take():
            self.buffer(end_prior, self.ledger, ptr, entry)

    def point(self, fn: Callable[..., Any], *args: Any) -> None:
        """A point marker: the buffered facts, then ``fn(*args)``, at this moment."""
        if self.prior.died:
            self._end_dead_prior()
        self.buffer(fn, *args)
        index = self._close()
        if self.running:
            mark = self._direct_mark
            if mark is not None:
                mark(index)
            else:
                self.source.mark(index)

    def seal(self) -> None:
        """The facts buffered so far become a marker of their own, applied just before the
        next marker of either kind: a module's backward start, which the recorder marks
        without Python, finds them applied as a Python marker would have."""
        if self.prior.died:
            self._end_dead_prior()
        index = self._close()
        if self.running:
            self.source.seal(index)  # type: ignore[attr-defined]

    def enter(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Open an interval marker (its exit comes with :meth:`exit`); returns its token."""
        if self.prior.died:
            self._end_dead_prior()
        # (buffer() and _close() inline: this runs twice per module call)
        code = self._codes.get(fn)
        if code is None:
            code = self._code(fn)
        calls = self.calls
        calls.append(code)
        calls.append(len(args))
        calls += args
        starts, ends = self.starts, self.ends
        starts.append(self.mark)
        self.mark = end = len(calls)
        ends.append(end)
        index = self.base + len(starts) - 1
        starts.append(-1)  # the exit's calls, filled in by exit()
        ends.append(-1)
        if not self.running:
            return [None, index]
        mark = self._direct_mark
        if mark is not None:
            mark(index)
            return [True, index]
        return [self.source.open(index), index]

    def exit(self, token: list[Any], fn: Callable[..., Any], *args: Any) -> None:
        slot = token[1] + 1 - self.base
        if slot < 0:  # opened before the last flush: its exit replayed then, empty
            token[0] = None
            self.point(fn, *args)
            return
        code = self._codes.get(fn)
        if code is None:
            code = self._code(fn)
        calls = self.calls
        calls.append(code)
        calls.append(len(args))
        calls += args
        self.starts[slot] = self.mark
        self.mark = end = len(calls)
        self.ends[slot] = end
        handle, token[0] = token[0], None
        if handle is not None and self.running:
            mark = self._direct_mark
            if mark is not None:
                mark(token[1] + 1)
            else:
                self.source.close(handle, token[1] + 1)

    def _raise_maxima(self, extra: int) -> None:
        """Transients holding ``extra`` bytes on top of the ledger's: they count towards the
        running maxima it keeps (the frame's peak, the module's temporary peak)."""
        ledger = self.ledger
        total = ledger.total + extra
        top = ledger.top
        if top is not None and total > top[1]:
            top[1] = total
        module = ledger.current_module
        live = ledger.module_live[module][TEMPORARY] + extra
        most = ledger.module_max[module]
        if live > most[TEMPORARY]:
            most[TEMPORARY] = live

    def _enter_live(self, transients: list[tuple[int, int]]) -> None:
        """Transients the walk held become entries of the running module."""
        ledger = self.ledger
        for key, size in transients:
            ledger.alloc(key, size, TEMPORARY, ledger.current_module, (size,), RAW_DTYPE)

    def _apply(self, index: int) -> None:
        """Run marker ``index``'s deferred calls (once)."""
        slot = index - self.base
        if slot < 0 or slot >= len(self.starts):
            return
        j = self.starts[slot]
        if j < 0:
            return
        end = self.ends[slot]
        self.starts[slot] = -1
        calls, fns = self.calls, self._fns
        while j < end:
            n = calls[j + 1]
            fns[calls[j]](*calls[j + 2 : j + 2 + n])
            j += 2 + n

    # ----------------------------------------------------------------- replay
    def flush(self, restart: bool) -> None:
        """Stop the profiler, replay its events into the ledger, and start it again."""
        started = time.perf_counter()
        if restart and self.running:
            raw = self.source.drain_raw()  # the profiler source stops and restarts itself
        else:
            raw = self.stop()
            if restart:
                self.start()
        self.stop_s += time.perf_counter() - started
        # The replay makes a tuple per event and frees them all at the end, and runs no user
        # code: the cyclic GC would only rescan them (and everything else) many times over.
        gc_enabled = gc.isenabled()
        gc.disable()
        try:
            self.replay(raw)
        finally:
            if gc_enabled:
                gc.enable()
        self.replay_s += time.perf_counter() - started

    def replay(self, raw: bytes) -> None:
        """Drive the ledger with the events ``raw`` holds (native int64 triples; see
        :class:`EventSource` for their form)."""
        ledger = self.ledger
        offset = self.source.offset_s
        walk = _walk(raw, ledger)
        run, materialize = walk.run, walk.materialize
        now = 0.0
        # The phase depends only on what the markers' calls set: once an interval is enough,
        # and only where it changes the phase (where ``next_phase`` tells).
        phase_set = False
        next_phase = self._next_phase
        needs: tuple[bool, bool] | None = None  # (need_phase, node_phase); None: to work out
        ledger.clock = lambda: now
        try:
            while True:
                if needs is None:
                    if next_phase is None:
                        needs = (not phase_set, True)
                    else:
                        current = ledger.phase
                        needs = (not phase_set and next_phase(False) != current,
                                 next_phase(True) != current)
                code, when, ptr, value, most, node, sealed = run(
                    ledger.recording, ledger.logging, needs[0], needs[1],
                    ledger.peak.total - ledger.total,
                )
                # What the walk passed over on the way: autograd nodes (the last one counts),
                # sealed markers (kept for the next marker).
                if node != _NO_NODE:
                    self._on_backward_node(node)
                    phase_set = False
                    needs = None
                if sealed is not None:
                    self._sealed.extend(sealed)
                if most >= 0:
                    # The ledger's totals did not change while the walk ran: the moment the
                    # transients held the most is the one that counts.
                    self._raise_maxima(most)
                if code == _EVENT:
                    if ptr < 0:
                        now = when / 1e9 + offset
                        if walk.extra:  # (cannot happen: no transient outlives a marker)
                            self._enter_live(materialize())
                        phase_set = False
                        needs = None
                        if self._sealed:
                            for index in self._sealed:
                                self._apply(index)
                            self._sealed.clear()
                        if ptr == _MARKER:
                            self._apply(value)
                        elif self._on_module_backward is not None:
                            self._on_module_backward(value)
                    elif value > 0:  # not a transient: an entry of its own
                        now = when / 1e9 + offset
                        ledger.alloc(
                            ptr, value, TEMPORARY, ledger.current_module, (value,), RAW_DTYPE
                        )
                        extra = walk.extra
                        if extra:  # the live transients count towards the maxima too
                            self._raise_maxima(extra)
                            if ledger.logging and ledger.total + extra > ledger.peak.total:
                                self._enter_live(materialize())
                    else:
                        ledger.free(ptr)
                elif code == _PHASE:
                    now = when / 1e9 + offset
                    self._alloc_phase()
                    phase_set = True
                    needs = None
                elif code == _PEAK:
                    # A transient raised the step's peak: the peak's breakdown lists the live
                    # ones, so they become entries (their frees then go through the ledger).
                    now = when / 1e9 + offset
                    self._enter_live(materialize())
                else:
                    break
        finally:
            ledger.clock = time.perf_counter
        # Markers whose events were never recorded (the profiler was off): apply them now.
        for slot in range(len(self.starts)):
            self._apply(self.base + slot)
        self._sealed.clear()
        # Keep the calls still waiting for a marker; an interval open now exits as a point.
        self.calls = self.calls[self.mark :]
        self.mark = 0
        self.base += len(self.starts)
        self.starts, self.ends = [], []


#: What :meth:`_Walk.run` stopped at: an event for the ledger (a marker, an
#: allocation that is not a transient, a free the walk does not hold), the first allocation
#: after a marker (its phase to set; the walk gives it again), a transient that made a new
#: peak, or the end of the events.
_EVENT, _PHASE, _PEAK, _END = 0, 1, 2, 3
_TRANSIENT, _FREED_NEXT = 1, 2  # event flags: freed before the next marker; freed by the next
_NO_NODE = -2  # :meth:`_Walk.run`: no autograd node started since its last return


class _Walk:
    """The replay's walk over one flush's events, in Python (where memprof's C++ module cannot
    be built, or the allocator's model is the Python one); ``walk.cpp`` is the same in C++.

    Transient allocations (allocations freed again before the next marker, whose address
    the ledger does not hold) stay in the walk: their bytes count (:attr:`extra`, and the most
    they held since the last stop), the allocator's model gets them (one freed by the very next
    event as one ``malloc_free``), and the ledger never sees them unless they make a new peak
    (:meth:`materialize`). Everything else stops the walk for the ledger to handle.
    """

    def __init__(self, raw: bytes, entries: dict[int, Any], allocator: Any) -> None:
        self.items = _triples(raw)
        self.flags = _flags(self.items)
        self.entries = entries
        self.allocator = allocator
        self.pos = 0
        self.extra = 0
        self.live: dict[int, int] = {}
        self.served = 0  # a transient the allocator model served as malloc_free (0: none)
        self.pending: tuple[int, int] | None = None  # the peak's transient, to be malloc'ed

    def run(self, recording: bool, logging: bool, need_phase: bool, node_phase: bool,
            threshold: int) -> tuple[int, int, int, int, int, int, list[int] | None]:
        """Walk on until the ledger must act: ``(what, time, ptr, value, most, node,
        sealed)``, ``most`` the most bytes the transients held since the last stop (-1: no
        transient allocated), ``node`` the last autograd node started since then
        (:data:`_NO_NODE`: none) and ``sealed`` the sealed markers passed (None: none).
        ``need_phase``: stop at the next recorded allocation for its phase (``_PHASE``);
        ``node_phase``: the same once an autograd node started."""
        items, flags, live, allocator = self.items, self.flags, self.live, self.allocator
        most = -1
        node = _NO_NODE
        sealed: list[int] | None = None
        pos = self.pos
        try:
            while pos < len(items):
                when, ptr, value = items[pos]
                if ptr < 0:
                    pos += 1
                    if ptr == _NODE:
                        node = value
                        need_phase = node_phase
                        continue
                    if ptr == _SEALED:
                        sealed = [value] if sealed is None else [*sealed, value]
                        continue
                    return _EVENT, when, ptr, value, most, node, sealed
                if value > 0:
                    if not recording:
                        pos += 1
                        continue
                    if need_phase:
                        return _PHASE, when, ptr, value, most, node, sealed
                    if not flags[pos] & _TRANSIENT or ptr in self.entries:
                        pos += 1
                        return _EVENT, when, ptr, value, most, node, sealed
                    live[ptr] = value
                    self.extra += value
                    paired = False
                    if allocator is not None:
                        paired = bool(flags[pos] & _FREED_NEXT) and ptr not in allocator.live
                        if not paired:
                            allocator.malloc(ptr, value)
                    if self.extra > most:
                        most = self.extra
                    pos += 1
                    if logging and self.extra > threshold:
                        self.pending = (ptr, value) if paired else None
                        return _PEAK, when, ptr, value, most, node, sealed
                    if paired:
                        allocator.malloc_free(value)
                        self.served = ptr
                    continue
                size = live.pop(ptr, 0)
                pos += 1
                if not size:
                    return _EVENT, when, ptr, value, most, node, sealed
                self.extra -= size
                if ptr == self.served:
                    self.served = 0
                elif allocator is not None:
                    allocator.free(ptr)
            return _END, 0, 0, 0, most, node, sealed
        finally:
            self.pos = pos

    def materialize(self) -> list[tuple[int, int]]:
        """The live transients as ``(ptr, bytes)`` in allocation order; they leave the walk.
        A peak's transient that was to be served at once goes to the model as a malloc."""
        if self.pending is not None:
            self.allocator.malloc(*self.pending)
            self.pending = None
        out = list(self.live.items())
        self.live.clear()
        self.extra = 0
        return out


def _walk(raw: bytes, ledger: StorageLedger) -> Any:
    """The C++ walk where memprof's module is built and the allocator model (if any) is its
    C++ one, else :class:`_Walk`."""
    allocator = ledger.allocator
    core = getattr(allocator, "core", None)
    module = native.load() if allocator is None or core is not None else None
    if module is not None and hasattr(module, "Walk"):
        return module.Walk(raw, ledger.entries, core)
    return _Walk(raw, ledger.entries, allocator)


def _flags(items: list[tuple[int, int, int]]) -> bytearray:
    """Per event: :data:`_TRANSIENT` for an allocation and its free both before the next
    marker or node; :data:`_FREED_NEXT` for an allocation whose free is the very next event."""
    flags = bytearray(len(items))
    open_: dict[int, int] = {}
    last = len(items) - 1
    for i, (_when, ptr, value) in enumerate(items):
        if ptr < 0:
            if open_ and ptr != _SEALED:  # (a sealed marker is no marker yet)
                open_.clear()
        elif value > 0:
            open_[ptr] = i
            if i < last and items[i + 1][1] == ptr and items[i + 1][2] == -value:
                flags[i] |= _FREED_NEXT
        else:
            j = open_.pop(ptr, None)
            if j is not None:
                flags[j] |= _TRANSIENT
                flags[i] |= _TRANSIENT
    return flags
