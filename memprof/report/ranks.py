"""One report for the ranks of a multi-process run: their peaks side by side, the imbalance,
each rank's categories at its peak, and the memory the distributed engine owns.

``write_ranks_report([p0, p1], "reports/train.ranks.html")`` renders ``templates/ranks.html.j2``
the way :func:`memprof.report.write_report` renders the single-profile page: plotly inlined
once, the figure as JSON through ``|tojson``, no network request, and
``document.body.dataset.chartsReady`` set once the charts are drawn.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memprof.atomic_files import write_text_atomic
from memprof.categories import CATEGORIES
from memprof.errors import RanksError
from memprof.profile import Profile
from memprof.report.style import CATEGORY_COLORS, CATEGORY_LABELS, base_layout, byte_axis
from memprof.units import format_bytes


@dataclass(frozen=True)
class RankRow:
    """One rank's figures."""

    rank: int
    label: str
    peak_bytes: int
    phase: str
    module: str
    by_category: dict[str, int]
    engine: list[dict[str, Any]]
    at_peak: list[dict[str, Any]]


@dataclass(frozen=True)
class Imbalance:
    """How far apart the ranks' peaks are: ``ratio`` is max/min (1.0: balanced),
    ``over_mean`` the largest peak minus the mean peak (bytes)."""

    largest_rank: int
    smallest_rank: int
    ratio: float | None
    over_mean: int


def rank_rows(profiles: Sequence[tuple[str, Profile]]) -> list[RankRow]:
    """One row per profile, ordered by rank (``meta["distributed"]["rank"]``, else the order
    given). Raises :class:`RanksError` for a profile with no step or a rank given twice."""
    rows: list[RankRow] = []
    for position, (label, profile) in enumerate(profiles):
        info = profile.meta.get("distributed") or {}
        rank = int(info.get("rank", position))
        peak = profile.peak_info
        if peak is None:
            raise RanksError(f"{label}: the profile recorded no step")
        rows.append(RankRow(
            rank=rank, label=label, peak_bytes=int(peak.total_bytes), phase=peak.phase,
            module=peak.module, by_category={c: int(peak.by_category.get(c, 0))
                                             for c in CATEGORIES},
            engine=list(info.get("engine") or []),
            at_peak=list(info.get("at_peak") or []),
        ))
    ranks = [r.rank for r in rows]
    twice = sorted({r for r in ranks if ranks.count(r) > 1})
    if twice:
        raise RanksError(f"rank {twice[0]} is given twice: give each rank's profile once")
    return sorted(rows, key=lambda r: r.rank)


def imbalance(rows: Sequence[RankRow]) -> Imbalance:
    """The spread of the ranks' peaks."""
    largest = max(rows, key=lambda r: r.peak_bytes)
    smallest = min(rows, key=lambda r: r.peak_bytes)
    mean = statistics.fmean(r.peak_bytes for r in rows)
    ratio = largest.peak_bytes / smallest.peak_bytes if smallest.peak_bytes else None
    return Imbalance(largest_rank=largest.rank, smallest_rank=smallest.rank, ratio=ratio,
                     over_mean=round(largest.peak_bytes - mean))


def ranks_figure(rows: Sequence[RankRow]) -> dict[str, Any]:
    """Each rank's peak as one bar, stacked by category."""
    labels = [f"rank {r.rank}" for r in rows]
    traces = []
    for cat in CATEGORIES:
        values = [r.by_category[cat] for r in rows]
        if not any(values):
            continue
        traces.append({
            "type": "bar", "name": CATEGORY_LABELS[cat], "x": labels, "y": values,
            "marker": {"color": CATEGORY_COLORS[cat]},
            "text": [format_bytes(v) for v in values], "textposition": "none",
            "hovertemplate": "<b>%{x}</b><br>" + CATEGORY_LABELS[cat] + ": %{text}<extra></extra>",
        })
    top = max(r.peak_bytes for r in rows)
    layout = base_layout(
        barmode="stack", height=360,
        yaxis={"title": {"text": "bytes at the rank's peak"}, "gridcolor": "#eee",
               **byte_axis(top * 1.05)},
        xaxis={"type": "category"},
    )
    return {"data": traces, "layout": layout}


def sharding_table(rows: Sequence[RankRow],
                   profiles: Sequence[tuple[str, Profile]]) -> dict[str, Any] | None:
    """The advisor's ZeRO/FSDP rows of each rank's saved advice (``memprof run`` saves it):
    what each rank would hold per GPU under each stage. None when no profile has advice."""
    by_label = dict(profiles)
    table: list[list[str]] = []
    for r in rows:
        advice = by_label[r.label].advice or {}
        for row in advice.get("recommendations") or []:
            if row.get("technique") != "sharding":
                continue
            options = row.get("options") or {}
            predicted = row.get("predicted_peak_bytes")
            pct = row.get("saving_pct")
            table.append([
                str(r.rank), str(options.get("stage", "")), str(options.get("ranks", "")),
                format_bytes(predicted) if isinstance(predicted, int | float) else "-",
                f"{pct:+.1f}%" if isinstance(pct, int | float) else "-",
                str(row.get("reason") or "") if not row.get("applicable", True) else "",
            ])
    if not table:
        return None
    return {"columns": ["rank", "stage", "ranks", "predicted peak per rank", "saving",
                        "not applicable because"], "rows": table}


def context(profiles: Sequence[tuple[str, Profile]]) -> dict[str, Any]:
    """Template variables for the ranks page."""
    rows = rank_rows(profiles)
    spread = imbalance(rows)
    shown = [c for c in CATEGORIES if any(r.by_category[c] for r in rows)]
    world = {int((p.meta.get("distributed") or {}).get("world_size", 0)) for _, p in profiles}
    peaks = {
        "columns": ["rank", "profile", "peak", "phase", "module", *(CATEGORY_LABELS[c]
                                                                     for c in shown)],
        "rows": [[str(r.rank), r.label, format_bytes(r.peak_bytes), r.phase,
                  r.module or "(root)", *(format_bytes(r.by_category[c]) for c in shown)]
                 for r in rows],
    }
    engine_rows = [
        [str(r.rank), str(e.get("kind", "")), str(e.get("module", "")) or "(root)",
         format_bytes(int(e.get("nbytes", 0))), "yes" if e.get("extra") else "no",
         str(e.get("detail", ""))]
        for r in rows for e in r.engine
    ]
    at_peak_rows = [
        [str(r.rank), format_bytes(int(a.get("nbytes", 0))), str(a.get("category", "")),
         str(a.get("phase", "")), " or ".join(str(c) for c in a.get("candidates", []))]
        for r in rows for a in r.at_peak
    ]
    ratio = "-" if spread.ratio is None else f"{spread.ratio:.3f}"
    return {
        "rank_count": len(rows),
        "world_sizes": sorted(w for w in world if w),
        "peaks": peaks,
        "imbalance": {
            "ratio": ratio,
            "over_mean": format_bytes(spread.over_mean),
            "largest": spread.largest_rank,
            "smallest": spread.smallest_rank,
        },
        "engine": {
            "columns": ["rank", "kind", "module", "bytes", "on top of the categories",
                        "what it is"],
            "rows": engine_rows,
        } if engine_rows else None,
        "at_peak": {
            "columns": ["rank", "bytes", "counted as", "phase", "engine buffer (by size)"],
            "rows": at_peak_rows,
        } if at_peak_rows else None,
        "sharding": sharding_table(rows, profiles),
        "payload": {"figures": [{"id": "chart-ranks", **ranks_figure(rows)}]},
        "device": profiles[0][1].device.name,
    }


def render_ranks_report(profiles: Sequence[tuple[str, Profile]]) -> str:
    """The ranks report as one HTML string; ``profiles`` are (label, profile) pairs."""
    from memprof.report import _environment, _plotlyjs

    if not profiles:
        raise RanksError("no rank profiles given")
    template = _environment().get_template("ranks.html.j2")
    return str(template.render(**context(profiles), plotlyjs=_plotlyjs()))


def write_ranks_report(
    profiles: Sequence[tuple[str, Profile]],
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Write the ranks report to ``path`` atomically (refuses to replace a file unless
    ``overwrite``) and return the path."""
    target = Path(path)
    if target.exists() and not overwrite:
        write_text_atomic(target, "", overwrite=False)  # the one-line OutputExistsError
    write_text_atomic(target, render_ranks_report(profiles), overwrite=overwrite)
    return target


__all__ = [
    "Imbalance",
    "RankRow",
    "RanksError",
    "imbalance",
    "rank_rows",
    "render_ranks_report",
    "write_ranks_report",
]
