"""Write a profile as Chrome trace-event JSON (Perfetto, chrome://tracing).

One process, "memprof": a counter track ``memory`` with the live bytes of each category
(``"ph": "C"``, sampled where the profile's timeline was), and duration slices (``"ph": "X"``)
on three threads: the steps, the phases, and the modules, nested by their dotted path (a
module's slice holds its children's). Times are microseconds from the first profiled step, the
steps laid end to end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memprof.categories import CATEGORIES
from memprof.profile import OUTSIDE_MODULES, Profile, as_profile

if TYPE_CHECKING:
    from memprof.tracking.session import Profiler

PID = 1
STEP_TID, PHASE_TID, MODULE_TID = 1, 2, 3


def to_trace(profile: Profile | Profiler) -> dict[str, Any]:
    """The trace as a JSON-ready dict (``traceEvents``, ``displayTimeUnit``)."""
    profile = as_profile(profile)
    events: list[dict[str, Any]] = [
        _meta("process_name", 0, {"name": f"memprof: {profile.device.name}"}),
        _meta("thread_name", STEP_TID, {"name": "steps"}),
        _meta("thread_name", PHASE_TID, {"name": "phases"}),
        _meta("thread_name", MODULE_TID, {"name": "modules"}),
    ]
    starts: dict[int, float] = {}
    clock = 0.0
    for step in profile.steps_stats:
        starts[step.step] = clock
        duration = max(step.duration_s, 0.0) * 1e6
        events.append(_slice(f"step {step.step}", "step", STEP_TID, clock, duration,
                             {"peak_bytes": step.peak_bytes, "peak_phase": step.peak_phase,
                              "peak_module": step.peak_module}))
        clock += duration
    samples = _samples(profile, starts)
    for ts, _step, _phase, _module, values in samples:
        events.append({"name": "memory", "cat": "memory", "ph": "C", "pid": PID, "ts": ts,
                       "args": dict(zip(CATEGORIES, values, strict=True))})
    events.extend(_phase_slices(samples))
    events.extend(_module_slices(samples))
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"exported_from": "memprof", "device": profile.device.name}}


def write_trace(profile: Profile | Profiler, path: str | os.PathLike[str], *,
                overwrite: bool = False) -> Path:
    """Write :func:`to_trace` as JSON to ``path`` atomically."""
    from memprof.snapshot.files import write_bytes_atomic

    target = Path(path)
    text = json.dumps(to_trace(profile), separators=(",", ":"))
    write_bytes_atomic(target, text.encode("utf-8"), overwrite=overwrite)
    return target


Sample = tuple[float, int, str, str, list[int]]


def _samples(profile: Profile, starts: dict[int, float]) -> list[Sample]:
    """Timeline rows as (ts in us, step, phase, module, bytes per category), in time order."""
    data = profile.timeline_data
    out: list[Sample] = []
    for i, step in enumerate(data.get("step", [])):
        ts = starts.get(int(step), 0.0) + float(data["time_s"][i]) * 1e6
        out.append((round(ts, 3), int(step), str(data["phase"][i]), str(data["module"][i]),
                    [int(data[c][i]) for c in CATEGORIES]))
    out.sort(key=lambda s: s[0])
    return out


def _phase_slices(samples: list[Sample]) -> list[dict[str, Any]]:
    """One slice per run of samples in the same step and phase."""
    events = []
    run_start = 0
    for i in range(1, len(samples) + 1):
        if i < len(samples) and samples[i][1:3] == samples[run_start][1:3]:
            continue
        start = samples[run_start][0]
        end = samples[i][0] if i < len(samples) else samples[-1][0]
        if end > start:
            events.append(_slice(samples[run_start][2], "phase", PHASE_TID, start, end - start,
                                 {"step": samples[run_start][1]}))
        run_start = i
    return events


def _module_slices(samples: list[Sample]) -> list[dict[str, Any]]:
    """Nested slices: a module is open from the first sample in it (or in one of its children)
    to the first sample outside it."""
    events: list[dict[str, Any]] = []
    stack: list[tuple[str, float, str]] = []  # (module path, start, phase)
    for ts, _step, phase, module, _values in samples:
        path = _ancestry(module)
        keep = 0
        while keep < len(stack) and keep < len(path) and stack[keep][0] == path[keep]:
            keep += 1
        while len(stack) > keep:
            name, start, opened_in = stack.pop()
            if ts > start:
                events.append(_slice(name or "(root)", "module", MODULE_TID, start, ts - start,
                                     {"module": name, "phase": opened_in}))
        for name in path[keep:]:
            stack.append((name, ts, phase))
    end = samples[-1][0] if samples else 0.0
    while stack:
        name, start, opened_in = stack.pop()
        if end > start:
            events.append(_slice(name or "(root)", "module", MODULE_TID, start, end - start,
                                 {"module": name, "phase": opened_in}))
    return events


def _ancestry(module: str) -> list[str]:
    """``"h.0.mlp"`` -> ``["", "h", "h.0", "h.0.mlp"]`` (root first); none outside modules."""
    if module == OUTSIDE_MODULES:
        return []
    if module == "":
        return [""]
    parts = module.split(".")
    return ["", *(".".join(parts[: i + 1]) for i in range(len(parts)))]


def _slice(name: str, cat: str, tid: int, ts: float, dur: float,
           args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "cat": cat, "ph": "X", "pid": PID, "tid": tid, "ts": round(ts, 3),
            "dur": round(dur, 3), "args": args}


def _meta(name: str, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": PID, "tid": tid, "args": args}
