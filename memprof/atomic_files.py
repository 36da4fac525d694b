"""Writing a file atomically: through a temporary file beside it, so no half-written file is
left, and no file replaced unless the caller allows it (profiles, reports, exports)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from memprof.errors import OutputExistsError


def write_text_atomic(target: Path, text: str, *, overwrite: bool) -> None:
    """Write ``text`` to ``target`` via a temporary file, so no half-written file is left."""
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists (pass overwrite=True or --force)")
    if target.is_dir():
        raise OutputExistsError(f"{target} is a directory")
    replace_atomically(target, text.encode("utf-8"))


def replace_atomically(target: Path, data: bytes) -> None:
    """Put ``data`` at ``target`` through a temporary file beside it (callers check first
    whether ``target`` may be replaced)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        # mkstemp creates the file private (0600); give it the permissions open() would.
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
