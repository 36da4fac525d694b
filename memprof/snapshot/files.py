"""Writing an export atomically: no half-written file, no file replaced without asking."""

from __future__ import annotations

from pathlib import Path

from memprof.atomic_files import replace_atomically
from memprof.errors import OutputExistsError


def write_bytes_atomic(target: Path, data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` to ``target`` via a temporary file in the same directory."""
    if target.is_dir():
        raise OutputExistsError(f"{target} is a directory")
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists (pass overwrite=True or --force)")
    replace_atomically(target, data)
