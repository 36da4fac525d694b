"""Two profiles side by side: what changed between run A and run B, byte for byte.

:func:`compare` returns one long table (a pandas DataFrame) with the columns

``section``
    ``peak`` (the profile's peak by category, and ``total``), ``peak_module`` (each module's
    bytes at the peak, by category and ``total``), ``module`` (each module's row of
    :meth:`Profile.modules`: the most it held of each own column over the steps), ``phase``
    (the highest total live bytes seen in each phase) or ``step`` (each profiled step's peak,
    the i-th profiled step of A against the i-th of B);
``name``
    the module path (``""`` is the root), the phase, or the step's position (``"0"``, ...);
``category``
    a category, a module column (``temporary_peak``) or ``total``;
``a_bytes``, ``b_bytes``, ``delta_bytes`` (B - A), ``delta_pct`` (of A; NaN when A is 0 and B
    is not);
``present``
    ``both``, ``a only`` or ``b only``: a module, phase or step that one run does not have
    counts 0 bytes there.

Example::

    table = memprof.compare(memprof.load("fp32.json"), memprof.load("bf16.json"))
    table[(table.section == "module") & (table.category == "activation")]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from memprof.categories import CATEGORIES, PHASES
from memprof.profile import OUTSIDE_MODULES, OWN_COLUMNS, Profile, as_profile
from memprof.units import format_bytes, parse_size

COLUMNS = ("section", "name", "category", "a_bytes", "b_bytes", "delta_bytes", "delta_pct",
           "present")
SECTIONS = ("peak", "peak_module", "module", "phase", "step")
TOTAL = "total"

if TYPE_CHECKING:
    from memprof.tracking.session import Profiler


def compare(a: Profile | Profiler, b: Profile | Profiler) -> pd.DataFrame:
    """B against A, one row per (section, name, category); see the module docstring.

    Each side is a :class:`~memprof.profile.Profile` or the Profiler of a finished
    ``with memprof.profile(...) as prof`` block.
    """
    a, b = as_profile(a, argument="a"), as_profile(b, argument="b")
    rows: list[tuple[str, str, str, int, int, str]] = []
    rows.extend(_peak_rows(a, b))
    rows.extend(_peak_module_rows(a, b))
    rows.extend(_module_rows(a, b))
    rows.extend(_keyed_rows("phase", _phase_peaks(a), _phase_peaks(b), order=PHASES))
    rows.extend(_keyed_rows("step", _step_peaks(a), _step_peaks(b)))
    frame = pd.DataFrame(
        [(s, n, c, av, bv, bv - av, _pct(av, bv), p) for s, n, c, av, bv, p in rows],
        columns=list(COLUMNS),
    )
    return frame.astype({"a_bytes": "int64", "b_bytes": "int64", "delta_bytes": "int64",
                         "delta_pct": "float64"})


def _pct(a: int, b: int) -> float:
    if a == 0:
        return 0.0 if b == 0 else math.nan
    return 100.0 * (b - a) / a


def _present(in_a: bool, in_b: bool) -> str:
    return "both" if in_a and in_b else ("a only" if in_a else "b only")


def _peak_rows(a: Profile, b: Profile) -> list[tuple[str, str, str, int, int, str]]:
    pa, pb = a.peak_info, b.peak_info
    cat_a = pa.by_category if pa is not None else {}
    cat_b = pb.by_category if pb is not None else {}
    rows = [("peak", "", c, int(cat_a.get(c, 0)), int(cat_b.get(c, 0)), "both")
            for c in CATEGORIES]
    rows.append(("peak", "", TOTAL, pa.total_bytes if pa else 0, pb.total_bytes if pb else 0,
                 _present(pa is not None, pb is not None)))
    return rows


def _module_names(profile: Profile) -> set[str]:
    names = {m.name for m in profile.modules_stats} | {OUTSIDE_MODULES}
    if profile.peak_info is not None:
        names |= set(profile.peak_info.by_module)
    return names


def _ordered(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """A's keys in A's order, then B's new ones in B's."""
    return [*a, *(k for k in b if k not in a)]


def _peak_module_rows(a: Profile, b: Profile) -> list[tuple[str, str, str, int, int, str]]:
    at_a = a.peak_info.by_module if a.peak_info is not None else {}
    at_b = b.peak_info.by_module if b.peak_info is not None else {}
    names_a, names_b = _module_names(a), _module_names(b)
    rows = []
    for name in _ordered(at_a, at_b):
        row_a, row_b = at_a.get(name, {}), at_b.get(name, {})
        present = _present(name in names_a, name in names_b)
        for c in CATEGORIES:
            va, vb = int(row_a.get(c, 0)), int(row_b.get(c, 0))
            if va or vb:
                rows.append(("peak_module", name, c, va, vb, present))
        rows.append(("peak_module", name, TOTAL, int(sum(row_a.values())),
                     int(sum(row_b.values())), present))
    return rows


def _module_rows(a: Profile, b: Profile) -> list[tuple[str, str, str, int, int, str]]:
    own_a = {m.name: m.own for m in a.modules_stats}
    own_b = {m.name: m.own for m in b.modules_stats}
    rows = []
    for name in _ordered(own_a, own_b):
        present = _present(name in own_a, name in own_b)
        for col in OWN_COLUMNS:
            va, vb = int(own_a.get(name, {}).get(col, 0)), int(own_b.get(name, {}).get(col, 0))
            rows.append(("module", name, col, va, vb, present))
    return rows


def _phase_peaks(profile: Profile) -> dict[str, int]:
    frame = profile.timeline()
    if not len(frame):
        return {}
    return {str(k): int(v) for k, v in frame.groupby("phase")["total"].max().items()}


def _step_peaks(profile: Profile) -> dict[str, int]:
    return {str(i): s.peak_bytes for i, s in enumerate(profile.steps_stats)}


def _keyed_rows(
    section: str, a: dict[str, int], b: dict[str, int], *, order: tuple[str, ...] = ()
) -> list[tuple[str, str, str, int, int, str]]:
    keys = [k for k in order if k in a or k in b] + [
        k for k in _ordered(a, b) if k not in order
    ]
    return [(section, k, TOTAL, a.get(k, 0), b.get(k, 0), _present(k in a, k in b))
            for k in keys]


# ------------------------------------------------------------------ thresholds
@dataclass(frozen=True)
class Threshold:
    """How much B's peak may exceed A's: a percentage of A's peak or a number of bytes."""

    text: str
    percent: float | None = None
    nbytes: int | None = None

    def limit(self, a_peak: int) -> int:
        """The largest B peak allowed against A's ``a_peak``."""
        if self.percent is not None:
            return int(a_peak * (1 + self.percent / 100))
        assert self.nbytes is not None
        return a_peak + self.nbytes

    def exceeded(self, a_peak: int, b_peak: int) -> bool:
        return b_peak > self.limit(a_peak)


_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_threshold(text: str) -> Threshold:
    """``"5%"`` or a size such as ``"64MiB"``; raises ValueError (one line) otherwise."""
    match = _PERCENT.match(text)
    if match:
        return Threshold(text=text.strip(), percent=float(match.group(1)))
    try:
        return Threshold(text=text.strip(), nbytes=parse_size(text))
    except ValueError:
        raise ValueError(
            f"cannot read {text!r} as a threshold: write a percentage of A's peak such as 5% "
            "or a size such as 64MiB"
        ) from None


def peak_line(frame: pd.DataFrame) -> str:
    """``peak 1.2 GiB -> 1.0 GiB (-200.0 MiB, -16.7%)`` from a :func:`compare` table."""
    row = frame[(frame.section == "peak") & (frame.category == TOTAL)].iloc[0]
    return (f"peak {format_bytes(int(row.a_bytes))} -> {format_bytes(int(row.b_bytes))} "
            f"({signed_bytes(int(row.delta_bytes))}, {signed_pct(row.delta_pct)})")


def signed_bytes(nbytes: int) -> str:
    return ("+" if nbytes > 0 else "") + format_bytes(nbytes)


def signed_pct(value: float) -> str:
    return "new" if math.isnan(value) else f"{value:+.1f}%"


__all__ = ["COLUMNS", "Threshold", "compare", "parse_threshold"]
