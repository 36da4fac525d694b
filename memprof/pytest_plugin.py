"""A pytest plugin: ``@pytest.mark.memprof_limit("64 MiB")`` fails a test whose peak is higher.

Registered through the ``pytest11`` entry point (the light hooks in :mod:`memprof_pytest`,
which import this module only for marked tests), so installing memprof is enough. The marked
test runs inside a global :func:`memprof.profile` (every module and optimizer that runs is
tracked; the whole test is one step); when its peak exceeds the limit the test fails with the
peak, where it happened, and the module and category that held the most at it::

    @pytest.mark.memprof_limit("64 MiB")
    def test_step_fits():
        model(x).sum().backward()

    # memprof_limit: peak 80.2 MiB exceeds the limit 64.0 MiB (step 0, backward in '1');
    # most held at the peak: activation of '1' (31.3 MiB), ...

The limit is a size (``"64 MiB"``, ``"1GB"``) or a number of bytes. ``backend=`` picks
memprof's measurement backend: the default ``"dispatch"`` also measures tests that build their
tensors under ``FakeTensorMode`` (nothing is allocated there, so allocation events see
nothing); ``"events"`` is cheaper for real tensors. Tests without the marker are not touched,
and memprof (with torch) is only imported once a collected test carries the marker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from memprof.profile import Profile

MARKER = "memprof_limit"
_BACKENDS = ("dispatch", "events", "auto")
#: Holders named in the failure message.
TOP_HOLDERS = 3


def limit_of(marker: pytest.Mark, where: str) -> tuple[int, str]:
    """The marker's (limit in bytes, backend); raises ``pytest.UsageError`` (one line)."""
    usage = f"use @pytest.mark.{MARKER}('64 MiB') (a size or a number of bytes)"
    if len(marker.args) != 1 or set(marker.kwargs) - {"backend"}:
        raise pytest.UsageError(f"{where}: {MARKER} takes one limit: {usage}")
    backend = marker.kwargs.get("backend", "dispatch")
    if backend not in _BACKENDS:
        raise pytest.UsageError(
            f"{where}: {MARKER} backend must be one of {', '.join(_BACKENDS)}, not {backend!r}"
        )
    limit = marker.args[0]
    if isinstance(limit, bool) or not isinstance(limit, int | str):
        raise pytest.UsageError(f"{where}: {MARKER} limit {limit!r} is not a size: {usage}")
    if isinstance(limit, int):
        nbytes = limit
    else:
        from memprof.errors import BudgetError
        from memprof.units import parse_size

        try:
            nbytes = parse_size(limit)
        except BudgetError:
            raise pytest.UsageError(
                f"{where}: {MARKER} cannot read {limit!r} as a size: {usage}"
            ) from None
    if nbytes <= 0:
        raise pytest.UsageError(
            f"{where}: {MARKER} limit must be positive, not {limit!r}: {usage}"
        )
    return nbytes, backend


def profiler(backend: str) -> Any:
    """The global profiler a marked test runs in."""
    from memprof.tracking.session import profile

    return profile(backend=backend)  # type: ignore[arg-type]


def over_limit(profile: Profile, limit: int) -> str | None:
    """The failure message when ``profile``'s peak exceeds ``limit`` bytes, else None."""
    from memprof.units import format_bytes

    peak = profile.peak_info
    if peak is None or peak.total_bytes <= limit:
        return None
    holders = sorted(
        ((nbytes, module, category) for module, row in peak.by_module.items()
         for category, nbytes in row.items() if nbytes > 0),
        reverse=True,
    )[:TOP_HOLDERS]
    held = ", ".join(f"{category} of {module or '(root)'!r} ({format_bytes(nbytes)})"
                     for nbytes, module, category in holders)
    where = f"step {peak.step}, {peak.phase}" + (f" in {peak.module!r}" if peak.module else "")
    return (f"{MARKER}: peak {format_bytes(peak.total_bytes)} exceeds the limit "
            f"{format_bytes(limit)} ({where}); most held at the peak: {held or 'nothing'}")
