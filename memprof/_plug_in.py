"""The facade's wiring of :mod:`memprof.hooks`: each hook loads its (higher) room on first use,
so ``import memprof`` still costs only the measurement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memprof import hooks


def _profile_html(profile: Any) -> str:
    from memprof.report.notebook import profile_html

    return profile_html(profile)


def _advice_html(advice: Any) -> str:
    from memprof.report.notebook import advice_html

    return advice_html(advice)


def _write_report(profile: Any, path: Any, **options: Any) -> Path:
    from memprof.report import write_report

    return write_report(profile, path, **options)


def _oom_plan(profile: Any, report: Any) -> Any:
    from memprof.advisor.oom_plan import with_plan

    return with_plan(profile, report)


def plug_in() -> None:
    """Plug the report's and the advisor's functions into the rooms below them."""
    hooks.profile_html = _profile_html
    hooks.advice_html = _advice_html
    hooks.write_report = _write_report
    hooks.oom_plan = _oom_plan
