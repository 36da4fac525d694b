"""A replay of PyTorch's CUDA caching allocator: reserved memory and fragmentation.

What a user sees fill up (``nvidia-smi``, the "reserved by PyTorch" of an out-of-memory message)
is the caching allocator's *reserved* memory: whole segments taken from the driver and kept,
whatever part of them live tensors occupy. :func:`replay` runs an ordered sequence of allocation
requests and frees through a model of the native allocator of ``c10/cuda/CUDACachingAllocator.cpp``
(torch 2.x, read for torch 2.13) and says what it would have reserved.

Modelled, one stream, one device:

* request rounding: 512-byte blocks, or ``roundup_power2_divisions`` (per power-of-two interval
  from 1 MiB; ``N`` or ``[256:1,512:2,>:8]`` with sizes in MiB);
* two pools: requests up to 1 MiB from 2 MiB segments; larger ones from 20 MiB segments while
  under 10 MiB, else from a segment of their own rounded up to 2 MiB;
* best fit: the smallest free block that fits, the lowest address among equals; blocks of at
  least ``max_split_size_mb`` serve only requests of at least that size, and those only when the
  block is under the request plus ``max_non_split_rounding_mb`` (20 MiB by default);
* splitting: a small-pool block always splits when 512 bytes or more remain; a large block only
  for requests under ``max_split_size_mb`` leaving more than 1 MiB; frees merge free neighbours;
* when no cached block fits and the device is full (a ``capacity`` was given): free one cached
  oversize block (``max_split_size_mb`` set), then every cached unsplit segment, and retry;
  ``garbage_collection_threshold`` (needs ``memory_fraction``) frees aged unsplit large blocks
  before a new segment is taken;
* ``expandable_segments:True``: one segment per pool that grows by 2 MiB (small pool) or 20 MiB
  (large pool) pages; the growing tail block is avoided while another free block fits.

Not modelled: several streams (``record_stream``, cross-stream frees waiting on events), CUDA graph
private pools, ``cudaMallocAsync`` (``backend:cudaMallocAsync``), IPC, and unmapping free pages in
the middle of an expandable segment on an out-of-memory (only its free tail is unmapped here).
Allocated bytes are the blocks handed out (``torch.cuda.memory_allocated`` counts the same: a
block not split keeps its whole size).

Example::

    from memprof import allocator
    r = allocator.replay([("alloc", 1, 5 * 2**20), ("free", 1, 5 * 2**20)])
    r.reserved_peak_bytes   # 20 MiB: a 5 MiB request takes a 20 MiB segment
"""

from __future__ import annotations

import os
import re
from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from memprof.dict_record import DictRecord
from memprof.errors import AllocatorConfError, AllocatorOOM

MiB = 1024 * 1024
#: Constants of CUDACachingAllocator.cpp.
MIN_BLOCK = 512
SMALL_SIZE = 1 * MiB
SMALL_BUFFER = 2 * MiB
MIN_LARGE_ALLOC = 10 * MiB
ROUND_LARGE = 2 * MiB
LARGE_BUFFER = 20 * MiB
#: ``roundup_power2_divisions`` has 16 intervals, the first starting at 1 MiB (log2 = 20).
_ROUNDUP_INTERVALS = 16
_ROUNDUP_START_LOG2 = 20
_NO_LIMIT = 2**63 - 1
#: An expandable segment reserves address space for 1 1/8 of the device; with no capacity known
#: its unmapped tail is taken as unbounded.
_UNBOUNDED = 2**62
#: The key :meth:`CachingAllocatorModel.malloc_free` serves its request under when it must.
_TEMPORARY_KEY = -(2**63)

#: Options the native allocator reads but that do not change reserved memory on one stream.
_IGNORED_OPTIONS = frozenset(
    {
        "release_lock_on_cudamalloc",
        "pinned_use_cuda_host_register",
        "pinned_num_register_threads",
        "pinned_use_background_threads",
        "pinned_reserve_segment_size_mb",
        "graph_capture_record_stream_reuse",
    }
)


@dataclass(frozen=True)
class AllocatorConf:
    """The caching allocator's options, as ``PYTORCH_CUDA_ALLOC_CONF`` sets them."""

    max_split_size: int = _NO_LIMIT
    max_non_split_rounding: int = LARGE_BUFFER
    roundup_power2_divisions: tuple[int, ...] = (0,) * _ROUNDUP_INTERVALS
    garbage_collection_threshold: float = 0.0
    expandable_segments: bool = False
    text: str = ""
    ignored: tuple[str, ...] = ()

    def with_options(self, extra: str) -> AllocatorConf:
        """This configuration with ``extra`` options on top (``"expandable_segments:True"``)."""
        joined = ",".join(part for part in (self.text, extra) if part)
        return parse_conf(joined)


def parse_conf(text: str | None) -> AllocatorConf:
    """Read a ``PYTORCH_CUDA_ALLOC_CONF`` string; :class:`AllocatorConfError` if it is malformed."""
    text = (text or "").strip()
    values: dict[str, object] = {}
    ignored: list[str] = []
    for key, value in _options(text):
        if key == "max_split_size_mb":
            mb = _int(key, value)
            if mb < LARGE_BUFFER // MiB:  # torch 2.8+ (AcceleratorAllocatorConfig): >= 20
                raise AllocatorConfError(
                    f"PYTORCH_CUDA_ALLOC_CONF: max_split_size_mb too small, must be >= "
                    f"{LARGE_BUFFER // MiB} (got {mb})"
                )
            values["max_split_size"] = min(mb * MiB, _NO_LIMIT)
        elif key == "max_non_split_rounding_mb":
            values["max_non_split_rounding"] = _int(key, value) * MiB
        elif key == "roundup_power2_divisions":
            values["roundup_power2_divisions"] = _divisions(value)
        elif key == "garbage_collection_threshold":
            try:
                threshold = float(value)
            except ValueError:
                raise AllocatorConfError(
                    f"PYTORCH_CUDA_ALLOC_CONF: garbage_collection_threshold must be a number, "
                    f"not {value!r}"
                ) from None
            if not 0.0 < threshold < 1.0:
                raise AllocatorConfError(
                    "PYTORCH_CUDA_ALLOC_CONF: garbage_collection_threshold must be between 0.0 "
                    f"and 1.0 (got {value})"
                )
            values["garbage_collection_threshold"] = threshold
        elif key == "expandable_segments":
            if value not in ("True", "False"):
                raise AllocatorConfError(
                    f"PYTORCH_CUDA_ALLOC_CONF: expandable_segments must be True or False, "
                    f"not {value!r}"
                )
            values["expandable_segments"] = value == "True"
        elif key == "backend":
            if value != "native":
                raise AllocatorConfError(
                    f"PYTORCH_CUDA_ALLOC_CONF: backend:{value} is not modelled (memprof replays "
                    "the native caching allocator only)"
                )
        elif key in _IGNORED_OPTIONS:
            ignored.append(key)
        else:
            raise AllocatorConfError(f"PYTORCH_CUDA_ALLOC_CONF: unknown option {key!r}")
    return AllocatorConf(text=text, ignored=tuple(ignored), **values)  # type: ignore[arg-type]


def conf_from_environment() -> str:
    """The allocator configuration this process would use (``PYTORCH_CUDA_ALLOC_CONF``, or the
    newer ``PYTORCH_ALLOC_CONF``), ``""`` if neither is set."""
    return os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF") or ""


def _options(text: str) -> list[tuple[str, str]]:
    """Split ``a:1,b:[x:1,y:2]`` into key/value pairs (commas inside brackets stay)."""
    out: list[tuple[str, str]] = []
    for part in re.split(r",(?![^\[]*\])", text):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition(":")
        if not sep or not value.strip():
            raise AllocatorConfError(
                f"PYTORCH_CUDA_ALLOC_CONF: expected option:value, got {part!r}"
            )
        out.append((key.strip(), value.strip()))
    return out


def _int(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise AllocatorConfError(
            f"PYTORCH_CUDA_ALLOC_CONF: {key} must be an integer, not {value!r}"
        ) from None
    if number < 0:
        raise AllocatorConfError(f"PYTORCH_CUDA_ALLOC_CONF: {key} must not be negative")
    return number


def _power_of_two(key: str, number: int) -> None:
    if number & (number - 1):
        raise AllocatorConfError(
            f"PYTORCH_CUDA_ALLOC_CONF: {key} must be a power of 2 (got {number})"
        )


def _divisions(value: str) -> tuple[int, ...]:
    """``4`` (every interval) or ``[256:1,512:2,>:8]`` (from that many MiB on; ``>`` the rest)."""
    table = [0] * _ROUNDUP_INTERVALS
    if not value.startswith("["):
        number = _int("roundup_power2_divisions", value)
        _power_of_two("roundup_power2_divisions", number)
        return (number,) * _ROUNDUP_INTERVALS
    if not value.endswith("]"):
        raise AllocatorConfError(
            f"PYTORCH_CUDA_ALLOC_CONF: roundup_power2_divisions list not closed: {value!r}"
        )
    first = True
    last = 0
    for item in value[1:-1].split(","):
        interval, sep, count_text = item.partition(":")
        if not sep:
            raise AllocatorConfError(
                f"PYTORCH_CUDA_ALLOC_CONF: roundup_power2_divisions entry {item!r} is not "
                "size:count"
            )
        count = _int("roundup_power2_divisions", count_text.strip())
        _power_of_two("roundup_power2_divisions", count)
        interval = interval.strip()
        if interval == ">":
            for i in range(last + 1, _ROUNDUP_INTERVALS):
                table[i] = count
            continue
        mib = _int("roundup_power2_divisions", interval)
        _power_of_two("roundup_power2_divisions interval", mib)
        index = min(max(mib.bit_length() - 1, 0), _ROUNDUP_INTERVALS - 1)
        if first:  # the first entry also covers every interval below it
            for i in range(index):
                table[i] = count
            first = False
        table[index] = count
        last = index
    return tuple(table)


# --------------------------------------------------------------------------- the model
class _Block:
    __slots__ = (
        "addr",
        "allocated",
        "gc_base",
        "mapped",
        "next",
        "prev",
        "segment",
        "size",
        "small",
    )

    def __init__(self, addr: int, size: int, small: bool, segment: _Segment) -> None:
        self.addr = addr
        self.size = size
        self.small = small
        self.segment = segment
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.allocated = False
        self.mapped = True
        self.gc_base = 0


class _Segment:
    __slots__ = ("addr", "expandable", "page", "size")

    def __init__(self, addr: int, size: int, expandable: bool, page: int) -> None:
        self.addr = addr
        self.size = size  # bytes mapped (reserved)
        self.expandable = expandable
        self.page = page


class _Pool:
    """Free mapped blocks in (size, address) order, as the native ``BlockPool.blocks`` set."""

    __slots__ = ("blocks", "free_calls", "keys", "small")

    def __init__(self, small: bool) -> None:
        self.small = small
        self.keys: list[tuple[int, int]] = []
        self.blocks: dict[int, _Block] = {}
        self.free_calls = 0  # get_free_block calls, the clock of garbage collection

    def insert(self, block: _Block) -> None:
        block.gc_base = self.free_calls
        insort(self.keys, (block.size, block.addr))
        self.blocks[block.addr] = block

    def remove(self, block: _Block) -> None:
        keys = self.keys
        del keys[bisect_left(keys, (block.size, block.addr))]
        del self.blocks[block.addr]

    def largest(self) -> int:
        return self.keys[-1][0] if self.keys else 0


@dataclass(frozen=True)
class Replay:
    """What the caching allocator would have done with a sequence of requests. Bytes.

    ``segments``: the segment sizes when reserved memory peaked; ``largest_free_block_bytes``
    the largest cached free block then; ``fragmentation_bytes`` reserved minus allocated at that
    moment. ``oom`` is set (and the replay stops) when a ``capacity`` was given and a request
    could not be served even after freeing the cache: ``{"event": index, "requested_bytes": n,
    "reserved_bytes": ..., "allocated_bytes": ...}``.
    """

    conf: str
    reserved_peak_bytes: int
    allocated_peak_bytes: int
    allocated_at_reserved_peak_bytes: int
    segments: list[int]
    largest_free_block_bytes: int
    reserved_end_bytes: int
    allocated_end_bytes: int
    events: int
    segment_allocs: int
    cache_flushes: int
    oom: dict[str, int] | None = None
    not_modelled: list[str] = field(default_factory=list)

    @property
    def fragmentation_bytes(self) -> int:
        return self.reserved_peak_bytes - self.allocated_at_reserved_peak_bytes

    def to_dict(self) -> dict[str, object]:
        return {
            "conf": self.conf,
            "reserved_peak_bytes": self.reserved_peak_bytes,
            "allocated_peak_bytes": self.allocated_peak_bytes,
            "allocated_at_reserved_peak_bytes": self.allocated_at_reserved_peak_bytes,
            "fragmentation_bytes": self.fragmentation_bytes,
            "segments": list(self.segments),
            "largest_free_block_bytes": self.largest_free_block_bytes,
            "reserved_end_bytes": self.reserved_end_bytes,
            "allocated_end_bytes": self.allocated_end_bytes,
            "events": self.events,
            "segment_allocs": self.segment_allocs,
            "cache_flushes": self.cache_flushes,
            "oom": self.oom,
            "not_modelled": list(self.not_modelled),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Replay:
        """The replay :meth:`to_dict` wrote (``fragmentation_bytes`` is derived, not read)."""
        return cls(
            conf=str(data["conf"]),
            reserved_peak_bytes=int(data["reserved_peak_bytes"]),
            allocated_peak_bytes=int(data["allocated_peak_bytes"]),
            allocated_at_reserved_peak_bytes=int(data["allocated_at_reserved_peak_bytes"]),
            segments=[int(s) for s in data["segments"]],
            largest_free_block_bytes=int(data["largest_free_block_bytes"]),
            reserved_end_bytes=int(data["reserved_end_bytes"]),
            allocated_end_bytes=int(data["allocated_end_bytes"]),
            events=int(data["events"]),
            segment_allocs=int(data["segment_allocs"]),
            cache_flushes=int(data["cache_flushes"]),
            oom=dict(data["oom"]) if data["oom"] is not None else None,
            not_modelled=list(data["not_modelled"]),
        )


@dataclass(frozen=True, eq=False)
class AllocatorSummary(DictRecord):
    """The caching-allocator replays of one profiled run (``Profile.allocator``): the run's
    allocations under its own options ``conf`` (``replay``) and under others (``what_if``, by
    option text), and what the profile's replay leaves out.

    Also the read-only dict of :meth:`to_dict` (the file's ``allocator`` keys), so
    ``profile.allocator["replay"]["reserved_peak_bytes"]`` reads as it did when it was a dict.
    """

    conf: str
    replay: Replay
    what_if: dict[str, Replay] = field(default_factory=dict)
    not_modelled: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "conf": self.conf,
            "replay": self.replay.to_dict(),
            "what_if": {conf: r.to_dict() for conf, r in self.what_if.items()},
            "not_modelled": list(self.not_modelled),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> AllocatorSummary | None:
        """The summary :meth:`to_dict` wrote; None for a profile without a replay (recorded by
        an older memprof or with ``model_reserved=False``)."""
        if not data or not isinstance(data.get("replay"), Mapping):
            return None
        return cls(
            conf=str(data.get("conf") or ""),
            replay=Replay.from_dict(data["replay"]),
            what_if={conf: Replay.from_dict(r) for conf, r in (data.get("what_if") or {}).items()},
            not_modelled=list(data.get("not_modelled") or []),
        )


NOT_MODELLED = [
    "one stream only (record_stream and cross-stream frees are not replayed)",
    "no CUDA graph pools, no cudaMallocAsync backend",
]


class CachingAllocatorModel:
    """The allocator's state, driven one request at a time (:meth:`malloc` / :meth:`free`).

    ``capacity``: bytes the driver can give (None: unlimited, never out of memory);
    ``memory_fraction``: as ``torch.cuda.set_per_process_memory_fraction`` (it also turns on
    ``garbage_collection_threshold``).
    """

    def __init__(
        self,
        conf: str | AllocatorConf = "",
        *,
        capacity: int | None = None,
        memory_fraction: float | None = None,
    ) -> None:
        self.conf = conf if isinstance(conf, AllocatorConf) else parse_conf(conf)
        self.capacity = capacity
        limit = capacity if capacity is not None else _NO_LIMIT
        self._set_fraction = memory_fraction is not None
        if memory_fraction is not None:
            if capacity is None:
                raise ValueError("memory_fraction needs a capacity")
            limit = int(capacity * memory_fraction)
        self._limit = limit
        c = self.conf
        self._max_split = c.max_split_size
        self._non_split_rounding = c.max_non_split_rounding
        self._divisions = c.roundup_power2_divisions
        self._any_divisions = any(d > 1 for d in c.roundup_power2_divisions)
        self._gc = self._set_fraction and c.garbage_collection_threshold > 0.0
        self._expandable = c.expandable_segments
        self._pools = (_Pool(small=True), _Pool(small=False))  # index: large? 1 : 0
        self._expandable_segments: list[_Segment | None] = [None, None]
        self._tails: list[_Block | None] = [None, None]  # an expandable segment's last block
        self._segments: dict[int, _Segment] = {}
        #: Request key -> its block, for every request not yet freed.
        self.live: dict[int, _Block] = {}
        self._next_addr = 1 << 40
        self.reserved = 0
        self.allocated = 0
        self.reserved_peak = 0
        self.allocated_peak = 0
        self.allocated_at_reserved_peak = 0
        self.largest_free_at_peak = 0
        self._peak_segments: list[int] | None = []
        self._peak_pending = False  # the peak's allocated bytes are read once the request is in
        self.events = 0
        self.segment_allocs = 0
        self.cache_flushes = 0

    # ------------------------------------------------------------------ requests
    def round_size(self, nbytes: int) -> int:
        """The block size a request of ``nbytes`` asks the pools for."""
        if nbytes < MIN_BLOCK:
            return MIN_BLOCK
        if self._any_divisions:
            log2 = nbytes.bit_length() - 1
            index = min(max(log2 - _ROUNDUP_START_LOG2, 0), _ROUNDUP_INTERVALS - 1)
            divisions = self._divisions[index]
            if divisions > 1 and nbytes > MIN_BLOCK * divisions:
                return _next_division(nbytes, divisions)
        return -(-nbytes // MIN_BLOCK) * MIN_BLOCK

    def malloc(self, key: int, nbytes: int) -> None:
        """Serve a request; :class:`AllocatorOOM` when it cannot fit within the capacity."""
        self.events += 1
        # _size and _best_fit, inlined: this is the hot path of a replay.
        if nbytes < MIN_BLOCK:
            size = MIN_BLOCK
        else:
            size = -(-nbytes // MIN_BLOCK) * MIN_BLOCK
            if self._any_divisions:
                index = nbytes.bit_length() - 1 - _ROUNDUP_START_LOG2
                divisions = self._divisions[min(max(index, 0), _ROUNDUP_INTERVALS - 1)]
                if divisions > 1 and nbytes > MIN_BLOCK * divisions:
                    size = _next_division(nbytes, divisions)
        large = size > SMALL_SIZE
        pool = self._pools[large]
        if self._gc:
            pool.free_calls += 1
        keys = pool.keys
        i = bisect_left(keys, (size, 0))
        block: _Block | None = None
        if i < len(keys):
            block = pool.blocks[keys[i][1]]
            if block is self._tails[large] and i + 1 < len(keys):
                i += 1
                block = pool.blocks[keys[i][1]]
            if (size < self._max_split <= block.size) or (
                size >= self._max_split and block.size >= size + self._non_split_rounding
            ):
                block = None
            else:
                del keys[i]
                del pool.blocks[block.addr]
        if block is None:
            if self._gc:
                self._garbage_collect()
            block = self._alloc_block(pool, size)
            if block is None and self._release_available(pool, size):
                block = self._alloc_block(pool, size)
            if block is None and self._release_all():
                block = self._alloc_block(pool, size)
            if block is None:
                raise AllocatorOOM(size)
        if block.size - size >= MIN_BLOCK:
            block = self._split(pool, block, size)
        block.allocated = True
        self.live[key] = block
        allocated = self.allocated + block.size
        self.allocated = allocated
        if allocated > self.allocated_peak:
            self.allocated_peak = allocated
        if self._peak_pending:
            self._peak_pending = False
            self.allocated_at_reserved_peak = allocated
            small, large_pool = self._pools
            self.largest_free_at_peak = max(small.largest(), large_pool.largest())

    def malloc_free(self, nbytes: int) -> None:
        """A request freed again before any other request (a temporary). Served from a cached
        block, it leaves the pools as they were (the block is split, then merged back: free
        neighbours are always merged), so only its bytes are charged; otherwise it runs as a
        malloc and a free."""
        size = self._size(nbytes)
        pool = self._pools[size > SMALL_SIZE]
        if not self._gc:  # (garbage collection ages blocks by their frees: no shortcut)
            _i, block = self._best_fit(pool, size)
            if block is not None:
                self.events += 2
                charged = size if self._splits(pool, block.size, size) else block.size
                if self.allocated + charged > self.allocated_peak:
                    self.allocated_peak = self.allocated + charged
                return
        # This model's own malloc and free (a subclass's would see the request twice).
        CachingAllocatorModel.malloc(self, _TEMPORARY_KEY, nbytes)
        CachingAllocatorModel.free(self, _TEMPORARY_KEY)

    def _size(self, nbytes: int) -> int:
        """The rounded size of a request (:meth:`round_size`, inlined: the hot path)."""
        if nbytes < MIN_BLOCK:
            return MIN_BLOCK
        size = -(-nbytes // MIN_BLOCK) * MIN_BLOCK
        if self._any_divisions:
            index = nbytes.bit_length() - 1 - _ROUNDUP_START_LOG2
            divisions = self._divisions[min(max(index, 0), _ROUNDUP_INTERVALS - 1)]
            if divisions > 1 and nbytes > MIN_BLOCK * divisions:
                size = _next_division(nbytes, divisions)
        return size

    def _best_fit(self, pool: _Pool, size: int) -> tuple[int, _Block | None]:
        """``get_free_block``: the cached block that serves ``size`` and its index in the
        pool's keys (the block stays in the pool), or no block."""
        if self._gc:
            pool.free_calls += 1
        keys = pool.keys
        i = bisect_left(keys, (size, 0))
        if i == len(keys):
            return i, None
        block = pool.blocks[keys[i][1]]
        if block is self._tails[not pool.small] and i + 1 < len(keys):
            # The growing end of an expandable segment counts as its size plus what it
            # can still map: best fit prefers any other block that is large enough.
            i += 1
            block = pool.blocks[keys[i][1]]
        if (size < self._max_split <= block.size) or (
            size >= self._max_split and block.size >= size + self._non_split_rounding
        ):
            return i, None  # oversize blocks serve only oversize requests of about their size
        return i, block

    def free(self, key: int) -> None:
        """Return the block of ``key`` to its pool; unknown keys are ignored."""
        block = self.live.pop(key, None)
        if block is None:
            return
        self.events += 1
        self.allocated -= block.size
        block.allocated = False
        pool = self._pools[not block.small]
        prev, nxt = block.prev, block.next
        if prev is not None and not prev.allocated and prev.mapped:
            self._merge(pool, block, prev)
        if nxt is not None and not nxt.allocated and nxt.mapped:
            self._merge(pool, block, nxt)
        block.gc_base = pool.free_calls
        insort(pool.keys, (block.size, block.addr))
        pool.blocks[block.addr] = block

    # ----------------------------------------------------------------- internals
    def _alloc_block(self, pool: _Pool, size: int) -> _Block | None:
        """A new segment (or more pages of the expandable one) holding a free block of at least
        ``size``; None when the device limit is reached."""
        if self._expandable:
            return self._expand(pool, size)
        if size <= SMALL_SIZE:
            segment_size = SMALL_BUFFER
        elif size < MIN_LARGE_ALLOC:
            segment_size = LARGE_BUFFER
        else:
            segment_size = -(-size // ROUND_LARGE) * ROUND_LARGE
        if self.reserved + segment_size > self._limit:
            return None
        addr = self._next_addr
        self._next_addr += segment_size + ROUND_LARGE
        segment = _Segment(addr, segment_size, False, segment_size)
        self._segments[addr] = segment
        self._grow(segment_size)
        return _Block(addr, segment_size, pool.small, segment)

    def _expand(self, pool: _Pool, size: int) -> _Block | None:
        large = not pool.small
        page = LARGE_BUFFER if large else SMALL_BUFFER
        segment = self._expandable_segments[large]
        tail = self._tails[large]
        if segment is None:
            addr = self._next_addr
            self._next_addr += _UNBOUNDED
            segment = _Segment(addr, 0, True, page)
            self._expandable_segments[large] = segment
            self._segments[addr] = segment
        have = 0
        if tail is not None and not tail.allocated:
            have = tail.size
        need = -(-(size - have) // page) * page
        if self.reserved + need > self._limit:
            return None
        segment.size += need
        self._grow(need)
        if tail is not None and not tail.allocated:
            pool.remove(tail)
            tail.size += need
            return tail
        block = _Block(segment.addr + segment.size - need, need, pool.small, segment)
        block.prev = tail
        if tail is not None:
            tail.next = block
        self._tails[large] = block
        return block

    def _grow(self, nbytes: int) -> None:
        self.segment_allocs += 1
        self.reserved += nbytes
        if self.reserved > self.reserved_peak:
            self.reserved_peak = self.reserved
            self._peak_segments = None  # taken when the segments next shrink, or at the end
            self._peak_pending = True

    def _splits(self, pool: _Pool, block_size: int, size: int) -> bool:
        """Whether a free block of ``block_size`` serving ``size`` is split."""
        remaining = block_size - size
        if pool.small or self._expandable:
            return remaining >= MIN_BLOCK
        return size < self._max_split and remaining > SMALL_SIZE

    def _split(self, pool: _Pool, block: _Block, size: int) -> _Block:
        if not self._splits(pool, block.size, size):
            return block
        remaining = block.size - size
        front = _Block(block.addr, size, pool.small, block.segment)
        front.prev = block.prev
        if front.prev is not None:
            front.prev.next = front
        front.next = block
        block.prev = front
        block.addr += size
        block.size = remaining
        pool.insert(block)
        return front

    def _merge(self, pool: _Pool, block: _Block, other: _Block) -> None:
        pool.remove(other)
        if other is block.prev:
            block.addr = other.addr
            block.prev = other.prev
            if block.prev is not None:
                block.prev.next = block
        else:
            block.next = other.next
            if block.next is not None:
                block.next.prev = block
            large = not block.small
            if self._tails[large] is other:
                self._tails[large] = block
        block.size += other.size

    def _shrink(self, nbytes: int) -> None:
        if self._peak_segments is None and self.reserved == self.reserved_peak:
            self._peak_segments = self.segment_sizes()
        self.reserved -= nbytes

    def _release_segment(self, pool: _Pool, block: _Block) -> None:
        pool.remove(block)
        del self._segments[block.segment.addr]
        self._shrink(block.size)

    def _release_available(self, pool: _Pool, size: int) -> bool:
        """Free one cached oversize block large enough, else oversize blocks from the largest
        down until ``size`` is covered (only with ``max_split_size_mb``)."""
        if self._max_split == _NO_LIMIT:
            return False
        want = max(size, self._max_split)
        keys = pool.keys
        i = bisect_left(keys, (want, 0))
        if i < len(keys):
            block = pool.blocks[keys[i][1]]
            if not block.segment.expandable:
                self._release_segment(pool, block)
                return True
        released = 0
        for block_size, addr in reversed(list(keys)):
            if released >= want or block_size < self._max_split:
                break
            block = pool.blocks[addr]
            if not block.segment.expandable:
                self._release_segment(pool, block)
                released += block_size
        return released >= want

    def _release_all(self) -> bool:
        """``release_cached_blocks``: free every cached unsplit segment, unmap expandable tails."""
        released = False
        for pool in self._pools:
            for _size, addr in list(pool.keys):
                block = pool.blocks[addr]
                if block.segment.expandable:
                    if block is self._tails[not pool.small]:
                        released |= self._unmap_tail(pool, block)
                elif block.prev is None and block.next is None:
                    self._release_segment(pool, block)
                    released = True
        if released:
            self.cache_flushes += 1
        return released

    def _unmap_tail(self, pool: _Pool, block: _Block) -> bool:
        segment = block.segment
        page = segment.page
        start = -(-(block.addr - segment.addr) // page) * page + segment.addr
        end = segment.addr + segment.size
        if end - start < page:
            return False
        pool.remove(block)
        unmapped = end - start
        segment.size -= unmapped
        self._shrink(unmapped)
        block.size -= unmapped
        large = not pool.small
        if block.size:
            pool.insert(block)
        else:
            self._tails[large] = block.prev
            if block.prev is not None:
                block.prev.next = None
        return True

    def _garbage_collect(self) -> None:
        """Free aged unsplit large blocks while reserved is above the threshold."""
        threshold = int(self.conf.garbage_collection_threshold * self._limit)
        if self.reserved <= threshold:
            return
        target = self.reserved - threshold
        pool = self._pools[1]
        candidates = [pool.blocks[a] for _s, a in pool.keys]
        freeable = [
            b for b in candidates if b.prev is None and b.next is None and not b.segment.expandable
        ]
        if not freeable:
            return
        total_age = sum(pool.free_calls - b.gc_base for b in freeable)
        reclaimed = 0
        freed = True
        while reclaimed < target and freed and freeable:
            threshold_age = total_age / len(freeable)
            freed = False
            for block in list(freeable):
                age = pool.free_calls - block.gc_base
                if age >= threshold_age:
                    freed = True
                    reclaimed += block.size
                    total_age -= age
                    freeable.remove(block)
                    self._release_segment(pool, block)

    # ------------------------------------------------------------------ results
    def segment_sizes(self) -> list[int]:
        return sorted((s.size for s in self._segments.values() if s.size), reverse=True)

    def result(self, oom: dict[str, int] | None = None) -> Replay:
        segments = self._peak_segments
        if segments is None:
            segments = self.segment_sizes()
        not_modelled = list(NOT_MODELLED)
        not_modelled += [f"option {name} (no effect on one stream)" for name in self.conf.ignored]
        return Replay(
            conf=self.conf.text,
            reserved_peak_bytes=self.reserved_peak,
            allocated_peak_bytes=self.allocated_peak,
            allocated_at_reserved_peak_bytes=self.allocated_at_reserved_peak,
            segments=segments,
            largest_free_block_bytes=self.largest_free_at_peak,
            reserved_end_bytes=self.reserved,
            allocated_end_bytes=self.allocated,
            events=self.events,
            segment_allocs=self.segment_allocs,
            cache_flushes=self.cache_flushes,
            oom=oom,
            not_modelled=not_modelled,
        )


def _next_division(size: int, divisions: int) -> int:
    """``roundup_power2_next_division``: the next of ``divisions`` steps between powers of 2."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


def replay(
    events: Iterable[tuple[str, int, int]],
    *,
    conf: str | AllocatorConf = "",
    capacity: int | None = None,
    memory_fraction: float | None = None,
) -> Replay:
    """Run ``("alloc", key, nbytes)`` / ``("free", key, nbytes)`` events, in order, through the
    caching allocator model; see the module docstring for what is modelled.

    With a ``capacity`` (bytes the device can give) a request that cannot be served even after
    freeing the cache stops the replay and is reported in :attr:`Replay.oom`.
    """
    model = CachingAllocatorModel(conf, capacity=capacity, memory_fraction=memory_fraction)
    malloc, free = model.malloc, model.free
    index = 0
    try:
        for index, (action, key, nbytes) in enumerate(events):
            if action == "alloc":
                malloc(key, nbytes)
            elif action == "free":
                free(key)
            else:
                raise ValueError(f"event {index}: action must be 'alloc' or 'free', not {action!r}")
    except AllocatorOOM as exc:
        return model.result(
            oom={
                "event": index,
                "requested_bytes": int(exc.args[0]),
                "reserved_bytes": model.reserved,
                "allocated_bytes": model.allocated,
            }
        )
    return model.result()


__all__ = [
    "AllocatorConf",
    "CachingAllocatorModel",
    "Replay",
    "conf_from_environment",
    "parse_conf",
    "replay",
]
