"""The Profile's records, built from what the profiler saw: each logged step's
:class:`~memprof.profile.StepStats`, peak breakdown and timeline chunk (:class:`StepRecords`),
the device (:func:`device_info`) and, when the profile ends, the
:class:`~memprof.profile.Profile` itself (:func:`build_profile`)."""

from __future__ import annotations

import platform
import warnings
from collections.abc import Callable
from operator import itemgetter
from typing import Any

import torch
from torch import nn

from memprof.allocator import AllocatorSummary
from memprof.categories import CATEGORIES, PHASES
from memprof.decimate import decimate
from memprof.devices import CUDA_BLOCK_BYTES, cuda_allocator_stats, nvml
from memprof.profile import (
    OUTSIDE_MODULES,
    DeviceInfo,
    ModuleStats,
    Peak,
    Profile,
    StepStats,
    TensorAtPeak,
    empty_timeline,
)
from memprof.tracking import kernel_corrections
from memprof.tracking.environment import environment
from memprof.tracking.leak import MemoryLeakWarning, leak_warning
from memprof.tracking.ledger import ACTIVATION, OUTSIDE, TEMPORARY, Entry, StorageLedger
from memprof.tracking.modules import ModuleRegistry


def module_name(registry: ModuleRegistry, module: int) -> str:
    """The profile's name of the module at index ``module`` (what ran outside any module has
    :data:`~memprof.profile.OUTSIDE_MODULES`)."""
    return OUTSIDE_MODULES if module == OUTSIDE else registry.infos[module].name


class StepRecords:
    """What the profile keeps of each logged step as it ends: its StepStats, its timeline
    chunk, the breakdown of the highest peak so far, and which steps an exception cut short.

    ``name`` gives a module index's name (:func:`module_name`); ``timeline_points`` and
    ``top_tensors`` are the Profiler's options of those names."""

    def __init__(self, name: Callable[[int], str], *, timeline_points: int,
                 top_tensors: int) -> None:
        self._name = name
        self._timeline_points = timeline_points
        self._top_tensors = top_tensors
        self.steps: list[StepStats] = []
        self.interrupted: set[int] = set()  # steps an exception cut short
        self.timeline_chunks: list[dict[str, list[Any]]] = []
        self.peak: Peak | None = None

    def record(self, ledger: StorageLedger, *, step: int, start_live: dict[int, Entry],
               start_bytes: int, started: float, device: tuple[int, int] | None) -> None:
        """Keep step ``step``, which began at ``started`` (the ledger's clock) with
        ``start_live`` alive (``start_bytes`` in all); ``device``: CUDA's max allocated and
        reserved bytes for it, if CUDA is in use."""
        ledger.sample()
        peak = ledger.peak
        by_category = dict(zip(CATEGORIES, peak.by_category, strict=True))
        device_max, device_reserved = device if device is not None else (None, None)
        if self.peak is None or peak.total > self.peak.total_bytes:
            self.peak = self._peak_breakdown(ledger, step, start_live)
            by_category = dict(self.peak.by_category)
        self.steps.append(
            StepStats(
                step=step,
                peak_bytes=peak.total,
                peak_phase=PHASES[peak.phase],
                peak_module=self._name(peak.module),
                peak_by_category=by_category,
                start_bytes=start_bytes,
                end_bytes=ledger.total,
                duration_s=ledger.clock() - started,
                device_max_allocated=device_max,
                device_reserved=device_reserved,
                predicted_reserved=ledger.allocator.reserved if ledger.allocator else None,
            )
        )
        self.timeline_chunks.append(self._timeline_chunk(ledger, step, started))

    def _peak_breakdown(self, ledger: StorageLedger, step: int,
                        start_live: dict[int, Entry]) -> Peak:
        """What was alive at this step's peak, with each storage's resolved role."""
        peak = ledger.peak
        live = ledger.live_at(start_live, peak.seq)
        by_category = dict.fromkeys(CATEGORIES, 0)
        by_module: dict[str, dict[str, int]] = {}
        for entry in live:
            category = CATEGORIES[entry.category]
            by_category[category] += entry.nbytes
            row = by_module.setdefault(self._name(entry.module), dict.fromkeys(CATEGORIES, 0))
            row[category] += entry.nbytes
        largest = sorted(live, key=lambda e: e.nbytes, reverse=True)[: self._top_tensors]
        return Peak(
            total_bytes=peak.total,
            step=step,
            phase=PHASES[peak.phase],
            module=self._name(peak.module),
            by_category=by_category,
            by_module={k: {c: v for c, v in row.items() if v} for k, row in by_module.items()},
            top_tensors=[
                TensorAtPeak(
                    category=CATEGORIES[e.category],
                    module=self._name(e.module),
                    nbytes=e.nbytes,
                    shape=[int(d) for d in e.shape],
                    dtype=str(e.dtype).replace("torch.", ""),
                    phase=PHASES[e.phase],
                    source=e.source,
                )
                for e in largest
            ],
        )

    def _timeline_chunk(self, ledger: StorageLedger, step: int,
                        started: float) -> dict[str, list[Any]]:
        peak = ledger.peak
        samples = list(ledger.samples)
        samples.append((peak.order, peak.time, peak.phase, peak.module, peak.by_category,
                        peak.reserved))
        samples.sort(key=_ORDER)
        kept = decimate(samples, self._timeline_points, key=lambda s: sum(s[4]))
        chunk = empty_timeline()
        if ledger.allocator is not None:
            chunk["reserved"] = [sample[5] for sample in kept]
        if not kept:
            return chunk
        # Column by column (this runs at every step's end, up to timeline_points rows).
        seqs, whens, phases, modules, totals, _reserved = zip(*kept, strict=True)
        t0 = started
        chunk["step"] = [step] * len(kept)
        chunk["seq"] = list(seqs)
        chunk["time_s"] = [round(when - t0, 6) for when in whens]
        chunk["phase"] = [PHASES[phase] for phase in phases]
        names: dict[int, str] = {}
        chunk["module"] = [names[m] if m in names else names.setdefault(m, self._name(m))
                           for m in modules]
        for name, column in zip(CATEGORIES, zip(*totals, strict=True), strict=True):
            chunk[name] = list(column)
        return chunk


_ORDER = itemgetter(0, 1)  # a timeline sample's order: its ledger sequence, then its time


def device_info(model: nn.Module | None, *, fake: bool, device_modelled: str | None,
                round_to: int, corrections: Any) -> DeviceInfo:
    """The device the profile ran on: a fake one under FakeTensorMode (with what was modelled:
    ``round_to``, the kernel ``corrections`` in use), else CUDA where ``model`` or the process
    uses it, else the CPU."""
    param = next(iter(model.parameters()), None) if model is not None else None
    if fake:
        target = device_modelled or "cpu"
        modelled = ["nothing was allocated: sizes come from FakeTensorMode"]
        if round_to > 1:
            modelled.append(f"allocator rounding to {round_to}-byte blocks")
        if corrections is not None:
            modelled.extend(corrections.notes())
        modelled.extend(kernel_corrections.modelled_notes(target))
        return DeviceInfo(
            kind="fake",
            name=f"fake {target}",
            allocation_rounding=round_to,
            cuda={"available": False, "reason": "estimate under FakeTensorMode"},
            nvml={"available": False, "reason": "estimate under FakeTensorMode"},
            modelled=modelled,
        )
    on_cuda = (param is not None and param.is_cuda) or (
        torch.cuda.is_available() and torch.cuda.is_initialized()
    )
    if on_cuda:
        stats = cuda_allocator_stats()
        return DeviceInfo(
            kind="cuda",
            name=str(stats.get("name", "cuda")),
            allocation_rounding=CUDA_BLOCK_BYTES,
            cuda=stats,
            nvml=nvml().process_view(),
        )
    return DeviceInfo(
        kind="cpu",
        name=f"CPU ({platform.machine() or 'unknown'})",
        cuda=cuda_allocator_stats(),
        nvml=nvml().process_view(),
    )


def build_profile(
    ledger: StorageLedger,
    registry: ModuleRegistry,
    records: StepRecords,
    *,
    active_steps: int,
    warnings_so_far: list[str],
    ran_eagerly: bool,
    compiled_attributed: int,
    device: DeviceInfo,
    optimizers: list[dict[str, Any]],
    allocator: AllocatorSummary | None,
    op_trace: dict[str, Any] | None,
    meta: dict[str, Any],
) -> Profile:
    """The finished Profile: the per-module table from the ledger's maxima, the steps, peak and
    timeline of ``records``, and the warnings (``warnings_so_far`` and those found here: how
    compiled modules were measured, tensors not counted, a leak, which is also warned as a
    :class:`~memprof.tracking.leak.MemoryLeakWarning`). ``ran_eagerly``: the dispatch backend
    measured real tensors (a compiled module then runs eagerly); ``compiled_attributed``: the
    saved tensors of compiled regions given their source module."""
    modules = []
    steps = max(active_steps, 1)
    for idx, info in enumerate(registry.infos):
        if idx == OUTSIDE:
            continue
        most = ledger.module_max[idx]
        own = {
            "parameter": most[0],
            "buffer": most[1],
            "gradient": most[2],
            "optimizer_state": most[3],
            "activation": most[ACTIVATION],
            "temporary_peak": most[TEMPORARY],
        }
        modules.append(
            ModuleStats(
                name=info.name,
                type=info.type,
                depth=info.depth,
                parent=None if info.parent is None else registry.infos[info.parent].name,
                own=own,
                peak_forward=info.peak_forward,
                peak_backward=info.peak_backward,
                forward_calls=info.forward_calls,
                recompute_calls=info.recompute_calls,
                forward_time_s=info.forward_time_s / steps,
                geometry=info.geometry or {},
            )
        )
    timeline = empty_timeline()
    for chunk in records.timeline_chunks:
        for key, values in chunk.items():
            timeline.setdefault(key, []).extend(values)
    warnings_ = list(warnings_so_far)
    compiled = [i.name for i in registry.infos if i.type == "OptimizedModule"]
    if compiled and ran_eagerly:
        # dynamo compiles nothing while a Python dispatch mode is active ("non-infra torch
        # dispatch mode present"): the profiled steps ran eagerly, with eager's numerics
        warnings_.append(
            f"torch.compile: {', '.join(repr(n) for n in compiled)} ran eagerly, not "
            "compiled: dynamo does not compile under the dispatch backend's dispatch mode, "
            "so its results and memory are eager's (profile with backend='events' to "
            "measure the compiled model)"
        )
    elif compiled and compiled_attributed:
        warnings_.append(
            f"torch.compile: {', '.join(repr(n) for n in compiled)} ran compiled; each "
            "tensor its compiled regions save for backward is charged to the module whose "
            "code made it (eager charges the module whose op saved it), and the regions' "
            "temporaries to that row (the modules inside them run no hooks)"
        )
    elif compiled:
        warnings_.append(
            f"torch.compile: {', '.join(repr(n) for n in compiled)} ran compiled; the memory "
            "of its compiled regions is charged to that row (the modules inside them run "
            "no hooks, and their graphs were compiled before the profile or with a "
            "post-grad pass of the user's, so their source modules are unknown). Compile "
            "inside the profile, or profile without torch.compile, for per-layer numbers."
        )
    if ledger.uncounted:
        kinds = ", ".join(f"{n} x {kind}" for kind, n in sorted(ledger.uncounted.items()))
        warnings_.append(
            f"not counted: tensors whose memory cannot be read ({kinds}); their bytes are "
            "missing from every figure"
        )
    # An interrupted step ended mid-step (an out-of-memory error in a forward): its live
    # bytes are no between-step bytes.
    leak = leak_warning(
        [s.end_bytes for s in records.steps if s.step not in records.interrupted]
    )
    if leak:
        warnings_.append(leak)
        # build_profile <- Profiler._build <- Profiler.__exit__ <- the user's with statement
        warnings.warn(leak, MemoryLeakWarning, stacklevel=4)
    return Profile(
        modules_stats=modules,
        steps_stats=list(records.steps),
        peak_info=records.peak,
        timeline_data=timeline,
        device=device,
        environment=environment(),
        warnings=warnings_,
        optimizers=optimizers,
        allocator=allocator,
        op_trace=op_trace,
        meta=meta,
    )
