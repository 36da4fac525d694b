"""The report's plotly figures, built as figure JSON (``{"data": [...], "layout": {...}}``).

Every size a user reads is in IEC units (hover text and axis ticks come from
:func:`memprof.units.format_bytes`), and every user-controlled string is escaped with
:func:`~memprof.report.style.ptext` before plotly sees it. Large profiles are reduced here, on
the server side, so the file stays small: the timeline keeps each step's highs and lows, the
hierarchy keeps the largest modules and groups the rest per parent.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from memprof.categories import CATEGORIES
from memprof.decimate import decimate
from memprof.profile import Profile
from memprof.report import advice_view
from memprof.report.style import (
    CATEGORY_COLORS,
    CATEGORY_LABELS,
    PHASE_COLORS,
    base_layout,
    byte_axis,
    module_label,
    ptext,
)
from memprof.units import format_bytes

Figure = dict[str, Any]

#: Timeline samples kept over the whole profile (each step keeps at least MIN_STEP_POINTS).
TIMELINE_POINTS = 4000
MIN_STEP_POINTS = 4
#: A step's idle start is compressed when it lasts at least this long (seconds) ...
LEAD_IN_MIN_S = 0.5
#: ... and this many times the median step; it is then drawn this fraction of the step's rest.
LEAD_IN_FACTOR = 5.0
LEAD_IN_KEPT = 0.1
#: Module rows in the per-layer bars before the rest is summed into one row.
TOP_LAYERS = 25
#: Nodes of the module hierarchy drawn before smaller modules are grouped per parent.
HIERARCHY_NODES = 250
#: The categories a module holds (the per-module table's own columns, temporary excluded).
HELD = ("parameter", "buffer", "gradient", "optimizer_state", "activation")


# ---------------------------------------------------------------- timeline
def timeline_figure(profile: Profile) -> Figure | None:
    """Live bytes stacked by category, with phase bands, step boundaries and the peak."""
    data = profile.timeline_data
    steps = [int(s) for s in data.get("step", [])]
    if not steps:
        return None
    columns = {c: [int(v) for v in data.get(c, [0] * len(steps))] for c in CATEGORIES}
    totals = [sum(columns[c][i] for c in CATEGORIES) for i in range(len(steps))]
    times = [float(t) for t in data.get("time_s", [])]
    use_times = _has_durations(profile) and len(times) == len(steps)
    kept = _decimated_rows(steps, totals, times if use_times else None)
    xs, boundaries = _positions(profile, steps, times, kept)
    phases = [str(p) for p in data.get("phase", [""] * len(steps))]
    modules = [str(m) for m in data.get("module", [""] * len(steps))]

    traces: list[dict[str, Any]] = []
    traces.extend(_phase_bands(kept, xs, steps, phases, boundaries))
    if len(boundaries) > 2:
        bx: list[float | None] = []
        by: list[float | None] = []
        for b in boundaries[1:-1]:
            bx += [b, b, None]
            by += [0, 1, None]
        traces.append({
            "type": "scatter", "mode": "lines", "x": bx, "y": by, "yaxis": "y2",
            "name": "step boundary", "hoverinfo": "skip",
            "line": {"color": "#555", "width": 1, "dash": "dot"},
        })
    for cat in CATEGORIES:
        ys = [columns[cat][i] for i in kept]
        if not any(ys):
            continue
        traces.append({
            "type": "scatter", "mode": "lines", "stackgroup": "live", "name": CATEGORY_LABELS[cat],
            "x": xs, "y": ys, "text": [format_bytes(v) for v in ys],
            "hovertemplate": "%{text}", "line": {"width": 0.5, "color": CATEGORY_COLORS[cat]},
            "fillcolor": CATEGORY_COLORS[cat],
        })
    kept_totals = [totals[i] for i in kept]
    traces.append({
        "type": "scatter", "mode": "lines", "name": "total", "x": xs, "y": kept_totals,
        "line": {"width": 1, "color": "#222"},
        "text": [format_bytes(v) for v in kept_totals],
        "customdata": [[steps[i], phases[i], ptext(module_label(modules[i]))] for i in kept],
        "hovertemplate": "<b>%{text}</b> · step %{customdata[0]}, %{customdata[1]}"
                         "<br>module %{customdata[2]}",
    })
    reserved = data.get("reserved")
    if reserved is not None and len(reserved) == len(steps):
        kept_reserved = [int(reserved[i]) for i in kept]
        traces.append({
            "type": "scatter", "mode": "lines", "name": "reserved (allocator replay)",
            "x": xs, "y": kept_reserved, "line": {"width": 1.5, "color": "#7f7f7f",
                                                  "dash": "dash", "shape": "hv"},
            "text": [format_bytes(v) for v in kept_reserved],
            "hovertemplate": "reserved %{text} (predicted)",
        })
        top = max(kept_reserved, default=0)
    else:
        top = 0
    peak_total = max(kept_totals)
    peak_at = kept_totals.index(peak_total)
    if profile.peak_info is not None:
        # The profile's own peak decides; its sample is always kept (highs survive decimation).
        for pos, i in enumerate(kept):
            if steps[i] == profile.peak_info.step and totals[i] == profile.peak_info.total_bytes:
                peak_at, peak_total = pos, totals[i]
                break
    traces.append({
        "type": "scatter", "mode": "markers+text", "name": "peak",
        "x": [xs[peak_at]], "y": [peak_total],
        "text": [f"peak {format_bytes(peak_total)}"], "textposition": "top center",
        "marker": {"symbol": "triangle-down", "size": 12, "color": "#d62728"},
        "hovertemplate": "peak %{text}", "cliponaxis": False,
    })
    use_time = _has_durations(profile)
    layout = base_layout(
        hovermode="x unified",
        dragmode="zoom",
        height=420,
        xaxis={"title": {"text": "profiled time (s), steps end to end" if use_time
                         else "sample"}, "showgrid": False, "zeroline": False},
        yaxis={"title": {"text": "live memory"}, "fixedrange": True, "gridcolor": "#eee",
               **byte_axis(max(peak_total, top) * 1.12)},
        yaxis2={"overlaying": "y", "range": [0, 1], "visible": False, "fixedrange": True},
    )
    note = lead_in_note(profile) if use_time else None
    if note is not None:
        layout["xaxis"]["title"]["text"] += " · start-up compressed (see note)"
        layout["annotations"] = [{
            "x": 0, "xref": "x", "y": 1, "yref": "paper", "xanchor": "left", "yanchor": "bottom",
            "text": "⟨start-up compressed⟩", "showarrow": False,
            "font": {"size": 10, "color": "#555"}, "hovertext": ptext(note),
        }]
    return {"data": traces, "layout": layout}


def _decimated_rows(
    steps: list[int], totals: list[int], times: list[float] | None = None
) -> list[int]:
    """Row indices to draw: per step its first, last and each bucket's low and high."""
    order: list[int] = []
    groups: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(steps):
        if s not in groups:
            order.append(s)
        groups[s].append(i)
    per_step = max(MIN_STEP_POINTS, TIMELINE_POINTS // max(len(order), 1))
    kept: list[int] = []
    for s in order:
        rows = groups[s]
        if times is not None:  # draw in time order (samples are recorded in allocation order)
            rows = sorted(rows, key=lambda i: times[i])
        kept.extend(decimate(rows, per_step, key=lambda i: totals[i]))
    return kept


def _has_durations(profile: Profile) -> bool:
    return bool(profile.steps_stats) and all(s.duration_s > 0 for s in profile.steps_stats)


def _positions(
    profile: Profile, steps: list[int], times: list[float], kept: list[int]
) -> tuple[list[float], list[float]]:
    """X of each kept row (seconds, steps laid end to end) and the step boundaries."""
    if not _has_durations(profile) or len(times) != len(steps):
        xs = [float(i) for i in kept]
        starts = [float(i) for n, i in enumerate(kept) if n == 0 or steps[kept[n - 1]] != steps[i]]
        return xs, [*starts, float(kept[-1] + 1)]
    durations = {s.step: s.duration_s for s in profile.steps_stats}
    offsets: dict[int, float] = {}
    longest: dict[int, float] = defaultdict(float)
    for s, t in zip(steps, times, strict=True):
        longest[s] = max(longest[s], t)
    cuts = idle_lead_ins(profile, steps, times)
    clock = 0.0
    for s in dict.fromkeys(steps):
        offsets[s] = clock
        clock += max(durations.get(s, 0.0), longest[s]) - (cuts[s].cut if s in cuts else 0.0)
    xs = [
        round(offsets[steps[i]] + (cuts[steps[i]].place(times[i]) if steps[i] in cuts
                                   else times[i]), 6)
        for i in kept
    ]
    return xs, [*offsets.values(), clock]


@dataclass(frozen=True)
class LeadIn:
    """A step's idle start (a script's imports and model building under ``memprof run``),
    drawn compressed: its ``seconds`` before the first module call take ``kept`` seconds."""

    seconds: float
    kept: float

    @property
    def cut(self) -> float:
        return self.seconds - self.kept

    def place(self, t: float) -> float:
        """Where time ``t`` of the step is drawn (linear inside the lead-in, shifted after)."""
        if t >= self.seconds:
            return t - self.cut
        return t * self.kept / self.seconds if self.seconds else t


def idle_lead_ins(profile: Profile, steps: list[int], times: list[float]) -> dict[int, LeadIn]:
    """Steps whose start before their first module call dwarfs the work after it.

    Such a lead-in (at least LEAD_IN_MIN_S, over half the step, and, with other steps to
    compare, LEAD_IN_FACTOR times their median length) would squash every other step into a
    sliver; it is drawn as LEAD_IN_KEPT of the rest of the step and said so on the chart.
    """
    phases = profile.timeline_data.get("phase", [])
    first_call: dict[int, float] = {}
    for s, t, phase in zip(steps, times, phases, strict=False):
        if phase != "other" and (s not in first_call or t < first_call[s]):
            first_call[s] = t
    durations = {st.step: st.duration_s for st in profile.steps_stats}
    out: dict[int, LeadIn] = {}
    for s, lead in first_call.items():
        total = durations.get(s, 0.0)
        others = [d for k, d in durations.items() if k != s]
        typical = sorted(others)[len(others) // 2] if others else 0.0
        if lead < LEAD_IN_MIN_S or lead < total / 2:
            continue
        if others and lead < LEAD_IN_FACTOR * typical:
            continue
        rest = max(total - lead, typical, 1e-6)
        out[s] = LeadIn(seconds=lead, kept=LEAD_IN_KEPT * rest)
    return out


def lead_in_note(profile: Profile) -> str | None:
    """One sentence for the chart when a lead-in was compressed, else None."""
    data = profile.timeline_data
    steps = [int(s) for s in data.get("step", [])]
    times = [float(t) for t in data.get("time_s", [])]
    if not _has_durations(profile) or len(times) != len(steps):
        return None
    cuts = idle_lead_ins(profile, steps, times)
    if not cuts:
        return None
    parts = [f"step {s}: {c.seconds:.2f} s before its first module call" for s, c in
             sorted(cuts.items())]
    return ("Compressed on the time axis (the script's start-up, not memory work): "
            + "; ".join(parts) + ".")


def _phase_bands(
    kept: list[int], xs: list[float], steps: list[int], phases: list[str],
    boundaries: list[float],
) -> list[dict[str, Any]]:
    """One filled trace per phase: a rectangle for each run of samples in that phase."""
    step_end = {}
    order = list(dict.fromkeys(steps[i] for i in kept))
    for n, s in enumerate(order):
        step_end[s] = boundaries[n + 1] if n + 1 < len(boundaries) else xs[-1]
    shapes: dict[str, tuple[list[float | None], list[float | None]]] = {}
    start = 0
    for n in range(1, len(kept) + 1):
        ends_run = n == len(kept) or (
            phases[kept[n]] != phases[kept[start]] or steps[kept[n]] != steps[kept[start]]
        )
        if not ends_run:
            continue
        phase = phases[kept[start]]
        if phase in PHASE_COLORS:
            x0 = xs[start]
            same_step = n < len(kept) and steps[kept[n]] == steps[kept[start]]
            x1 = xs[n] if same_step else step_end[steps[kept[start]]]
            bx, by = shapes.setdefault(phase, ([], []))
            bx += [x0, x0, x1, x1, x0, None]
            by += [0, 1, 1, 0, 0, None]
        start = n
    return [
        {
            "type": "scatter", "mode": "lines", "fill": "toself", "x": bx, "y": by,
            "yaxis": "y2", "name": f"{phase} phase", "fillcolor": PHASE_COLORS[phase],
            "line": {"width": 0}, "hoverinfo": "skip", "legendgroup": "phases",
        }
        for phase, (bx, by) in shapes.items()
    ]


# ---------------------------------------------------------------- layers
def layers_figure(profile: Profile, *, top: int = TOP_LAYERS) -> Figure | None:
    """The modules that hold the most (their own bytes), stacked by category, and the rest."""
    rows = [
        (m.name, m.type, {c: int(m.own.get(c, 0)) for c in HELD}) for m in profile.modules_stats
    ]
    rows = [r for r in rows if sum(r[2].values()) > 0]
    if not rows:
        return None
    rows.sort(key=lambda r: sum(r[2].values()), reverse=True)
    shown, rest = rows[:top], rows[top:]
    labels = [ptext(module_label(name)) for name, _, _ in shown]
    types = [ptext(kind) for _, kind, _ in shown]
    values = {c: [held[c] for _, _, held in shown] for c in HELD}
    if rest:
        labels.append(f"({len(rest)} other modules)")
        types.append("sum of the rest")
        for c in HELD:
            values[c].append(sum(held[c] for _, _, held in rest))
    traces = []
    for cat in HELD:
        if not any(values[cat]):
            continue
        traces.append({
            "type": "bar", "orientation": "h", "name": CATEGORY_LABELS[cat],
            "y": labels, "x": values[cat], "marker": {"color": CATEGORY_COLORS[cat]},
            "text": [format_bytes(v) for v in values[cat]], "textposition": "none",
            "customdata": types,
            "hovertemplate": "<b>%{y}</b> (%{customdata})<br>" + CATEGORY_LABELS[cat]
                             + ": %{text}<extra></extra>",
        })
    widest = max(sum(values[c][i] for c in HELD) for i in range(len(labels)))
    layout = base_layout(
        barmode="stack",
        height=max(260, 26 * len(labels) + 110),
        xaxis={"title": {"text": "bytes held by the module itself"}, "gridcolor": "#eee",
               **byte_axis(widest * 1.05)},
        yaxis={"autorange": "reversed", "automargin": True, "type": "category"},
    )
    return {"data": traces, "layout": layout}


# ---------------------------------------------------------------- hierarchy
def hierarchy_figure(profile: Profile, *, limit: int = HIERARCHY_NODES) -> Figure | None:
    """An icicle of the module tree; each box is the module's inclusive held bytes."""
    mods = profile.modules_stats
    if not mods:
        return None
    index = {m.name: i for i, m in enumerate(mods)}
    parent_of: list[int | None] = []
    for i, m in enumerate(mods):
        parent = index.get(m.parent) if m.parent is not None else None
        parent_of.append(parent if parent != i else None)
    children: dict[int, list[int]] = defaultdict(list)
    for i, parent in enumerate(parent_of):
        if parent is not None:
            children[parent].append(i)
    inclusive = [sum(int(m.own.get(c, 0)) for c in HELD) for m in mods]
    for i in sorted(range(len(mods)), key=lambda k: -mods[k].depth):
        parent = parent_of[i]
        if parent is not None:
            inclusive[parent] += inclusive[i]
    candidates = [i for i in range(len(mods)) if inclusive[i] > 0]
    if not candidates:
        return None
    candidates.sort(key=lambda i: (-inclusive[i], mods[i].depth))
    keep = set(candidates[:limit])
    for i in list(keep):  # a kept module's ancestors are kept too
        ancestor = parent_of[i]
        while ancestor is not None and ancestor not in keep:
            keep.add(ancestor)
            ancestor = parent_of[ancestor]
    ids: list[str] = []
    parents: list[str] = []
    labels: list[str] = []
    values: list[int] = []
    hover: list[str] = []
    for i in sorted(keep, key=lambda k: (mods[k].depth, k)):
        m = mods[i]
        parent = parent_of[i]
        ids.append(f"m{i}")
        parents.append(f"m{parent}" if parent is not None and parent in keep else "")
        short = m.name.rsplit(".", 1)[-1] if m.name else "(root)"
        labels.append(ptext(f"{short} {m.type}"))
        values.append(inclusive[i])
        parts = ", ".join(
            f"{CATEGORY_LABELS[c]} {format_bytes(int(m.own.get(c, 0)))}"
            for c in HELD if m.own.get(c, 0)
        )
        hover.append(
            f"<b>{ptext(module_label(m.name))}</b> ({ptext(m.type)})<br>"
            f"with children: {format_bytes(inclusive[i])}"
            + (f"<br>itself: {ptext(parts)}" if parts else "")
        )
        dropped = [c for c in children.get(i, []) if c not in keep and inclusive[c] > 0]
        if dropped:
            ids.append(f"m{i}+")
            parents.append(f"m{i}")
            labels.append(f"… {len(dropped)} more")
            size = sum(inclusive[c] for c in dropped)
            values.append(size)
            hover.append(f"{len(dropped)} smaller modules under "
                         f"{ptext(module_label(m.name))}: {format_bytes(size)}")
    tops = [k for k, parent in enumerate(parents) if parent == ""]
    if len(tops) > 1:  # several roots (the model and a loss module): one labelled box above them
        total = sum(values[k] for k in tops)
        for k in tops:
            parents[k] = "all"
        ids.insert(0, "all")
        parents.insert(0, "")
        labels.insert(0, "all modules")
        values.insert(0, total)
        hover.insert(0, f"every module: {format_bytes(total)}")
    trace = {
        "type": "icicle", "ids": ids, "parents": parents, "labels": labels, "values": values,
        "branchvalues": "total", "hovertext": hover, "hovertemplate": "%{hovertext}<extra></extra>",
        "maxdepth": 3, "tiling": {"orientation": "v"}, "root": {"color": "#f4f4f4"},
        # light fills so dark labels stay readable at every depth; larger boxes a little deeper
        "marker": {"colorscale": [[0, "#f4f8fc"], [1, "#a9cbe8"]], "colors": values,
                   "line": {"width": 1, "color": "white"}},
        "textfont": {"color": "#1b2733", "size": 13},
        "text": [format_bytes(v) for v in values], "textinfo": "label+text",
    }
    return {"data": [trace], "layout": base_layout(height=480, margin={"l": 5, "r": 5,
                                                                        "t": 10, "b": 5})}


def hierarchy_counts(profile: Profile, figure: Figure | None) -> tuple[int, int]:
    """(modules drawn, modules in the profile), for the caption."""
    if figure is None:
        return 0, len(profile.modules_stats)
    drawn = sum(1 for i in figure["data"][0]["ids"] if not i.endswith("+"))
    return drawn, len(profile.modules_stats)


# ---------------------------------------------------------------- advisor
def advice_figure(rows: list[dict[str, Any]]) -> Figure | None:
    """Predicted saving next to the measured one (simulation), one group per recommendation."""
    named = [r for r in rows if _is_number(r.get("predicted_saving_bytes"))]
    if not named:
        return None
    labels = [ptext(_short(advice_view.describe(r))) for r in named]
    predicted = [int(r["predicted_saving_bytes"]) for r in named]
    measured: list[int | None] = []
    for r in named:
        found = advice_view.saving(r)
        measured.append(found[0] if found is not None and found[1] == "measured" else None)
    full = [ptext(advice_view.describe(r)) for r in named]
    traces = [{
        "type": "bar", "orientation": "h", "name": "predicted saving", "y": labels,
        "x": predicted, "marker": {"color": "#4c78a8"}, "customdata": full,
        "text": [format_bytes(v) for v in predicted], "textposition": "none",
        "hovertemplate": "%{customdata}<br>predicted %{text}<extra></extra>",
    }]
    if any(v is not None for v in measured):
        traces.append({
            "type": "bar", "orientation": "h", "name": "measured saving (simulated)",
            "y": labels, "x": measured, "marker": {"color": "#54a24b"}, "customdata": full,
            "text": [format_bytes(v) if v is not None else "not simulated" for v in measured],
            "textposition": "none",
            "hovertemplate": "%{customdata}<br>measured %{text}<extra></extra>",
        })
    values = predicted + [m for m in measured if m is not None]
    top, bottom = max([0, *values]), min([0, *values])
    # a negative saving (pruning before prune.remove) extends the axis to the left
    axis = byte_axis(top * 1.1, bottom=bottom * 1.1)
    layout = base_layout(
        barmode="group", height=max(240, 22 * len(labels) * len(traces) + 120),
        xaxis={"title": {"text": "saving at the peak (negative: costs memory)"},
               "gridcolor": "#eee", **axis},
        yaxis={"automargin": True, "type": "category", "autorange": "reversed"},
    )
    return {"data": traces, "layout": layout}


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


# ---------------------------------------------------------------- device
def device_figure(profile: Profile) -> Figure | None:
    """Allocator and NVML next to memprof's tracked peak (CUDA only)."""
    per_step = [s for s in profile.steps_stats if s.device_max_allocated is not None]
    if len(per_step) > 1:
        xs = [s.step for s in per_step]
        series: dict[str, list[int | None]] = {
            "memprof tracked peak": [s.peak_bytes for s in per_step],
            "allocator max allocated": [s.device_max_allocated for s in per_step],
            "allocator reserved": [s.device_reserved for s in per_step],
        }
        traces = [
            {"type": "scatter", "mode": "lines+markers", "name": name, "x": xs, "y": ys,
             "text": [format_bytes(v) if v is not None else "n/a" for v in ys],
             "hovertemplate": "step %{x}: %{text}"}
            for name, ys in series.items()
        ]
        top = max(v for ys in series.values() for v in ys if v is not None)
        return {"data": traces, "layout": base_layout(
            height=340, hovermode="x unified", xaxis={"title": {"text": "step"}},
            yaxis={"gridcolor": "#eee", **byte_axis(top * 1.1)})}
    cuda = profile.device.cuda or {}
    if not cuda.get("available"):
        return None
    bars: list[tuple[str, int]] = []
    if profile.peak_info is not None:
        bars.append(("memprof tracked peak", profile.peak_info.total_bytes))
    for key, label in (("max_allocated", "allocator max allocated"),
                       ("max_reserved", "allocator max reserved"),
                       ("allocated", "allocated at the end"), ("reserved", "reserved at the end")):
        if isinstance(cuda.get(key), int):
            bars.append((label, int(cuda[key])))
    used = (profile.device.nvml or {}).get("process_used_bytes")
    if isinstance(used, int):
        bars.append(("NVML: whole process", used))
    if not bars:
        return None
    top = max(v for _, v in bars)
    return {"data": [{
        "type": "bar", "x": [b[0] for b in bars], "y": [b[1] for b in bars],
        "text": [format_bytes(b[1]) for b in bars], "textposition": "outside",
        "marker": {"color": "#4c78a8"}, "hovertemplate": "%{x}: %{text}<extra></extra>",
    }], "layout": base_layout(height=340, yaxis={"gridcolor": "#eee", **byte_axis(top * 1.15)},
                              xaxis={"type": "category"})}


def reserved_note(profile: Profile) -> str | None:
    """The gap between reserved and allocated at the replay's peak, in one sentence."""
    allocator = profile.allocator_summary()
    if allocator is None:
        return None
    r = allocator.replay
    conf = allocator.conf or "default options"
    text = (
        f"Reserved (the caching allocator's replay of this run, {conf}): "
        f"{format_bytes(r.reserved_peak_bytes)} at its peak = "
        f"{format_bytes(r.allocated_at_reserved_peak_bytes)} allocated + "
        f"{format_bytes(r.fragmentation_bytes)} cached in {len(r.segments)} segment(s) with no "
        f"tensor in it; largest free block {format_bytes(r.largest_free_block_bytes)}."
    )
    for other_conf, other in allocator.what_if.items():
        text += (f" With {other_conf}: {format_bytes(other.reserved_peak_bytes)} reserved.")
    return text
