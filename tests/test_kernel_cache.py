"""The per-machine file of kernel-scratch measurements (memprof.tracking.kernel_cache): a later
process reads what an earlier one measured, and every byte predicted stays the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from workloads import mlp_workload

from memprof.advisor.fake_prediction import fake_peak
from memprof.tracking import kernel_cache, kernel_corrections


def _fresh_process(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """An empty in-process table, as in a new process; returns a list that counts the real
    kernels run to measure."""
    monkeypatch.setattr(kernel_corrections, "TABLE", kernel_corrections.KernelCorrections())
    kernel_cache.forget()
    runs: list[int] = []
    measure = kernel_corrections._measure_rows

    def counted(*args: object, **kwargs: object) -> object:
        runs.append(1)
        return measure(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernel_corrections, "_measure_rows", counted)
    return runs


def _cache_in(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    monkeypatch.setenv(kernel_cache.ENABLED_ENV, "1")
    monkeypatch.setenv(kernel_cache.DIR_ENV, str(path))


def test_a_later_process_reads_the_measurements_and_predicts_the_same_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = mlp_workload()
    runs = _fresh_process(monkeypatch)
    off = fake_peak(w)  # the cache off (the suite's default): measured in this process
    assert runs  # the MLP's matmuls are measured
    _cache_in(monkeypatch, tmp_path)
    runs = _fresh_process(monkeypatch)
    cold = fake_peak(w)
    measured = len(runs)
    assert measured > 0
    lines = kernel_cache.file_path().read_text().splitlines()
    assert len(lines) == measured  # one line per measurement
    runs = _fresh_process(monkeypatch)
    warm = fake_peak(w)
    assert runs == []  # nothing run again
    assert off == cold == warm


def test_a_torn_line_is_skipped_and_another_machine_has_another_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _cache_in(monkeypatch, tmp_path)
    _fresh_process(monkeypatch)
    path = kernel_cache.file_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"key": "a", "value": [1, [2], true]}\n{"key": "b", "val\n[]\n')
    assert kernel_cache.lookup("a") == [1, [2], True]
    assert kernel_cache.lookup("b") is None
    first = kernel_cache.fingerprint()
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:  # scratch can depend on the thread count: another file
        assert kernel_cache.fingerprint() != first
        assert kernel_cache.lookup("a") is None
    finally:
        torch.set_num_threads(threads)


def test_a_directory_that_cannot_be_written_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    _cache_in(monkeypatch, blocker / "cache")
    w = mlp_workload()
    runs = _fresh_process(monkeypatch)
    with_cache = fake_peak(w)
    monkeypatch.setenv(kernel_cache.ENABLED_ENV, "0")
    _fresh_process(monkeypatch)
    assert fake_peak(w) == with_cache
    assert runs  # measured, and nothing raised
