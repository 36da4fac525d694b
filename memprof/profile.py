"""The result of profiling: plain data, pandas tables, and a schema-versioned JSON file.

A :class:`Profile` is the only thing the advisor, the report and the CLI read, so a saved
profile can be advised and reported again later, on another machine.

All sizes are integers in bytes. Tables:

``modules()``
    one row per module: ``module`` (qualified name, ``""`` for the root), ``type``, ``depth``,
    ``parent``; the bytes the module owns itself (``parameter``, ``buffer``, ``gradient``,
    ``optimizer_state`` of the parameters it owns directly, ``activation`` saved by its own
    forward, ``temporary_peak``: the most temporary bytes it had alive at once); the same
    summed over the module and its descendants (``parameter_total``, ..., ``activation_total``);
    ``peak_forward`` / ``peak_backward``: the largest total live bytes seen while it ran;
    ``forward_calls`` and ``recompute_calls`` (forwards run again in backward by checkpointing).
    Values are the largest seen during the profiled steps.
``timeline()``
    live bytes per category over the step (sampled at module boundaries and phase changes, the
    step peak always kept): ``step``, ``seq`` (an allocation counter), ``time_s``, ``phase``,
    ``module``, one column per category, and ``total``.
``steps()``
    one row per profiled step: its peak, where it happened, bytes live at its start and end.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from memprof import hooks
from memprof.allocator import AllocatorSummary
from memprof.atomic_files import write_text_atomic
from memprof.categories import CATEGORIES, PHASES
from memprof.errors import ProfileLoadError
from memprof.hooks import plugged
from memprof.oom import OOMReport
from memprof.units import format_bytes

if TYPE_CHECKING:  # pandas loads with the first table, not with `import memprof`
    import pandas as pd

SCHEMA_NAME = "memprof-profile"
SCHEMA_VERSION = 1

#: Module rows' own-bytes columns; the ``*_total`` columns add the descendants.
OWN_COLUMNS: tuple[str, ...] = (
    "parameter",
    "buffer",
    "gradient",
    "optimizer_state",
    "activation",
    "temporary_peak",
)
OUTSIDE_MODULES = "(outside modules)"


@dataclass(frozen=True)
class ModuleStats:
    """What one module owned and saw. Sizes in bytes; ``own`` maps OWN_COLUMNS to bytes."""

    name: str
    type: str
    depth: int
    parent: str | None
    own: dict[str, int]
    peak_forward: int
    peak_backward: int
    forward_calls: int
    recompute_calls: int
    forward_time_s: float = 0.0
    #: Its first forward's input and output shapes, and a convolution's kernel, stride,
    #: padding, dilation and groups (empty in profiles saved before memprof recorded them).
    geometry: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorAtPeak:
    """One storage alive at the peak."""

    category: str
    module: str
    nbytes: int
    shape: list[int]
    dtype: str
    phase: str
    #: Where the user's code made it, ``file:line in function`` ("" when not recorded); for a
    #: temporary made in backward, the line of the forward op whose autograd node made it.
    source: str = ""

    def source_text(self, path: Callable[[str], str] = str) -> str:
        """:attr:`source` as shown (``path`` shortens the file name): a backward temporary's
        reads ``backward of file:line in function``; "" when not recorded."""
        if not self.source:
            return ""
        if self.phase == "backward" and self.category == "temporary":
            return f"backward of {path(self.source)}"
        return path(self.source)


@dataclass(frozen=True)
class Peak:
    """The highest total live bytes of the profiled steps, and what was alive then."""

    total_bytes: int
    step: int
    phase: str
    module: str
    by_category: dict[str, int]
    by_module: dict[str, dict[str, int]]
    top_tensors: list[TensorAtPeak]

    def __repr__(self) -> str:
        """One line: ``Peak(1.2 GiB at step 3, backward in 'h.2': parameter 400.0 MiB, ...;
        20 top tensors)`` (the dataclass's own spelled out every module and tensor)."""
        parts = ", ".join(f"{c} {format_bytes(v)}" for c, v in self.by_category.items() if v)
        return (f"Peak({self.describe().removeprefix('peak ')}: {parts or 'nothing'}; "
                f"{len(self.top_tensors)} top tensors)")

    def describe(self) -> str:
        """One line: ``peak 1.2 GiB at step 3, backward in 'h.2.mlp'``."""
        where = f" in {self.module!r}" if self.module else ""
        return f"peak {format_bytes(self.total_bytes)} at step {self.step}, {self.phase}{where}"


@dataclass(frozen=True)
class StepStats:
    """One profiled step. ``device_*`` fields come from the CUDA allocator (None elsewhere)."""

    step: int
    peak_bytes: int
    peak_phase: str
    peak_module: str
    peak_by_category: dict[str, int]
    start_bytes: int
    end_bytes: int
    duration_s: float
    device_max_allocated: int | None = None
    device_reserved: int | None = None
    #: Reserved bytes at the step's end as the caching-allocator replay predicts them
    #: (reserved only grows while nothing is freed back to the driver): see ``allocator``.
    predicted_reserved: int | None = None


@dataclass(frozen=True)
class DeviceInfo:
    """Where the profile ran and what the device itself reported.

    ``kind`` is ``cpu``, ``cuda`` or ``fake`` (FakeTensorMode: nothing allocated, shapes exact).
    ``modelled`` lists what was modelled rather than measured (allocator rounding, context).
    ``cuda`` holds allocator counters, ``nvml`` NVML's view; each is ``{"available": False,
    "reason": ...}`` when it could not be read.
    """

    kind: str
    name: str
    allocation_rounding: int = 1
    cuda: dict[str, Any] = field(default_factory=dict)
    nvml: dict[str, Any] = field(default_factory=dict)
    modelled: list[str] = field(default_factory=list)


@dataclass
class Profile:
    """Where every byte of the profiled steps went. Build one with :func:`memprof.profile`."""

    modules_stats: list[ModuleStats]
    steps_stats: list[StepStats]
    peak_info: Peak | None
    timeline_data: dict[str, list[Any]]
    device: DeviceInfo
    environment: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    optimizers: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    advice: dict[str, Any] | None = None
    #: The CUDA caching-allocator replay of the run's allocations (memprof.allocator): ``conf``,
    #: ``replay`` (reserved_peak_bytes, allocated_peak_bytes, fragmentation_bytes, segments,
    #: largest_free_block_bytes, ...) and ``what_if`` (the same under other options); None in
    #: profiles that did not model it. A typed record that also reads as the file's dict.
    allocator: AllocatorSummary | None = None
    #: Set when the profiled run ended in an out-of-memory error (see :mod:`memprof.oom`).
    oom: OOMReport | None = None
    #: The operator trace of one profiled step (:mod:`memprof.tracking.op_trace`), for
    #: replaying the step under a change's rules from the file alone; None when not recorded.
    op_trace: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.allocator is not None and not isinstance(self.allocator, AllocatorSummary):
            # the dict a caller wrote in the file's form, as before the record
            self.allocator = AllocatorSummary.from_dict(self.allocator)

    def __repr__(self) -> str:
        """One line: ``Profile(model=GPT2LMHeadModel, device='CPU (x86_64)', peak=..., steps=2)``
        (the dataclass's own repr spelled out every record: thousands of characters)."""
        roots = [m.type for m in self.modules_stats if m.depth == 0 and m.name != OUTSIDE_MODULES]
        peak = self.peak_info.describe().removeprefix("peak ") if self.peak_info else "none"
        ended = ", out of memory" if self.oom is not None else ""
        return (f"Profile(model={'+'.join(roots) or 'none'}, device={self.device.name!r}, "
                f"peak={peak}, steps={len(self.steps_stats)}{ended})")

    # ------------------------------------------------------------------ tables
    def modules(self) -> pd.DataFrame:
        """One row per module; see the module docstring for the columns."""
        import pandas as pd

        rows = []
        for m in self.modules_stats:
            row: dict[str, Any] = {
                "module": m.name,
                "type": m.type,
                "depth": m.depth,
                "parent": m.parent,
            }
            row.update({col: int(m.own.get(col, 0)) for col in OWN_COLUMNS})
            row.update(
                peak_forward=m.peak_forward,
                peak_backward=m.peak_backward,
                forward_calls=m.forward_calls,
                recompute_calls=m.recompute_calls,
                forward_time_s=m.forward_time_s,
            )
            rows.append(row)
        columns = ["module", "type", "depth", "parent", *OWN_COLUMNS]
        totals = [f"{c}_total" for c in OWN_COLUMNS if c != "temporary_peak"]
        columns += [
            *totals,
            "peak_forward",
            "peak_backward",
            "forward_calls",
            "recompute_calls",
            "forward_time_s",
        ]
        frame = pd.DataFrame(rows, columns=[c for c in columns if c not in totals])
        for col in OWN_COLUMNS:
            if col == "temporary_peak":
                continue
            frame[f"{col}_total"] = _inclusive_sums(frame, col)
        return frame[columns]

    def steps(self) -> pd.DataFrame:
        """One row per profiled step."""
        import pandas as pd

        rows = []
        for s in self.steps_stats:
            row = asdict(s)
            by_cat = row.pop("peak_by_category")
            row.update({f"peak_{c}": int(by_cat.get(c, 0)) for c in CATEGORIES})
            rows.append(row)
        return pd.DataFrame(rows)

    def timeline(self) -> pd.DataFrame:
        """Live bytes per category over time, one row per sample."""
        import pandas as pd

        data = dict(self.timeline_data)
        frame = pd.DataFrame({k: data.get(k, []) for k in _TIMELINE_COLUMNS})
        frame["total"] = frame[list(CATEGORIES)].sum(axis=1) if len(frame) else []
        reserved = data.get("reserved")
        if reserved is not None and len(reserved) == len(frame):
            frame["reserved_predicted"] = reserved
        return frame

    def peak(self) -> Peak:
        """The peak of the profiled steps. Raises ValueError if no step was profiled."""
        if self.peak_info is None:
            raise ValueError("this profile recorded no step (was the schedule ever active?)")
        return self.peak_info

    def allocator_summary(self) -> AllocatorSummary | None:
        """:attr:`allocator` (a typed record already); None when the profile has no replay."""
        return self.allocator

    # -------------------------------------------------------------- summaries
    def steady_state_bytes(self) -> int | None:
        """Live bytes between steps once training settled (median over steps after the first)."""
        ends = [s.end_bytes for s in self.steps_stats]
        if not ends:
            return None
        settled = ends[1:] or ends
        return int(np.median(settled))

    def summary(self, *, top: int = 15) -> str:
        """A plain-text summary: the peak and the modules that hold the most memory."""
        lines = [f"memprof: {self.oom.describe()}"] if self.oom is not None else []
        if self.peak_info is not None:
            p = self.peak_info
            lines.append(f"memprof: {p.describe()} on {self.device.name}")
            parts = [
                f"{c} {format_bytes(v)}" for c, v in p.by_category.items() if v > 0
            ]
            lines.append("  at the peak: " + ", ".join(parts))
            replayed = self.allocator_summary()
            if replayed is not None:
                replay = replayed.replay
                lines.append(
                    f"  reserved (caching-allocator replay): "
                    f"{format_bytes(replay.reserved_peak_bytes)}, of which "
                    f"{format_bytes(replay.fragmentation_bytes)} cached with no tensor "
                    f"in {len(replay.segments)} segment(s)"
                )
        else:
            lines.append("memprof: no step was profiled")
        frame = self.modules()
        if len(frame):
            frame = frame.assign(
                held=frame[["parameter", "gradient", "optimizer_state", "activation"]].sum(axis=1)
            ).sort_values("held", ascending=False)
            frame = frame[frame["held"] > 0].head(top)
            lines.append("")
            lines.append(_text_table(frame))
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    # -------------------------------------------------------------- file I/O
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the file format)."""
        return {
            "schema": SCHEMA_NAME,
            "version": SCHEMA_VERSION,
            "meta": self.meta,
            "environment": self.environment,
            "device": asdict(self.device),
            "modules": [asdict(m) for m in self.modules_stats],
            "steps": [asdict(s) for s in self.steps_stats],
            "peak": asdict(self.peak_info) if self.peak_info is not None else None,
            "timeline": self.timeline_data,
            "warnings": self.warnings,
            "optimizers": self.optimizers,
            "advice": self.advice,
            "allocator": dict(self.allocator) if self.allocator is not None else None,
            "oom": self.oom.to_dict() if self.oom is not None else None,
            "op_trace": self.op_trace,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        """Rebuild a Profile from :meth:`to_dict` output (no validation of the schema header)."""
        peak = data.get("peak")
        return cls(
            modules_stats=[ModuleStats(**m) for m in data["modules"]],
            steps_stats=[StepStats(**s) for s in data["steps"]],
            peak_info=(
                Peak(
                    **{k: v for k, v in peak.items() if k != "top_tensors"},
                    top_tensors=[TensorAtPeak(**t) for t in peak["top_tensors"]],
                )
                if peak
                else None
            ),
            timeline_data=data["timeline"],
            device=DeviceInfo(**data["device"]),
            environment=data["environment"],
            warnings=list(data.get("warnings", [])),
            optimizers=list(data.get("optimizers", [])),
            meta=dict(data.get("meta", {})),
            advice=data.get("advice"),
            allocator=AllocatorSummary.from_dict(data.get("allocator")),
            oom=OOMReport.from_dict(data["oom"]) if data.get("oom") else None,
            op_trace=data.get("op_trace") if isinstance(data.get("op_trace"), dict) else None,
        )

    def _repr_html_(self) -> str:
        """Jupyter's view: the headline and the per-layer chart (memprof.report.notebook)."""
        return plugged(hooks.profile_html, "profile_html")(self)

    def report(
        self, path: str | os.PathLike[str], *, advice: Any = None, overwrite: bool = False
    ) -> Path:
        """Write the interactive HTML report (one offline file); see :func:`memprof.report`."""
        write_report = plugged(hooks.write_report, "write_report")
        return write_report(self, path, advice=advice, overwrite=overwrite)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the profile as JSON, atomically; refuses to replace a file unless ``overwrite``."""
        target = Path(path)
        text = json.dumps(self.to_dict(), separators=(",", ":"), default=_json_default)
        write_text_atomic(target, text, overwrite=overwrite)
        return target


_TIMELINE_COLUMNS: tuple[str, ...] = ("step", "seq", "time_s", "phase", "module", *CATEGORIES)


def empty_timeline() -> dict[str, list[Any]]:
    """Columnar timeline storage with no samples."""
    return {k: [] for k in _TIMELINE_COLUMNS}


def load(path: str | os.PathLike[str]) -> Profile:
    """Read a profile written by :meth:`Profile.save`.

    Raises :class:`~memprof.errors.ProfileLoadError` (one line) for a missing, unreadable,
    truncated, non-JSON, wrong-schema or newer-version file.
    """
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileLoadError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise ProfileLoadError(f"{source}: is a directory, not a profile") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileLoadError(f"{source}: cannot read it ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        ends_early = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated")
        what = "truncated" if text.lstrip()[:1] in "{[" and ends_early else "not valid JSON"
        raise ProfileLoadError(
            f"{source}: {what} (line {exc.lineno}, column {exc.colno}): not a memprof profile"
        ) from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise ProfileLoadError(
            f"{source}: JSON nested too deeply to be a memprof profile"
        ) from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_NAME:
        raise ProfileLoadError(f"{source}: not a memprof profile (no '{SCHEMA_NAME}' header)")
    version = data.get("version")
    if not isinstance(version, int):
        raise ProfileLoadError(f"{source}: profile has no schema version")
    if version > SCHEMA_VERSION:
        raise ProfileLoadError(
            f"{source}: written by a newer memprof (schema v{version}; this one reads up to "
            f"v{SCHEMA_VERSION}): upgrade memprof"
        )
    try:
        return Profile.from_dict(data)
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise ProfileLoadError(
            f"{source}: damaged profile ({type(exc).__name__}: {str(exc)[:200]})") from None


def as_profile(value: Any, *, argument: str = "profile") -> Profile:
    """``value`` as a :class:`Profile`: a Profile itself, or the finished ``.profile`` of the
    Profiler that ``with memprof.profile(...) as prof`` gives.

    The Profiler is recognised by its ``profile`` property (it lives in :mod:`memprof.tracking`,
    above this module, so it is not imported here). Inside the ``with`` block its property
    raises the RuntimeError that says the profile is not ready yet. Anything else is a
    :class:`TypeError` naming ``argument``.
    """
    if isinstance(value, Profile):
        return value
    if isinstance(getattr(type(value), "profile", None), property):
        inner = value.profile
        if isinstance(inner, Profile):
            return inner
    raise TypeError(
        f"{argument} must be a memprof Profile (or the Profiler of `with memprof.profile(...) "
        f"as prof`), not {type(value).__name__}"
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to a profile")


def _inclusive_sums(frame: pd.DataFrame, column: str) -> list[int]:
    """Sum ``column`` over each module and its descendants (by qualified-name prefix)."""
    totals = dict(zip(frame["module"], frame[column].astype("int64"), strict=True))
    result = dict(totals)
    # Deepest first, so each child's inclusive total is final before it is added to its parent.
    order = sorted(
        zip(frame["module"], frame["parent"], frame["depth"], strict=True), key=lambda r: -r[2]
    )
    for name, parent, _depth in order:
        if parent is not None and parent in result and name != parent:
            result[parent] += result[name]
    return [int(result[name]) for name in frame["module"]]


def _text_table(frame: pd.DataFrame) -> str:
    """An aligned text table of the main module columns, sizes in IEC units."""
    headers = ["module", "type", "parameter", "gradient", "optimizer_state", "activation",
               "temporary_peak"]
    body = [
        [str(r["module"]) or "(root)", str(r["type"])]
        + [format_bytes(int(r[c])) for c in headers[2:]]
        for _, r in frame.iterrows()
    ]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers)]
    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in body)])


__all__ = [
    "OUTSIDE_MODULES",
    "PHASES",
    "DeviceInfo",
    "ModuleStats",
    "Peak",
    "Profile",
    "StepStats",
    "TensorAtPeak",
    "as_profile",
    "load",
]
