"""The HTML report: one self-contained file that shows where memory goes and what to do.

``write_report(profile, "reports/run.html")`` renders ``templates/report.html.j2`` with jinja2
(autoescaped). plotly.js is inlined once; the figures reach the page as JSON through
``|tojson`` inside a ``<script type="application/json">`` and are drawn by a few lines of
script, so the file works offline and opens no connection (its Content-Security-Policy forbids
any). The page sets ``document.body.dataset.chartsReady`` to the number of charts once plotly
has drawn them all.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memprof.atomic_files import write_text_atomic
from memprof.profile import Profile, as_profile

if TYPE_CHECKING:
    from memprof.tracking.session import Profiler


def write_report(
    profile: Profile | Profiler,
    path: str | os.PathLike[str],
    *,
    advice: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write the report of ``profile`` to ``path`` atomically and return the path.

    ``advice`` (an ``Advice`` or its dict) is shown in the advisor section; without it the
    profile's saved ``advice`` is used. Raises :class:`~memprof.errors.OutputExistsError` if
    ``path`` exists and ``overwrite`` is false. ``profile`` may be the Profiler of a finished
    ``with memprof.profile(...) as prof`` block.
    """
    profile = as_profile(profile)
    target = Path(path)
    if target.exists() and not overwrite:  # fail before the (slow) rendering
        write_text_atomic(target, "", overwrite=False)
    write_text_atomic(target, render_report(profile, advice=advice), overwrite=overwrite)
    return target


def render_report(profile: Profile | Profiler, *, advice: Any = None) -> str:
    """The report as one HTML string."""
    profile = as_profile(profile)
    from memprof.report.page import context

    template = _environment().get_template("report.html.j2")
    return template.render(**context(profile, advice=advice), plotlyjs=_plotlyjs())


@functools.cache
def _environment() -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("memprof.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


@functools.cache
def _plotlyjs() -> str:
    from plotly.offline import get_plotlyjs

    return str(get_plotlyjs())


__all__ = ["render_report", "write_report"]
