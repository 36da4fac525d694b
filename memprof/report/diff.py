"""The comparison report: two runs in one self-contained HTML file (``memprof diff -o``).

Rendered from ``templates/diff.html.j2`` with the same jinja2 environment, inlined plotly.js
and Content-Security-Policy as the profile report; the data reaches the page as JSON.
Charts: both timelines' totals overlaid (each step stretched to the same width, so step i of A
sits over step i of B), and the change at the peak by category.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from memprof.atomic_files import write_text_atomic
from memprof.compare import TOTAL, compare, peak_line, signed_bytes, signed_pct
from memprof.profile import Profile, as_profile
from memprof.report.style import CATEGORY_COLORS, CATEGORY_LABELS, FONT, module_label
from memprof.units import format_bytes

if TYPE_CHECKING:
    from memprof.tracking.session import Profiler

#: Rows of the per-module tables: the largest changes first.
TOP_ROWS = 40


def write_diff_report(
    a: Profile | Profiler,
    b: Profile | Profiler,
    path: str | os.PathLike[str],
    *,
    names: tuple[str, str] = ("A", "B"),
    overwrite: bool = False,
) -> Path:
    """Write the comparison of ``a`` and ``b`` to ``path`` (refuses to replace a file unless
    ``overwrite``) and return the path."""
    target = Path(path)
    if target.exists() and not overwrite:
        write_text_atomic(target, "", overwrite=False)  # raises OutputExistsError
    write_text_atomic(target, render_diff(a, b, names=names), overwrite=overwrite)
    return target


def render_diff(a: Profile | Profiler, b: Profile | Profiler, *,
                names: tuple[str, str] = ("A", "B")) -> str:
    """The comparison as one HTML string."""
    a, b = as_profile(a, argument="a"), as_profile(b, argument="b")
    from memprof.report import _environment, _plotlyjs

    frame = compare(a, b)
    figures = [f for f in (_timeline_overlay(a, b, names), _peak_delta_figure(frame))
               if f is not None]
    template = _environment().get_template("diff.html.j2")
    return template.render(
        names=names,
        headline=peak_line(frame),
        peaks=[_peak_text(a), _peak_text(b)],
        ooms=[p.oom.describe() if p.oom is not None else None for p in (a, b)],
        tables=[
            ("at the peak, by category", "diff-peak", _table(frame, "peak", names, False)),
            ("per module at the peak", "diff-peak-modules",
             _table(frame, "peak_module", names, True)),
            ("per phase (highest live bytes)", "diff-phases", _table(frame, "phase", names, False)),
            ("step peaks", "diff-steps", _table(frame, "step", names, False)),
            ("per module, the most held over the steps", "diff-modules",
             _table(frame, "module", names, True)),
        ],
        payload={"figures": figures},
        plotlyjs=_plotlyjs(),
    )


def _peak_text(profile: Profile) -> str:
    if profile.peak_info is None:
        return "no step profiled"
    return f"{profile.peak_info.describe()} on {profile.device.name}"


def _table(frame: pd.DataFrame, section: str, names: tuple[str, str],
           changes_only: bool) -> dict[str, Any]:
    part = frame[frame.section == section]
    if changes_only:
        part = part[(part.delta_bytes != 0) | (part.present != "both")]
        part = part.reindex(part.delta_bytes.abs().sort_values(ascending=False).index)
        part = part.head(TOP_ROWS)
    label = {"peak": "category", "phase": "phase", "step": "step"}.get(section, "module")
    columns = [label, *(["category"] if label == "module" else []), names[0], names[1],
               "change", "%", "present"]
    rows = []
    for r in part.itertuples():
        first = module_label(str(r.name)) if label == "module" else (
            str(r.category) if label == "category" else str(r.name))
        cells = [first, *([str(r.category)] if label == "module" else []),
                 format_bytes(int(r.a_bytes)), format_bytes(int(r.b_bytes)),
                 signed_bytes(int(r.delta_bytes)), signed_pct(float(r.delta_pct)), str(r.present)]
        rows.append(cells)
    return {"columns": columns, "rows": rows}


def _stretched(profile: Profile) -> tuple[list[float], list[int]]:
    """Timeline x (step i spans [i, i+1), samples evenly inside it) and total bytes."""
    frame = profile.timeline()
    if not len(frame):
        return [], []
    xs: list[float] = []
    for position, (_step, group) in enumerate(frame.groupby("step", sort=True)):
        n = len(group)
        xs.extend(position + i / max(n, 1) for i in range(n))
    ordered = frame.sort_values(["step"], kind="stable")
    return xs, [int(v) for v in ordered["total"]]


def _timeline_overlay(a: Profile, b: Profile, names: tuple[str, str]) -> dict[str, Any] | None:
    traces = []
    for profile, name, color in ((a, names[0], "#4c78a8"), (b, names[1], "#e45756")):
        xs, ys = _stretched(profile)
        if not xs:
            continue
        traces.append({
            "type": "scatter", "mode": "lines", "name": f"{name} total", "x": xs, "y": ys,
            "text": [format_bytes(v) for v in ys], "hovertemplate": f"{name}: %{{text}}",
            "line": {"color": color, "width": 1.5},
        })
    if not traces:
        return None
    return {"id": "chart-diff-timeline", "data": traces, "layout": {
        "font": {"family": FONT}, "height": 360, "margin": {"t": 30, "r": 20},
        "xaxis": {"title": {"text": "profiled step (each stretched to the same width)"}},
        "yaxis": {"title": {"text": "live bytes"}},
        "legend": {"orientation": "h"},
    }}


def _peak_delta_figure(frame: pd.DataFrame) -> dict[str, Any] | None:
    part = frame[(frame.section == "peak") & (frame.category != TOTAL)]
    part = part[(part.a_bytes != 0) | (part.b_bytes != 0)]
    if not len(part):
        return None
    cats = [str(c) for c in part.category]
    deltas = [int(v) for v in part.delta_bytes]
    return {"id": "chart-diff-peak", "data": [{
        "type": "bar", "x": [CATEGORY_LABELS.get(c, c) for c in cats], "y": deltas,
        "marker": {"color": [CATEGORY_COLORS.get(c, "#888") for c in cats]},
        "text": [signed_bytes(v) for v in deltas], "hovertemplate": "%{x}: %{text}",
        "name": "change at the peak",
    }], "layout": {
        "font": {"family": FONT}, "height": 300, "margin": {"t": 30, "r": 20},
        "yaxis": {"title": {"text": "B - A at the peak (bytes)"}},
    }}


__all__ = ["render_diff", "write_diff_report"]
