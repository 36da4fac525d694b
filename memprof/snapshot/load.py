"""Read a PyTorch memory snapshot (``torch.cuda.memory._dump_snapshot``'s pickle) as a
:class:`~memprof.profile.Profile`.

A pickle can run code when it is loaded, so the file is read with an unpickler that refuses
every global: a snapshot is plain dicts, lists, tuples, strings and numbers, and anything else
is rejected before it is built.

The allocation history (``device_traces``, when ``_record_memory_history`` was on) is replayed
to find the peak and to draw the timeline; what was alive before the trace began is taken from
the segments (blocks alive at the dump that the trace never allocated) and from frees of
addresses the trace never allocated. Without a trace, the dump moment itself is the peak.

Attribution, from each allocation's frames (innermost first):
- memprof's own exported frames (:mod:`memprof.snapshot.frames`) give category, module and
  phase exactly;
- a ``category`` key on the event (snapshots made from ``torch.profiler`` carry one) gives the
  category;
- otherwise the innermost frame named ``forward`` outside ``torch/`` names the module, as
  ``forward (FILE)``: modules of one class share that row; the category is ``other``.
The profile's ``meta["snapshot"]`` says how many bytes could not be attributed or categorised.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memprof.categories import CATEGORIES
from memprof.decimate import decimate
from memprof.errors import ProfileLoadError
from memprof.profile import (
    OUTSIDE_MODULES,
    DeviceInfo,
    ModuleStats,
    Peak,
    Profile,
    StepStats,
    TensorAtPeak,
)
from memprof.snapshot.frames import read_memprof_frames

#: How many timeline samples a snapshot's trace is reduced to.
TIMELINE_POINTS = 2000
TOP_TENSORS = 20
#: torch.profiler's memory categories (``_profile_to_snapshot``) in memprof's words.
_PROFILER_CATEGORIES = {
    "parameter": "parameter",
    "gradient": "gradient",
    "optimizer_state": "optimizer_state",
    "activation": "activation",
    "temporary": "temporary",
    "input": "input",
    "autograd_detail": "temporary",
}
_OWN = {"parameter": "parameter", "buffer": "buffer", "gradient": "gradient",
        "optimizer_state": "optimizer_state", "activation": "activation"}


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds containers and atoms only: no class, no function."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a memory snapshot "
                                     "holds plain data only")


def read_snapshot(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The snapshot dict in ``path``, read safely. Raises ProfileLoadError (one line)."""
    source = Path(path)
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise ProfileLoadError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise ProfileLoadError(f"{source}: is a directory, not a snapshot") from None
    except OSError as exc:
        raise ProfileLoadError(f"{source}: cannot read it ({exc})") from None
    try:
        snapshot = _SafeUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise ProfileLoadError(f"{source}: not a memory snapshot ({exc})") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise ProfileLoadError(f"{source}: not a memory snapshot, or truncated "
                               f"({type(exc).__name__})") from None
    if isinstance(snapshot, list):  # very old snapshots: the segments alone
        snapshot = {"segments": snapshot, "device_traces": []}
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("segments"), list):
        raise ProfileLoadError(f"{source}: not a memory snapshot (no 'segments' list)")
    return snapshot


def load_snapshot(path: str | os.PathLike[str], *, device: int | None = None) -> Profile:
    """A profile of the snapshot in ``path`` (see the module docstring for what it holds).

    ``device``: which CUDA device's memory to read (default: the one with the most recorded
    events, else the one with the most allocated bytes). Raises ProfileLoadError.
    """
    snapshot = read_snapshot(path)
    try:
        return _to_profile(snapshot, Path(path), device)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProfileLoadError(f"{path}: damaged memory snapshot ({type(exc).__name__}: "
                               f"{exc})") from None


def is_snapshot_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` starts like a pickle (protocol 2 or later), not like JSON."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


# ------------------------------------------------------------------------ the replay
@dataclass
class _Alloc:
    size: int
    category: str
    module: str
    phase: str
    source: str
    attributed: bool
    categorised: bool
    shape: list[int] | None = None
    dtype: str = "bytes"
    aggregate: bool = False  # memprof's export: many tensors' bytes in one block


def _to_profile(snapshot: dict[str, Any], path: Path, device: int | None) -> Profile:
    segments = [s for s in snapshot["segments"] if isinstance(s, dict)]
    traces = snapshot.get("device_traces") or []
    chosen = _choose_device(segments, traces, device)
    segments = [s for s in segments if int(s.get("device", 0)) == chosen]
    trace = list(traces[chosen]) if chosen < len(traces) and traces[chosen] else []

    live: dict[int, _Alloc] = {}
    # What was alive before the trace: blocks at the dump the trace never allocated, and
    # addresses the trace frees without allocating them.
    allocated_in_trace = {int(e["addr"]) for e in trace if e.get("action") == "alloc"}
    first_action: dict[int, str] = {}
    for event in trace:
        action = event.get("action")
        if action in ("alloc", "free_requested", "free_completed"):
            first_action.setdefault(int(event["addr"]), action)
    for seg in segments:
        for block in seg.get("blocks", []):
            if block.get("state") == "inactive":
                continue
            addr = int(block.get("address", -1))
            if addr in allocated_in_trace and first_action.get(addr) == "alloc":
                continue
            live[addr] = _describe(block, int(block.get("requested_size", block["size"])))
    for event in trace:
        addr = int(event.get("addr", -1))
        if event.get("action") == "free_requested" and first_action.get(addr) != "alloc" \
                and addr not in live:
            live[addr] = _describe(event, _event_size(event))

    totals = dict.fromkeys(CATEGORIES, 0)
    for alloc in live.values():
        totals[alloc.category] += alloc.size
    t0 = min((int(e.get("time_us", 0)) for e in trace), default=0)
    samples: list[tuple[int, float, str, str, tuple[int, ...]]] = []

    def sample(seq: int, when_us: int, alloc: _Alloc | None) -> None:
        samples.append((seq, (when_us - t0) / 1e6, alloc.phase if alloc else "other",
                        alloc.module if alloc else OUTSIDE_MODULES,
                        tuple(totals[c] for c in CATEGORIES)))

    sample(0, t0, None)
    best_total, best_seq, best_live, best_alloc = sum(totals.values()), 0, dict(live), None
    module_max: dict[str, dict[str, int]] = {}
    module_live: dict[str, dict[str, int]] = {}
    for alloc in live.values():
        _charge(module_live, module_max, alloc, alloc.size)
    seq = 0
    for event in trace:
        action = event.get("action")
        if action == "alloc":
            seq += 1
            alloc = _describe(event, _event_size(event))
            live[int(event["addr"])] = alloc
            totals[alloc.category] += alloc.size
            _charge(module_live, module_max, alloc, alloc.size)
            sample(seq, int(event.get("time_us", t0)), alloc)
            total = sum(totals.values())
            if total > best_total:
                best_total, best_seq, best_live, best_alloc = total, seq, dict(live), alloc
        elif action == "free_completed":
            gone = live.pop(int(event["addr"]), None)
            if gone is not None:
                totals[gone.category] -= gone.size
                _charge(module_live, module_max, gone, -gone.size)
                sample(seq, int(event.get("time_us", t0)), gone)
    kept = decimate(samples, TIMELINE_POINTS, key=lambda s: sum(s[4])) if len(samples) > 4 \
        else samples
    timeline: dict[str, list[Any]] = {"step": [], "seq": [], "time_s": [], "phase": [],
                                      "module": [], **{c: [] for c in CATEGORIES}}
    for seq_, when, phase, module, values in kept:
        for key, value in (("step", 0), ("seq", seq_), ("time_s", round(when, 6)),
                           ("phase", phase), ("module", module)):
            timeline[key].append(value)
        for c, v in zip(CATEGORIES, values, strict=True):
            timeline[c].append(v)

    peak = _peak(best_total, best_live, best_alloc)
    unattributed = sum(a.size for a in best_live.values() if not a.attributed)
    uncategorised = sum(a.size for a in best_live.values() if not a.categorised)
    reserved = sum(int(s.get("total_size", 0)) for s in segments)
    duration = (max((int(e.get("time_us", 0)) for e in trace), default=t0) - t0) / 1e6
    end_bytes = sum(a.size for a in live.values())
    start_total = sum(samples[0][4])
    info = snapshot.get("memprof")
    memprof_info: dict[str, Any] = info if isinstance(info, dict) else {}
    notes = []
    if unattributed:
        notes.append(f"{unattributed} bytes at the peak have no module in their frames: "
                     f"charged to {OUTSIDE_MODULES!r}")
    if uncategorised:
        notes.append(f"{uncategorised} bytes at the peak have no category a snapshot can "
                     "tell (parameter, activation, ...): counted as 'other'")
    if not trace:
        notes.append("the snapshot has no allocation history (device_traces): the peak is the "
                     "moment it was dumped, the timeline one point")
    return Profile(
        modules_stats=_modules(module_max),
        steps_stats=[StepStats(step=0, peak_bytes=best_total, peak_phase=peak.phase,
                               peak_module=peak.module, peak_by_category=dict(peak.by_category),
                               start_bytes=start_total, end_bytes=end_bytes,
                               duration_s=duration, device_max_allocated=None,
                               device_reserved=reserved or None)],
        peak_info=peak,
        timeline_data=timeline,
        device=DeviceInfo(kind="cuda", name=str(memprof_info.get("device")
                                                or f"CUDA device {chosen} (snapshot)"),
                          allocation_rounding=512,
                          cuda={"available": True, "reserved": reserved, "source": "snapshot"}),
        environment={},
        warnings=notes,
        meta={"snapshot": {"path": str(path), "device": chosen, "events": len(trace),
                           "peak_event": best_seq, "unattributed_bytes": unattributed,
                           "uncategorised_bytes": uncategorised, "notes": notes},
              "backend": "memory snapshot"},
    )


def _event_size(event: dict[str, Any]) -> int:
    """A trace event's bytes: the block size torch records, or memprof's requested size."""
    return int(event.get("requested_size", event["size"]))


def _choose_device(segments: list[dict[str, Any]], traces: list[Any], device: int | None) -> int:
    if device is not None:
        return device
    if any(traces):
        return max(range(len(traces)), key=lambda i: len(traces[i] or []))
    by_device: dict[int, int] = {}
    for seg in segments:
        d = int(seg.get("device", 0))
        by_device[d] = by_device.get(d, 0) + int(seg.get("allocated_size", 0))
    return max(by_device, key=lambda d: by_device[d]) if by_device else 0


def _describe(record: dict[str, Any], size: int) -> _Alloc:
    """Category, module, phase and source line of a block or trace event."""
    frames = [f for f in record.get("frames") or [] if isinstance(f, dict)]
    category, module, phase = read_memprof_frames(frames)
    categorised = category in CATEGORIES
    if not categorised:
        mapped = _PROFILER_CATEGORIES.get(str(record.get("category", "")).lower())
        category, categorised = (mapped, True) if mapped else ("other", False)
    attributed = module is not None
    if module is None:
        module = _forward_module(frames)
        attributed = module is not None
    tensor = record.get("memprof_tensor")
    shape, dtype = None, "bytes"
    if isinstance(tensor, dict) and isinstance(tensor.get("shape"), list | tuple):
        shape, dtype = [int(d) for d in tensor["shape"]], str(tensor.get("dtype", "bytes"))
    return _Alloc(size=size, category=str(category),
                  module=module if module is not None else OUTSIDE_MODULES,
                  phase=phase or "other", source=_user_source(frames), attributed=attributed,
                  categorised=categorised, shape=shape, dtype=dtype,
                  aggregate=bool(record.get("memprof_rest")))


def _forward_module(frames: list[dict[str, Any]]) -> str | None:
    """``forward (FILE)`` for the innermost ``forward`` frame outside torch's own files."""
    for frame in frames:
        filename = str(frame.get("filename", ""))
        if frame.get("name") == "forward" and not _is_library(filename):
            return f"forward ({filename.rsplit('/', 1)[-1]})"
    return None


def _user_source(frames: list[dict[str, Any]]) -> str:
    """``file:line in function`` of the innermost Python frame that is not torch's."""
    for frame in frames:
        filename = str(frame.get("filename", ""))
        if filename.endswith(".py") and not filename.startswith("<") \
                and not _is_library(filename):
            return f"{filename}:{int(frame.get('line', 0))} in {frame.get('name', '?')}"
    return ""


def _is_library(filename: str) -> bool:
    return "/torch/" in filename or filename.startswith("torch/") or "site-packages/" in \
        filename or not filename or filename.endswith((".c", ".cpp", ".h", ".cu"))


def _charge(live: dict[str, dict[str, int]], most: dict[str, dict[str, int]], alloc: _Alloc,
            delta: int) -> None:
    column = _OWN.get(alloc.category, "temporary_peak" if alloc.category == "temporary" else None)
    if column is None or alloc.module == OUTSIDE_MODULES:
        return
    row = live.setdefault(alloc.module, {})
    row[column] = row.get(column, 0) + delta
    top = most.setdefault(alloc.module, {})
    top[column] = max(top.get(column, 0), row[column])


def _modules(module_max: dict[str, dict[str, int]]) -> list[ModuleStats]:
    """One row per module seen, plus the ancestors of dotted names (module paths)."""
    names = set(module_max)
    for name in list(names):
        if name.startswith("forward ("):
            continue
        parts = name.split(".") if name else []
        names.update(".".join(parts[:i]) for i in range(len(parts)))
    rows = []
    for name in sorted(names):
        dotted = not name.startswith("forward (")
        parent = None
        if dotted and name:
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            if parent not in names:
                parent = None
        own = {c: 0 for c in ("parameter", "buffer", "gradient", "optimizer_state",
                              "activation", "temporary_peak")}
        own.update(module_max.get(name, {}))
        rows.append(ModuleStats(name=name, type="", depth=(name.count(".") + 1 if dotted and name
                                                           else 0),
                                parent=parent, own=own, peak_forward=0, peak_backward=0,
                                forward_calls=0, recompute_calls=0))
    return rows


def _peak(total: int, live: dict[int, _Alloc], at: _Alloc | None) -> Peak:
    by_category = dict.fromkeys(CATEGORIES, 0)
    by_module: dict[str, dict[str, int]] = {}
    for alloc in live.values():
        by_category[alloc.category] += alloc.size
        row = by_module.setdefault(alloc.module, {})
        row[alloc.category] = row.get(alloc.category, 0) + alloc.size
    single = [a for a in live.values() if not a.aggregate]
    largest = sorted(single, key=lambda a: a.size, reverse=True)[:TOP_TENSORS]
    return Peak(
        total_bytes=total,
        step=0,
        phase=at.phase if at else "other",
        module=at.module if at else OUTSIDE_MODULES,
        by_category=by_category,
        by_module=by_module,
        top_tensors=[TensorAtPeak(category=a.category, module=a.module, nbytes=a.size,
                                  shape=a.shape if a.shape is not None else [a.size],
                                  dtype=a.dtype, phase=a.phase, source=a.source)
                     for a in largest],
    )
