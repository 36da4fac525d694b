"""Shared look of the report: category colours and labels, byte axes, escaping for plotly text."""

from __future__ import annotations

import html
from typing import Any

from memprof.units import format_bytes

CATEGORY_COLORS: dict[str, str] = {
    "parameter": "#4c78a8",
    "buffer": "#9ecae9",
    "gradient": "#f58518",
    "optimizer_state": "#e45756",
    "activation": "#54a24b",
    "temporary": "#b279a2",
    "input": "#eeca3b",
    "other": "#bab0ac",
}

CATEGORY_LABELS: dict[str, str] = {
    "parameter": "parameters",
    "buffer": "buffers",
    "gradient": "gradients",
    "optimizer_state": "optimizer state",
    "activation": "activations",
    "temporary": "temporaries",
    "input": "inputs",
    "other": "other",
}

PHASE_COLORS: dict[str, str] = {
    "forward": "rgba(76, 120, 168, 0.13)",
    "backward": "rgba(245, 133, 24, 0.13)",
    "optimizer": "rgba(228, 87, 86, 0.16)",
}

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"


def ptext(value: object) -> str:
    """Escape a string for a plotly text field (plotly reads a subset of HTML in text).

    Plotly decodes ``&lt;``, ``&gt;`` and ``&amp;`` back, so an escaped module name shows as
    the literal text and never becomes markup.
    """
    return html.escape(str(value), quote=False)


def module_label(name: str) -> str:
    """How a module path is shown: the root module is ``""``."""
    return name if name else "(root)"


#: Tick spacings: 1, 2, 5, 10, 20, 50, 100, 200, 500 of each IEC unit.
_STEPS = sorted(m * 1024**k for k in range(6) for m in (1, 2, 5, 10, 20, 50, 100, 200, 500))


def byte_axis(top: float, *, bottom: float = 0, ticks: int = 6) -> dict[str, Any]:
    """Axis settings with tick labels in IEC units (plotly's own ticks are SI: 1.2G)."""
    span = top - min(bottom, 0)
    if span <= 0:
        return {"tickvals": [0], "ticktext": ["0 B"], "rangemode": "tozero"}
    raw = span / ticks
    step = next(c for c in _STEPS if c >= raw) if raw <= _STEPS[-1] else raw
    low = -int(-min(bottom, 0) // step + 1) if bottom < 0 else 0
    values = [step * i for i in range(low, int(top // step) + 2)]
    return {
        "tickvals": values,
        "ticktext": [format_bytes(v, precision=0 if abs(v) % 1024 ** _exp(abs(v)) == 0 else 1)
                     for v in values],
        "rangemode": "tozero",
    }


def _exp(value: float) -> int:
    exp = 0
    while value >= 1024 and exp < 5:
        value /= 1024
        exp += 1
    return exp


def base_layout(**extra: Any) -> dict[str, Any]:
    """Layout settings every figure shares."""
    layout: dict[str, Any] = {
        "font": {"family": FONT, "size": 12},
        "margin": {"l": 60, "r": 20, "t": 30, "b": 50},
        "paper_bgcolor": "white",
        "plot_bgcolor": "white",
        "legend": {"orientation": "h", "y": -0.18},
        "hoverlabel": {"namelength": -1},
    }
    layout.update(extra)
    return layout
