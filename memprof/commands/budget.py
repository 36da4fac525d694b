"""The memory budget given on the command line (``--budget``), checked before a script runs."""

from __future__ import annotations


def parse_budget(text: str | None) -> str | None:
    """Check a budget (a size, or a GPU name when the GPU catalog is installed) before the
    script runs; the text itself goes to the advisor, which takes the CUDA context and the
    fragmentation reserve off a device's memory."""
    if text is None:
        return None
    try:
        from memprof.gpus import resolve_budget
    except ImportError:
        from memprof.units import parse_size

        parse_size(text)
    else:
        resolve_budget(text)
    return text

