"""The kernel-scratch measurements of :mod:`memprof.tracking.kernel_corrections`, kept on disk
per machine, so that a later process (the next ``memprof advise`` or ``estimate``) reads them
instead of running the real kernels again.

A measurement is a pure function of the op, its arguments' layouts and the machine:
the CPU (model and instruction flags), the torch build and its thread count. Those name the
file (``kernels-<fingerprint>.jsonl``), so a measurement is only ever read back where it would
come out the same, and a prediction is the same to the byte with the cache cold, warm, or off.
Forked fake-run workers (:mod:`memprof.advisor.parallel`), which run no kernel, read their
parent's file (:func:`pin`), so a new process's rows need not wait for measurements.

The file is append-only JSON lines, one measurement a line (a line under 4 KiB is written in one
``write``, so processes measuring at once do not interleave); a line that does not parse is
skipped. It lives in ``$MEMPROF_CACHE_DIR``, else ``$XDG_CACHE_HOME/memprof``, else
``~/.cache/memprof``. ``MEMPROF_KERNEL_CACHE=0`` turns it off; where the directory cannot be
written the measurements stay in the process, as without the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

#: The environment variable that turns the cache off (``0``).
ENABLED_ENV = "MEMPROF_KERNEL_CACHE"
#: The environment variable that names the cache's directory.
DIR_ENV = "MEMPROF_CACHE_DIR"
#: Bumped when a measurement's meaning changes (an old file is then simply not read).
FORMAT = 2
#: A record longer than this is not written (it could interleave with another process's).
_MAX_LINE = 4000

#: Per process: the file read (its records by key), or None before the first lookup.
_loaded: dict[str, list[Any]] | None = None
_path: Path | None = None
#: The file read whatever the thread count (see :func:`pin`).
_pinned: Path | None = None


def enabled() -> bool:
    return os.environ.get(ENABLED_ENV, "1").strip() != "0"


def directory() -> Path:
    """Where the cache's files live (see the module docstring)."""
    given = os.environ.get(DIR_ENV)
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memprof"


def fingerprint() -> str:
    """This machine and torch build, as far as a kernel's scratch can depend on them."""
    parts = [
        str(FORMAT), torch.__version__, platform.machine(), _cpu_description(),
        str(torch.get_num_threads()), str(torch.backends.mkldnn.is_available()),
        str(torch.backends.mkldnn.enabled), torch.backends.cpu.get_cpu_capability(),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _cpu_description() -> str:
    """The CPU's model name and instruction flags (Linux), else what ``platform`` says."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    wanted = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name in ("model name", "flags", "Features", "CPU part") and name not in wanted:
            wanted[name] = value.strip()
        if not line.strip() and wanted:  # the first processor's block is enough
            break
    return "\n".join(f"{k}={v}" for k, v in sorted(wanted.items())) or platform.processor()


def file_path() -> Path:
    return directory() / f"kernels-{fingerprint()}.jsonl"


def lookup(key: str) -> list[Any] | None:
    """The stored measurement of ``key``; None where there is none or the cache is off."""
    records = _records()
    return None if records is None else records.get(key)


def store(key: str, record: list[Any]) -> None:
    """Keep ``key``'s measurement (a JSON-able list) for later processes; a cache that cannot
    be written is left alone."""
    records = _records()
    if records is None:
        return
    records[key] = record
    line = json.dumps({"key": key, "value": record}) + "\n"
    if len(line) > _MAX_LINE or _path is None:
        return
    try:
        _path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def pin() -> None:
    """Keep reading this process's file from now on, whatever its thread count becomes: a
    forked worker (one thread, never measuring) reads the measurements its parent's runs
    would."""
    global _pinned
    _pinned = file_path() if enabled() else None
    _records()


def _records() -> dict[str, list[Any]] | None:
    global _loaded, _path
    if not enabled():
        return None
    path = _pinned or file_path()
    if _loaded is None or path != _path:  # first use, or another fingerprint (thread count)
        _path, _loaded = path, _read(path)
    return _loaded


def _read(path: Path) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    try:
        text = path.read_text()
    except OSError:
        return found
    for line in text.splitlines():
        try:
            record = json.loads(line)
            key, value = record["key"], record["value"]
        except (ValueError, KeyError, TypeError):
            continue  # a torn or foreign line
        if isinstance(key, str) and isinstance(value, list):
            found[key] = value
    return found


def forget() -> None:
    """Read the file again on the next lookup (tests; another process wrote it)."""
    global _loaded, _path, _pinned
    _loaded, _path, _pinned = None, None, None
