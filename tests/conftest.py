"""Suite-wide settings.

The advisor's fake runs share the usable cores by forking (memprof.advisor.parallel); in the
suite they run in the test's own process, so a test that patches something inside a fake run
(a counter, a stand-in) sees every run, and the suite's processes do not compete for the cores.
tests/test_fake_speed.py turns the workers on where it checks them (same bytes as one by one,
a worker that hangs or dies).

The kernel-scratch measurements stay in each test's process too (no file under the user's
cache directory is read or written): tests/test_kernel_cache.py turns the cache on in a
directory of its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _fake_runs_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMPROF_FAKE_WORKERS", "0")


@pytest.fixture(autouse=True)
def _kernel_measurements_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMPROF_KERNEL_CACHE", "0")


@pytest.fixture
def one_rank(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A process group of one rank over gloo (a file store in ``tmp_path``), destroyed after."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
