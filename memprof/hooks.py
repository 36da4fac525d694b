"""Where a lower room asks a higher one: the profile's HTML views and the advice's notebook
view (the report), the out-of-memory post-mortem's plan (the advisor).

Imports flow one way (vocabulary -> tracking -> profile -> advisor -> report -> facade), so
these rooms cannot be imported from below. The facade, which Python runs before any
``memprof.*`` module, plugs each hook in (``memprof/_plug_in.py``) as a function that loads its
room on first use. A hook is None only when that did not happen.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

#: ``(profile) -> html``: Jupyter's view of a Profile (memprof.report.notebook).
profile_html: Callable[[Any], str] | None = None
#: ``(advice) -> html``: Jupyter's view of an Advice (memprof.report.notebook).
advice_html: Callable[[Any], str] | None = None
#: ``(profile, path, *, advice, overwrite) -> path``: the HTML report (memprof.report).
write_report: Callable[..., Path] | None = None
#: ``(profile, report) -> report``: the OOM post-mortem with the advisor's plan to fit
#: (memprof.advisor.oom_plan).
oom_plan: Callable[[Any, Any], Any] | None = None


def plugged(hook: Callable[..., Any] | None, name: str) -> Callable[..., Any]:
    """``hook``, or a RuntimeError naming it when nothing was plugged in."""
    if hook is None:
        raise RuntimeError(f"memprof.hooks.{name} is not plugged in (memprof/__init__.py does)")
    return hook
