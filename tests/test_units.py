"""Sizes: one formatter, one parser, CUDA's rounding rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memprof import BudgetError, format_bytes, parse_size
from memprof.units import round_up


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (3 * 2**30, "3.0 GiB"), (-2048, "-2.0 KiB")],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    ("text", "n"),
    [("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("512 MiB", 512 * 2**20), ("1000", 1000),
     ("1.5gib", int(1.5 * 2**30))],
)
def test_parse_size(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["24 gigs", "", "GiB", "-1GB", "1e9"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(BudgetError, match="24GiB"):
        parse_size(text)


@given(st.integers(min_value=0, max_value=2**40), st.sampled_from([1, 512, 2**20]))
def test_round_up(n: int, block: int) -> None:
    r = round_up(n, block)
    assert r % block == 0
    assert n <= r < n + block


def test_cuda_rounding_examples() -> None:
    assert [round_up(n, 512) for n in (0, 1, 512, 513, 4096)] == [0, 512, 512, 1024, 4096]
