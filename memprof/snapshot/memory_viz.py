"""Write a profile as a PyTorch memory snapshot (the pickle ``torch.cuda.memory._dump_snapshot``
writes, which pytorch.org/memory_viz and ``python -m torch.cuda._memory_viz`` read).

The snapshot is taken at the profile's peak: its segments hold exactly the storages alive then
(each of the peak's largest tensors its own block, with its shape, dtype and source line where
recorded; the rest one block per module and category, adding up to the peak's per-module
breakdown), so ``_memory_viz stats`` reports the peak's bytes as
``total_allocated``. ``device_traces`` replays the profile's timeline up to that peak: the
timeline holds live bytes per category at module boundaries, not single allocations, so each
change of a category between two samples becomes one allocation (or free) charged to the module
and phase of that moment. Sizes, order, modules and phases are the profile's; addresses are
made up (a first-fit arena, 512-byte aligned like the CUDA caching allocator), so the
segment's size is that arena's high-water mark, not a reserved figure the device reported.
"""

from __future__ import annotations

import itertools
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memprof.categories import CATEGORIES
from memprof.errors import ExportError
from memprof.profile import Peak, Profile, TensorAtPeak, as_profile
from memprof.snapshot.frames import Frame, frames_for

if TYPE_CHECKING:
    from memprof.tracking.session import Profiler

#: Where the made-up arena starts (any plausible device address).
ARENA_BASE = 0x7F0000000000
ALIGNMENT = 512
#: Categories whose storages come and go within a step: a top tensor of these is placed in the
#: replay only during the peak's step (parameters and optimizer state from the start).
_TRANSIENT = frozenset({"activation", "temporary", "input", "other"})
_PHASE_RANK = {"forward": 1, "backward": 2, "optimizer": 3}


@dataclass(frozen=True)
class _Piece:
    """What is alive at the peak: a top tensor, or the rest of a module's bytes of a category."""

    nbytes: int
    category: str
    module: str
    phase: str
    source: str = ""
    tensor: TensorAtPeak | None = None


@dataclass
class _Block:
    addr: int
    size: int  # requested bytes
    category: str
    frames: list[Frame]
    piece: _Piece | None = None

    @property
    def tensor(self) -> TensorAtPeak | None:
        return self.piece.tensor if self.piece is not None else None


class _Arena:
    """First-fit placement of blocks, so freed addresses are reused as an allocator would."""

    def __init__(self) -> None:
        self.free: list[list[int]] = []  # [start, size], sorted by start, coalesced
        self.top = ARENA_BASE

    def alloc(self, size: int) -> int:
        size = _rounded(size)
        for hole in self.free:
            if hole[1] >= size:
                addr = hole[0]
                hole[0] += size
                hole[1] -= size
                if hole[1] == 0:
                    self.free.remove(hole)
                return addr
        addr = self.top
        self.top += size
        return addr

    def release(self, addr: int, size: int) -> None:
        size = _rounded(size)
        holes = self.free
        i = 0
        while i < len(holes) and holes[i][0] < addr:
            i += 1
        holes.insert(i, [addr, size])
        if i + 1 < len(holes) and holes[i][0] + holes[i][1] == holes[i + 1][0]:
            holes[i][1] += holes.pop(i + 1)[1]
        if i > 0 and holes[i - 1][0] + holes[i - 1][1] == holes[i][0]:
            holes[i - 1][1] += holes.pop(i)[1]


@dataclass
class _Replay:
    arena: _Arena = field(default_factory=_Arena)
    events: list[dict[str, Any]] = field(default_factory=list)
    live: dict[int, _Block] = field(default_factory=dict)

    def alloc(self, size: int, category: str, frames: list[Frame], time_us: int,
              piece: _Piece | None = None) -> _Block:
        block = _Block(self.arena.alloc(size), size, category, frames, piece)
        self.live[block.addr] = block
        self.events.append(_event("alloc", block, time_us))
        return block

    def free(self, block: _Block, time_us: int) -> None:
        del self.live[block.addr]
        self.arena.release(block.addr, block.size)
        self.events.append(_event("free_requested", block, time_us))
        self.events.append(_event("free_completed", block, time_us))


def to_snapshot(profile: Profile | Profiler) -> dict[str, Any]:
    """The snapshot dict (``segments``, ``device_traces``) of ``profile`` at its peak."""
    profile = as_profile(profile)
    if profile.peak_info is None:
        raise ExportError("this profile recorded no step: there is no peak to export")
    peak = profile.peak_info
    rows = _rows_to_peak(profile)
    replay = _Replay()
    generic: dict[str, list[_Block]] = {c: [] for c in CATEGORIES}
    pinned: dict[str, list[_Block]] = {c: [] for c in CATEGORIES}
    pending: dict[str, list[_Piece]] = {c: [] for c in CATEGORIES}
    for piece in _pieces(peak):
        pending[piece.category].append(piece)
    for index, row in enumerate(rows):
        final = index == len(rows) - 1
        when = row["time_us"]
        # Frees first, so the allocations after them can reuse the addresses.
        for category in CATEGORIES:
            target = row[category]
            while pinned[category] and sum(b.size for b in pinned[category]) > target:
                block = pinned[category].pop()
                replay.free(block, when)
                assert block.piece is not None
                pending[category].insert(0, block.piece)
            _shrink(replay, generic[category], target - _held(pinned[category]), when)
        for category in CATEGORIES:
            target = row[category]
            for piece in list(pending[category]):
                fits = _held(pinned[category]) + piece.nbytes <= target
                if fits and (final or _may_place(piece, row, peak.step)):
                    pending[category].remove(piece)
                    frames = frames_for(category, piece.module, piece.phase, piece.source)
                    pinned[category].append(replay.alloc(piece.nbytes, category, frames, when,
                                                         piece))
            _shrink(replay, generic[category], target - _held(pinned[category]), when)
            missing = target - _held(pinned[category]) - _held(generic[category])
            if missing > 0:
                frames = frames_for(category, row["module"], row["phase"])
                generic[category].append(replay.alloc(missing, category, frames, when))
    segment = _segment(replay)
    trace = [_segment_event("segment_alloc", segment, rows[0]["time_us"]), *replay.events]
    return {
        "segments": [segment],
        "device_traces": [trace],
        "allocator_settings": {},
        "memprof": {
            "exported_from": "memprof",
            "device": profile.device.name,
            "peak_bytes": peak.total_bytes,
            "peak_step": peak.step,
            "note": "one block per top tensor at the peak and per module and category for the "
                    "rest; the trace replays the profile's timeline; addresses are made up",
        },
    }


def write_snapshot(profile: Profile | Profiler, path: str | os.PathLike[str], *,
                   overwrite: bool = False) -> Path:
    """Pickle :func:`to_snapshot` to ``path`` atomically (refuses to replace a file unless
    ``overwrite``)."""
    from memprof.snapshot.files import write_bytes_atomic

    target = Path(path)
    write_bytes_atomic(target, pickle.dumps(to_snapshot(profile), protocol=4),
                       overwrite=overwrite)
    return target


# ---------------------------------------------------------------------------- helpers
def _rows_to_peak(profile: Profile) -> list[dict[str, Any]]:
    """Timeline samples from the first to the peak's, the last replaced by the peak's own
    breakdown (roles resolved after the step), with absolute times in microseconds."""
    peak = profile.peak_info
    assert peak is not None
    frame = profile.timeline()
    starts = _step_starts(profile)
    rows: list[dict[str, Any]] = []
    peak_at = -1
    best = -1
    for i, rec in enumerate(frame.to_dict("records")):
        step = int(rec["step"])
        row: dict[str, Any] = {c: int(rec[c]) for c in CATEGORIES}
        row.update(step=step, phase=str(rec["phase"]), module=str(rec["module"]),
                   time_us=round((starts.get(step, 0.0) + float(rec["time_s"])) * 1e6))
        rows.append(row)
        if step == peak.step and int(rec["total"]) > best:
            best, peak_at = int(rec["total"]), i
    rows = rows[: peak_at + 1] if peak_at >= 0 else []
    last: dict[str, Any] = {c: int(peak.by_category.get(c, 0)) for c in CATEGORIES}
    last.update(step=peak.step, phase=peak.phase, module=peak.module,
                time_us=rows[-1]["time_us"] if rows else 0)
    if rows:
        rows[-1] = last
    else:
        rows = [last]
    for earlier, later in itertools.pairwise(rows):
        later["time_us"] = max(later["time_us"], earlier["time_us"])
    return rows


def _step_starts(profile: Profile) -> dict[int, float]:
    """Each profiled step's start in seconds, the steps laid end to end."""
    starts, clock = {}, 0.0
    for step in profile.steps_stats:
        starts[step.step] = clock
        clock += max(step.duration_s, 0.0)
    return starts


#: The phase a module's remaining bytes of a category are written with.
_USUAL_PHASE = {"activation": "forward", "gradient": "backward", "optimizer_state": "optimizer"}


def _pieces(peak: Peak) -> list[_Piece]:
    """The peak's top tensors, then per module and category the bytes they leave over, so the
    snapshot's blocks add up to ``peak.by_module`` exactly."""
    pieces = [_Piece(t.nbytes, t.category, t.module, t.phase, t.source, t) for t in
              peak.top_tensors]
    left = {(m, c): v for m, row in peak.by_module.items() for c, v in row.items() if v > 0}
    for t in peak.top_tensors:
        key = (t.module, t.category)
        left[key] = left.get(key, 0) - t.nbytes
    for (module, category), nbytes in left.items():
        if nbytes > 0:
            phase = _USUAL_PHASE.get(category, peak.phase if category == "temporary" else "other")
            pieces.append(_Piece(nbytes, category, module, phase))
    return pieces


def _may_place(tensor: _Piece, row: dict[str, Any], peak_step: int) -> bool:
    if tensor.category not in _TRANSIENT:
        return True
    if row["step"] != peak_step:
        return False
    wanted = _PHASE_RANK.get(tensor.phase)
    return wanted is None or _PHASE_RANK.get(row["phase"], 0) >= wanted


def _held(blocks: list[_Block]) -> int:
    return sum(b.size for b in blocks)


def _shrink(replay: _Replay, blocks: list[_Block], target: int, when: int) -> None:
    """Free the newest blocks until they hold at most ``target`` bytes; what was freed beyond
    it comes back as one block with the last freed block's frames."""
    target = max(target, 0)
    held = _held(blocks)
    if held <= target:
        return
    last: _Block | None = None
    while blocks and held > target:
        last = blocks.pop()
        held -= last.size
        replay.free(last, when)
    if last is not None and held < target:
        blocks.append(replay.alloc(target - held, last.category, last.frames, when))


def _rounded(size: int) -> int:
    return max(ALIGNMENT, -(-size // ALIGNMENT) * ALIGNMENT)


def _event(action: str, block: _Block, time_us: int) -> dict[str, Any]:
    event = {"action": action, "addr": block.addr, "size": _rounded(block.size), "stream": 0,
             "frames": block.frames, "time_us": time_us, "category": block.category,
             "requested_size": block.size}
    if block.tensor is not None:
        event["memprof_tensor"] = _tensor_facts(block.tensor)
    elif block.piece is not None:
        event["memprof_rest"] = True  # a module's bytes of a category, not one tensor
    return event


def _tensor_facts(tensor: TensorAtPeak) -> dict[str, Any]:
    return {"shape": list(tensor.shape), "dtype": tensor.dtype, "nbytes": tensor.nbytes}


def _segment_event(action: str, segment: dict[str, Any], time_us: int) -> dict[str, Any]:
    return {"action": action, "addr": segment["address"], "size": segment["total_size"],
            "stream": 0, "frames": [], "time_us": time_us}


def _segment(replay: _Replay) -> dict[str, Any]:
    """One segment over the arena: the live blocks and the free gaps between them."""
    blocks: list[dict[str, Any]] = []
    cursor = ARENA_BASE
    for addr in sorted(replay.live):
        block = replay.live[addr]
        if addr > cursor:
            blocks.append(_inactive(cursor, addr - cursor))
        record = {"address": addr, "size": _rounded(block.size),
                  "requested_size": block.size, "state": "active_allocated",
                  "frames": block.frames}
        if block.tensor is not None:  # memprof's own key: torch's readers ignore it
            record["memprof_tensor"] = _tensor_facts(block.tensor)
        elif block.piece is not None:
            record["memprof_rest"] = True
        blocks.append(record)
        cursor = addr + _rounded(block.size)
    total = max(replay.arena.top, cursor) - ARENA_BASE
    if ARENA_BASE + total > cursor:
        blocks.append(_inactive(cursor, ARENA_BASE + total - cursor))
    if not blocks:
        total = ALIGNMENT
        blocks.append(_inactive(ARENA_BASE, total))
    active = sum(b["size"] for b in blocks if b["state"] == "active_allocated")
    return {
        "device": 0,
        "address": ARENA_BASE,
        "total_size": total,
        "allocated_size": active,
        "active_size": active,
        "requested_size": sum(b["requested_size"] for b in blocks),
        "stream": 0,
        "segment_type": "large",
        "segment_pool_id": (0, 0),
        "is_expandable": False,
        "frames": [],
        "blocks": blocks,
    }


def _inactive(addr: int, size: int) -> dict[str, Any]:
    return {"address": addr, "size": size, "requested_size": 0, "state": "inactive",
            "frames": []}
