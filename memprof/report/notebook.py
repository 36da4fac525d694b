"""Notebook views: ``Profile._repr_html_`` and ``Advice._repr_html_`` render through here.

A profile shows its headline (the peak, where, what dominates it), its bytes by category at
the peak and the per-layer chart; advice shows its recommendation table and plan. Each is a
compact HTML fragment (jinja2, autoescaped; chart data through ``|tojson``).

plotly.js: inlined with the first chart a Python process shows (about 4.5 MiB, so the notebook
works offline), and not again after that: later charts wait for the ``window.Plotly`` the first
one loaded. Set :data:`PLOTLYJS` to ``"always"`` to inline it in every chart (a notebook whose
first chart output was cleared), or ``"never"`` when the page provides plotly itself.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

from memprof.categories import CATEGORIES
from memprof.profile import Profile
from memprof.report import advice_view, figures, headline
from memprof.report.style import CATEGORY_LABELS
from memprof.units import format_bytes

#: When plotly.js goes into a chart's HTML: "once" per process, "always", or "never".
PLOTLYJS: Literal["once", "always", "never"] = "once"
#: The columns of the advice table, in order (those a row has), and the header a reader sees.
ADVICE_COLUMNS = {"technique": "technique", "options": "options", "applicable": "applies",
                  "predicted_peak_bytes": "peak after (predicted)", "saving_pct": "saves",
                  "measured_peak_bytes": "peak after (measured)",
                  "error_pct": "prediction off by", "cost": "cost to training",
                  "reason": "why not"}

_ids = itertools.count(1)
_plotly_sent = False


def profile_html(profile: Profile) -> str:
    """The notebook fragment of a profile: headline, categories at the peak, per-layer chart."""
    global _plotly_sent
    figure = figures.layers_figure(profile)
    plotlyjs = ""
    if figure is not None and (PLOTLYJS == "always" or (PLOTLYJS == "once"
                                                         and not _plotly_sent)):
        from memprof.report import _plotlyjs

        plotlyjs = _plotlyjs()
        _plotly_sent = True
    categories = None
    if profile.peak_info is not None:
        peak = profile.peak_info
        categories = {
            "columns": ["category", "at the peak"],
            "rows": [[CATEGORY_LABELS[c], format_bytes(peak.by_category.get(c, 0))]
                     for c in CATEGORIES if peak.by_category.get(c, 0) > 0],
        }
    return _render(kind="profile", uid=f"memprof-{next(_ids)}",
                   head=headline.build(profile, advice_view.normalise(profile.advice)),
                   categories=categories, warnings=list(profile.warnings), figure=figure,
                   plotlyjs=plotlyjs)


def advice_html(advice: Any) -> str:
    """The notebook fragment of advice (an ``Advice`` or its dict): its table and plan."""
    data = advice_view.normalise(advice) or {}
    rows = advice_view.rows(data)
    present = [c for c in ADVICE_COLUMNS if any(c in r for r in rows)]
    table = {
        "columns": [ADVICE_COLUMNS[c] for c in present],
        "rows": [[advice_view.options_text(r.get(c)) if c == "options"
                  else advice_view.cell(r.get(c), c) for c in present] for r in rows],
    } if rows else None
    plan = data.get("plan")
    plan_text = None
    if isinstance(plan, dict):
        plan_text = str(plan.get("explanation") or advice_view.cell(plan, "plan"))
    return _render(kind="advice", uid=f"memprof-{next(_ids)}", rows=table, plan=plan_text,
                   baseline=format_bytes(int(data.get("baseline_peak_bytes", 0) or 0)))


def _render(**values: Any) -> str:
    from memprof.report import _environment

    return str(_environment().get_template("notebook.html.j2").render(**values))


__all__ = ["PLOTLYJS", "advice_html", "profile_html"]
