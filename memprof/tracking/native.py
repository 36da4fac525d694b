"""memprof's C++ allocation recorder (recorder.cpp), compiled for the installed torch on first use.

The same module holds the caching allocator's model the replay feeds (allocator_model.cpp) and
the replay's walk over the events (walk.cpp).

The recorder is built with ``torch.utils.cpp_extension`` (a C++ compiler and ninja) against the
torch that is running, so it always matches its ABI; the build is cached per torch version and
recorder source (a few seconds to half a minute, once). Where it cannot be built, :func:`load`
returns None with the reason in :func:`unavailable_reason`, and the events backend reads the
PyTorch profiler's events instead (slower, same results). ``MEMPROF_NATIVE=0`` turns the
recorder off.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("recorder.cpp")
#: Built into the same module: the caching allocator's model and the replay's walk over the
#: events (its hot path).
SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("recorder.cpp", "allocator_model.cpp", "walk.cpp"))
HEADERS = (Path(__file__).with_name("allocator_model.h"),)
_module: Any = None
_tried = False
_reason = ""


def _name() -> str:
    """Per torch version and per recorder source: a build of another recorder.cpp (an older
    memprof, another checkout sharing the cache) is never loaded in its place, where its events
    would mean something else (the node events' value, say)."""
    version = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)
    text = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    digest = hashlib.sha256(text).hexdigest()[:10]
    return f"memprof_recorder_{version}_{digest}"


def load() -> Any:
    """The compiled recorder module, or None when it cannot be built here."""
    global _module, _tried, _reason
    if _tried:
        return _module
    _tried = True
    if os.environ.get("MEMPROF_NATIVE", "1") == "0":
        _reason = "turned off by MEMPROF_NATIVE=0"
        return None
    try:
        from torch.utils import cpp_extension

        name = _name()
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        clear_stale_lock(build_dir)
        if not any(build_dir.glob(name + ".*")):
            print(f"memprof: building its C++ allocation recorder for torch {torch.__version__}"
                  f" (once, up to a minute; cached in {build_dir})", file=sys.stderr)
        # The build prints compiler output and warnings: keep them out of the user's run.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                _ninja_on_path():
            _module = cpp_extension.load(
                name=name,
                sources=[str(path) for path in SOURCES],
                extra_cflags=["-O2"],
                verbose=False,
            )
    except Exception as exc:  # no compiler, no ninja, headers missing: fall back, say why
        first = str(exc).strip().splitlines()
        _reason = f"{type(exc).__name__}: {first[0] if first else ''}"[:200]
        _module = None
    return _module


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """The ninja that the ``ninja`` package installed, on PATH for the build (a venv's bin is
    not on PATH when its Python is run without activating it)."""
    old = os.environ.get("PATH", "")
    try:
        import ninja

        os.environ["PATH"] = str(ninja.BIN_DIR) + os.pathsep + old
    except (ImportError, AttributeError):
        pass
    try:
        yield
    finally:
        os.environ["PATH"] = old


#: A build takes well under a minute; a lock file older than this was left by a killed build.
STALE_LOCK_S = 600.0


def clear_stale_lock(build_dir: Path, *, now: float | None = None) -> bool:
    """Remove the build lock a killed build left behind (torch's file baton would otherwise
    wait for it forever, hanging every later run); True when one was removed."""
    lock = build_dir / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except OSError:
        return False
    if age < STALE_LOCK_S:
        return False
    lock.unlink(missing_ok=True)
    return True


def unavailable_reason() -> str:
    """Why :func:`load` returned None ("" when it did not, or was not tried)."""
    return _reason
