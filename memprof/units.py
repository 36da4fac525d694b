"""Byte sizes: one formatter for humans (IEC units) and one parser for budgets."""

from __future__ import annotations

import re

from memprof.errors import BudgetError

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_FACTORS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[a-zA-Z]*)\s*$")


def format_bytes(nbytes: float, *, precision: int = 1) -> str:
    """Format a byte count with IEC units: ``format_bytes(1536) == '1.5 KiB'``."""
    sign = "-" if nbytes < 0 else ""
    value = float(abs(nbytes))
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{sign}{int(value)} B"
            return f"{sign}{value:.{precision}f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """Parse a size such as ``"24GiB"``, ``"24 GB"``, ``"512MiB"`` or ``"1000"`` into bytes.

    ``GB``/``MB`` are decimal (10^9, 10^6), ``GiB``/``MiB`` binary, as on spec sheets.
    Raises :class:`~memprof.errors.BudgetError` with the accepted forms when it cannot.
    """
    match = _SIZE_RE.match(text)
    if match is None or match.group("unit").lower() not in _FACTORS:
        raise BudgetError(
            f"cannot read {text!r} as a size: write a number and a unit, "
            "such as 24GiB, 80GB, 512MiB or a plain number of bytes"
        )
    return int(float(match.group("num")) * _FACTORS[match.group("unit").lower()])


def round_up(nbytes: int, block: int) -> int:
    """Round ``nbytes`` up to a multiple of ``block`` (0 stays 0)."""
    if block <= 1:
        return nbytes
    return -(-nbytes // block) * block
