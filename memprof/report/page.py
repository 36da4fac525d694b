"""Everything the template needs, gathered from a Profile (and its advice) in one place."""

from __future__ import annotations

from typing import Any

from memprof.profile import Profile
from memprof.report import advice_view, figures, headline, sections
from memprof.report.style import CATEGORY_COLORS, CATEGORY_LABELS


def context(profile: Profile, *, advice: Any = None) -> dict[str, Any]:
    """Template variables. ``charts`` maps a chart id to its figure JSON (None: nothing to draw)."""
    advice_dict = advice_view.normalise(advice if advice is not None else profile.advice)
    rows = advice_view.rows(advice_dict)
    charts: dict[str, Any] = {
        "chart-timeline": figures.timeline_figure(profile),
        "chart-layers": figures.layers_figure(profile),
        "chart-hierarchy": figures.hierarchy_figure(profile),
        "chart-advice": figures.advice_figure(
            [r for r in advice_view.display_order(rows) if advice_view.is_applicable(r)]),
        "chart-device": figures.device_figure(profile),
    }
    drawn, total_modules = figures.hierarchy_counts(profile, charts["chart-hierarchy"])
    recommendation = advice_view.recommend(advice_dict, profile.oom)
    return {
        "head": headline.build(profile, advice_dict),
        "oom": headline.oom_card(profile, recommendation),
        "recommendation": recommendation,
        "fit": advice_view.fit(advice_dict),
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
        "advice_table": advice_view.recommendation_table(rows, recommendation),
        "advice_plan": advice_view.plan_view((advice_dict or {}).get("plan")),
        "advice_facts": _advice_facts(advice_dict),
        "device": sections.device_facts(profile),
        "environment": sections.environment(profile),
        "optimizers": sections.optimizers(profile),
        "warnings": list(profile.warnings),
        "title_suffix": profile.device.name,
    }


def _advice_facts(advice: dict[str, Any] | None) -> list[str]:
    """What the advice was computed against, as sentences (the file's own keys stay out)."""
    if not advice:
        return []
    facts = []
    base = advice.get("baseline_peak_bytes")
    if isinstance(base, int):
        text = f"Predicted from a step peak of {advice_view.cell(base, 'bytes')}"
        again = advice.get("measured_baseline_peak_bytes")
        if isinstance(again, int) and again != base:
            text += f" (measured again unchanged: {advice_view.cell(again, 'bytes')})"
        facts.append(text + ".")
    facts.append("Each change was simulated on a copy of the model and measured."
                 if advice.get("simulated") else
                 "Predictions only: `memprof advise --simulate` measures each change.")
    return facts
