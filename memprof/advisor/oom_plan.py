"""The out-of-memory post-mortem's plan: the advisor's changes that fit the step that failed."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from memprof.advisor import advise
from memprof.categories import ACTIVATION, CATEGORIES, TEMPORARY
from memprof.oom import OOMReport
from memprof.profile import Peak, Profile


def needed_profile(profile: Profile, report: OOMReport) -> Profile:
    """``profile`` with its peak raised to what the failed step needed at least: what was live
    plus the failed request (charged as an activation of the module in forward, else as a
    temporary), so the advisor plans for the step that did not fit."""
    asked = report.requested_bytes or 0
    category = ACTIVATION if report.phase == "forward" else TEMPORARY
    by_category = dict.fromkeys(CATEGORIES, 0)
    by_category.update(report.by_category)
    by_category[category] += asked
    by_module = {k: dict(v) for k, v in report.by_module.items()}
    row = by_module.setdefault(report.module, {})
    row[category] = row.get(category, 0) + asked
    total = report.live_bytes + asked
    old = profile.peak_info
    if old is not None and old.total_bytes >= total:
        return profile
    peak = Peak(
        total_bytes=total,
        step=report.step,
        phase=report.phase,
        module=report.module,
        by_category=by_category,
        by_module=by_module,
        top_tensors=list(old.top_tensors) if old is not None else [],
    )
    return replace(profile, peak_info=peak)


def with_plan(profile: Profile, report: OOMReport, *, fake_model: Any = None) -> OOMReport:
    """``report`` with the advisor's plan for its budget (unchanged when there is no budget or
    the advisor cannot plan: the post-mortem never fails over advice). With ``fake_model`` (a
    :class:`~memprof.advisor.workload.Workload`, the model at hand) each change is predicted
    by a fake run of it, which does not run out of memory; the plan's ``predicted_by`` says
    which way it was made."""
    if report.budget_bytes is None:
        return report
    try:
        advice = advise(
            needed_profile(profile, report), budget=report.budget_bytes, fake_model=fake_model
        )
    except Exception as exc:  # advice is a bonus
        return replace(report, notes=[*report.notes, f"no plan: {type(exc).__name__}: {exc}"])
    plan = advice.plan
    if plan is not None:
        faked = advice.extra.get("fake_baseline_peak_bytes") is not None
        plan = {**plan, "predicted_by": "fake run" if faked else "analytic"}
    return replace(report, plan=plan)
