"""Everything the template needs, gathered from a Profile (and its advice) in one place."""

from __future__ import annotations

from typing import Any

from memprof.profile import Profile
from memprof.report import advice as advice_view
from memprof.report import figures, headline, sections
from memprof.report.style import CATEGORY_COLORS, CATEGORY_LABELS


def context(profile: Profile, *, advice: Any = None) -> dict[str, Any]:
    """Template variables. ``charts`` maps a chart id to its figure JSON (None: nothing to draw)."""
    advice_dict = advice_view.normalise(advice if advice is not None else profile.advice)
    rows = advice_view.rows(advice_dict)
    charts: dict[str, Any] = {
        "chart-timeline": figures.timeline_figure(profile),
        "chart-layers": figures.layers_figure(profile),
        "chart-hierarchy": figures.hierarchy_figure(profile),
        "chart-advice": figures.advice_figure(rows),
        "chart-device": figures.device_figure(profile),
    }
    drawn, total_modules = figures.hierarchy_counts(profile, charts["chart-hierarchy"])
    extra = {
        k: advice_view.display(v, k)
        for k, v in (advice_dict or {}).items()
        if k not in advice_view.ROW_KEYS and k not in advice_view.PLAN_KEYS
    }
    plan = next(((k, advice_dict[k]) for k in advice_view.PLAN_KEYS
                 if advice_dict and advice_dict.get(k)), None)
    return {
        "head": headline.build(profile, advice_dict),
        "oom": profile.oom.describe() if profile.oom is not None else None,
        "charts": {k: v for k, v in charts.items() if v is not None},
        "payload": {
            "figures": [{"id": k, **v} for k, v in charts.items() if v is not None],
        },
        "legend": [(CATEGORY_LABELS[c], CATEGORY_COLORS[c]) for c in CATEGORY_LABELS],
        "hierarchy_drawn": drawn,
        "module_count": total_modules,
        "steps_count": len(profile.steps_stats),
        "timeline_samples": len(profile.timeline_data.get("step", [])),
        "timeline_note": figures.lead_in_note(profile),
        "reserved_note": figures.reserved_note(profile),
        "peak_categories": sections.peak_by_category(profile),
        "peak_modules": sections.peak_by_module(profile),
        "peak_tensors": sections.top_tensors(profile),
        "steps": sections.steps_table(profile),
        "advice": advice_dict,
        "advice_rows": advice_view.display(rows, "recommendations") if rows else None,
        "advice_best": _best_text(advice_dict),
        "advice_plan": advice_view.display(plan[1], plan[0]) if plan else None,
        "advice_extra": extra,
        "device": sections.device_facts(profile),
        "environment": sections.environment(profile),
        "optimizers": sections.optimizers(profile),
        "warnings": list(profile.warnings),
        "title_suffix": profile.device.name,
    }


def _best_text(advice: dict[str, Any] | None) -> str | None:
    row = advice_view.best(advice)
    found = advice_view.saving(row) if row is not None else None
    if row is None or found is None:
        return None
    return f"{advice_view.describe(row)}: {advice_view.cell(found[0], 'bytes')} ({found[1]})"
