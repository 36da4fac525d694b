"""The pytest entry point of memprof's plugin (``memprof.pytest_plugin`` does the work).

It lives outside the ``memprof`` package so that loading it at every pytest start imports
nothing heavy: importing ``memprof.pytest_plugin`` would import ``memprof`` and with it torch
and pandas. memprof is imported only once a collected test carries ``memprof_limit``.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

MARKER = "memprof_limit"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(limit, *, backend='dispatch'): fail the test when memprof's measured peak "
        "exceeds limit (a size such as '64 MiB', or bytes)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check every marker's arguments before any test runs: a bad limit is a usage error."""
    for item in items:
        marker = item.get_closest_marker(MARKER)
        if marker is not None:
            from memprof.pytest_plugin import limit_of

            limit_of(marker, item.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return (yield)
    from memprof.pytest_plugin import limit_of, over_limit, profiler

    limit, backend = limit_of(marker, item.nodeid)
    prof = profiler(backend)
    with prof:
        result = yield
    failure = over_limit(prof.profile, limit)
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    return result
