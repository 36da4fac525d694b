"""Writing an export atomically: no half-written file, no file replaced without asking."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from memprof.errors import OutputExistsError


def write_bytes_atomic(target: Path, data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` to ``target`` via a temporary file in the same directory."""
    if target.is_dir():
        raise OutputExistsError(f"{target} is a directory")
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists (pass overwrite=True or --force)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
