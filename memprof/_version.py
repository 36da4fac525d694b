"""memprof's version, in a module of its own so that the measurement can record it without
importing the facade (``memprof/__init__.py`` re-exports it)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("memprof")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
