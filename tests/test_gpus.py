"""GPU catalog and budget parsing."""

from __future__ import annotations

import pytest

from memprof import gpus
from memprof.errors import BudgetError, UnknownGPUError


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("A100 40GB", "A100 40GB"),
        ("a100-80gb", "A100 80GB"),
        ("  h100 ", "H100 80GB"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("3090", "RTX 3090"),
        ("Tesla T4", "T4"),
        ("l4", "L4"),
        ("A10", "A10"),
        ("h200", "H200"),
    ],
)
def test_lookup_is_case_and_space_insensitive(text: str, name: str) -> None:
    assert gpus.lookup(text).name == name


def test_catalog_memory_as_sold() -> None:
    gib = 1024**3
    sold = {g.name: g.memory_bytes for g in gpus.GPUS}
    assert sold["T4"] == 16 * gib and sold["A100 40GB"] == 40 * gib
    assert sold["H100 80GB"] == 80 * gib and sold["H200"] == 141 * gib
    assert not gpus.lookup("T4").bf16 and gpus.lookup("A100").bf16


def test_unknown_gpu_suggests_close_names() -> None:
    with pytest.raises(UnknownGPUError) as info:
        gpus.lookup("A100 4GB")
    assert "A100 40GB" in str(info.value)
    assert "did you mean" in str(info.value)


def test_usable_memory_keeps_context_and_fragmentation_reserve() -> None:
    spec = gpus.lookup("A100 80GB")
    expected = (spec.driver_bytes - 768 * 1024**2) * 0.95
    assert spec.usable_bytes == int(expected)
    reserve = spec.driver_bytes - spec.usable_bytes
    assert 0.5 * 1024**3 < reserve < 6 * 1024**3


def test_resolve_budget_sizes_and_names() -> None:
    assert gpus.resolve_budget("24GiB")[0] == 24 * 1024**3
    assert gpus.resolve_budget("80GB")[0] == 80 * 10**9
    total, text = gpus.resolve_budget("A100 40GB")
    assert total == gpus.lookup("A100 40GB").driver_bytes and "A100 40GB" in text


@pytest.mark.parametrize("text", ["24 gigs", "lots", "24 parsecs"])
def test_malformed_budget_is_a_clear_error(text: str) -> None:
    with pytest.raises((BudgetError, UnknownGPUError)) as info:
        gpus.resolve_budget(text)
    assert text in str(info.value)


def test_24_gigs_is_a_budget_error() -> None:
    with pytest.raises(BudgetError, match="24GiB"):
        gpus.resolve_budget("24 gigs")
