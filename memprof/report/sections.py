"""Plain-text tables for the report's sections: the breakdown at the peak, device, environment.

Every cell is a string (sizes already in IEC units); the template escapes them all.
"""

from __future__ import annotations

from typing import Any

from memprof.categories import CATEGORIES, CATEGORY_DESCRIPTIONS
from memprof.profile import Profile
from memprof.report.advice_view import cell
from memprof.report.style import CATEGORY_LABELS, module_label
from memprof.units import format_bytes

#: Modules listed in the by-module table at the peak before the rest is summed.
TOP_PEAK_MODULES = 30

Table = dict[str, Any]  # {"columns": [...], "rows": [[...], ...]}


def peak_by_category(profile: Profile) -> Table | None:
    """One row per category: bytes alive at the peak and share of it."""
    if profile.peak_info is None:
        return None
    peak = profile.peak_info
    rows = [
        [CATEGORY_LABELS[c], format_bytes(v), _pct(v, peak.total_bytes), CATEGORY_DESCRIPTIONS[c]]
        for c in CATEGORIES
        if (v := int(peak.by_category.get(c, 0))) > 0
    ]
    rows.append(["total", format_bytes(peak.total_bytes), "100%", ""])
    return {"columns": ["category", "bytes", "share", "what it is"], "rows": rows}


def peak_by_module(profile: Profile, *, top: int = TOP_PEAK_MODULES) -> Table | None:
    """What each module had alive at the peak, by category (largest first, then the rest)."""
    if profile.peak_info is None or not profile.peak_info.by_module:
        return None
    items = sorted(profile.peak_info.by_module.items(), key=lambda kv: -sum(kv[1].values()))
    cats = [c for c in CATEGORIES if any(row.get(c, 0) for _, row in items)]
    rows = [[module_label(name), *(_size(row.get(c, 0)) for c in cats),
             format_bytes(sum(row.values()))] for name, row in items[:top]]
    rest = items[top:]
    if rest:
        rows.append([f"({len(rest)} other modules)",
                     *(_size(sum(r.get(c, 0) for _, r in rest)) for c in cats),
                     format_bytes(sum(sum(r.values()) for _, r in rest))])
    return {"columns": ["module", *(CATEGORY_LABELS[c] for c in cats), "total"], "rows": rows}


def top_tensors(profile: Profile) -> Table | None:
    """The largest storages alive at the peak."""
    if profile.peak_info is None or not profile.peak_info.top_tensors:
        return None
    rows = [
        [format_bytes(t.nbytes), CATEGORY_LABELS.get(t.category, t.category),
         module_label(t.module), "×".join(str(d) for d in t.shape) or "scalar", t.dtype, t.phase,
         t.source_text() or "–"]
        for t in profile.peak_info.top_tensors
    ]
    return {"columns": ["bytes", "category", "module", "shape", "dtype", "made in",
                        "source line"], "rows": rows}


def steps_table(profile: Profile, *, limit: int = 50) -> Table | None:
    """One row per profiled step (the first ``limit``; the timeline shows them all)."""
    if not profile.steps_stats:
        return None
    rows = [
        [str(s.step), format_bytes(s.peak_bytes), s.peak_phase, module_label(s.peak_module),
         format_bytes(s.start_bytes), format_bytes(s.end_bytes), f"{s.duration_s * 1000:.1f} ms"]
        for s in profile.steps_stats[:limit]
    ]
    columns = ["step", "peak", "phase", "module", "live at start", "live at end", "duration"]
    if any(s.predicted_reserved is not None for s in profile.steps_stats):
        columns.append("reserved (predicted)")
        for row, s in zip(rows, profile.steps_stats[:limit], strict=True):
            row.append(format_bytes(s.predicted_reserved) if s.predicted_reserved is not None
                       else "–")
    return {"columns": columns, "rows": rows}


def device_facts(profile: Profile) -> dict[str, Any]:
    """Key/value facts about the device, and why allocator or NVML figures are missing."""
    dev = profile.device
    facts: list[tuple[str, str]] = [("kind", dev.kind), ("name", dev.name)]
    if dev.allocation_rounding > 1:
        facts.append(("allocation rounding", f"{dev.allocation_rounding} B blocks"))
    replayed = profile.allocator_summary()
    if replayed is not None:
        predicted = replayed.replay.reserved_peak_bytes
        facts.append(("reserved peak, predicted (allocator replay)", format_bytes(predicted)))
        measured = [s.device_reserved for s in profile.steps_stats if s.device_reserved]
        if measured:
            real = max(measured)
            facts.append(("reserved peak, measured (torch.cuda.max_memory_reserved)",
                          f"{format_bytes(real)} (predicted / measured "
                          f"{predicted / real:.3f})"))
    cuda = dev.cuda or {}
    nvml = dev.nvml or {}
    cuda_rows = [(k.replace("_", " "), cell(v, k if k == "device_index" or k == "name"
                                             else f"{k}_bytes"))
                 for k, v in cuda.items() if k != "available"] if cuda.get("available") else []
    nvml_rows: list[tuple[str, str]] = []
    nvml_devices: Table | None = None
    context: str | None = None
    if nvml.get("available"):
        for key in ("driver", "cuda", "process_used_bytes"):
            if key in nvml:
                nvml_rows.append((key.replace("_", " "), cell(nvml[key], key)))
        devices = nvml.get("devices") or []
        if devices:
            nvml_devices = {
                "columns": ["index", "name", "total", "used", "free"],
                "rows": [[str(d.get("index", "")), str(d.get("name", "")),
                          cell(d.get("total_bytes"), "bytes"), cell(d.get("used_bytes"), "bytes"),
                          cell(d.get("free_bytes"), "bytes")] for d in devices],
            }
        used, reserved = nvml.get("process_used_bytes"), cuda.get("max_reserved")
        if isinstance(used, int) and isinstance(reserved, int) and used >= reserved:
            context = (f"{format_bytes(used - reserved)}: what NVML sees for this process beyond "
                       "the allocator's reserve (the CUDA context, cuBLAS/cuDNN workspaces)")
    return {
        "facts": facts,
        "modelled": list(dev.modelled),
        "cuda": cuda_rows,
        "cuda_reason": None if cuda.get("available") else str(cuda.get("reason") or
                                                               "not recorded"),
        "nvml": nvml_rows,
        "nvml_devices": nvml_devices,
        "nvml_reason": None if nvml.get("available") else str(nvml.get("reason") or
                                                              "not recorded"),
        "context": context,
    }


def environment(profile: Profile) -> list[tuple[str, str]]:
    """Versions, device and run facts, as key/value pairs."""
    pairs = [(str(k), str(v)) for k, v in profile.environment.items()]
    pairs.append(("device", profile.device.name))
    nvml = profile.device.nvml or {}
    if nvml.get("driver"):
        pairs.append(("NVIDIA driver", str(nvml["driver"])))
    for key in ("created", "steps_seen", "interrupted", "backend"):
        if key in profile.meta:
            pairs.append((key.replace("_", " "), cell(profile.meta[key], key)))
    inputs = profile.meta.get("inputs")
    if inputs:
        pairs.append(("inputs", cell(inputs, "inputs")))
    ranks = profile.meta.get("distributed") or {}
    if "rank" in ranks:
        pairs.append(("rank", f"{ranks['rank']} of {ranks.get('world_size', '?')} "
                              f"({ranks.get('backend', 'no process group')})"))
    for kind, nbytes in (ranks.get("engine_bytes") or {}).items():
        pairs.append((f"engine: {kind}", format_bytes(int(nbytes))))
    return pairs


def optimizers(profile: Profile) -> Table | None:
    """The optimizers seen: class, parameters and state bytes."""
    if not profile.optimizers:
        return None
    rows = [[str(o.get("class", "")), str(o.get("num_parameters", "")),
             cell(o.get("parameter_bytes"), "bytes"), cell(o.get("state_bytes"), "bytes"),
             cell(o.get("defaults", {}), "defaults")] for o in profile.optimizers]
    return {"columns": ["optimizer", "parameters", "parameter bytes", "state bytes",
                        "settings"], "rows": rows}


def _size(value: int) -> str:
    return format_bytes(value) if value else ""


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "–"
