"""Shared pieces of the CLI: one-line errors, aligned tables, ``--json`` output, progress bars.

Every command reports a :class:`~memprof.errors.MemprofError` as one line on stderr
(``memprof: error: ...``) and exits with the error's ``exit_code``; it never shows a traceback
for a problem the user can fix. ``--json`` output is a single JSON object on stdout whose keys
are documented in each command's docstring and only ever grow.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, overload

import click

from memprof.errors import CommandError, MemprofError
from memprof.jsonable import to_jsonable
from memprof.units import format_bytes

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

#: Exit code for a command line that cannot be acted on (as click uses for usage errors).
USAGE_EXIT_CODE = CommandError.exit_code


def fail(message: str, exit_code: int = 1) -> None:
    """Print ``memprof: error: message`` on stderr and exit with ``exit_code``."""
    click.echo(f"memprof: error: {one_line(message)}", err=True)
    sys.exit(exit_code)


def note(message: str) -> None:
    """A one-line remark on stderr that does not stop the command."""
    click.echo(f"memprof: {one_line(message)}", err=True)


def one_line(message: object) -> str:
    """Collapse a message to a single line (exception texts can span several)."""
    text = " ".join(str(message).split())
    return text or "unknown error"


def handle_errors(func: F) -> F:
    """Decorator for command callbacks: a MemprofError becomes one line and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MemprofError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        return None

    return wrapper  # type: ignore[return-value]


# ------------------------------------------------------------------ JSON
def echo_json(data: dict[str, Any]) -> None:
    """Write ``data`` as one indented JSON object on stdout."""
    click.echo(json.dumps(to_jsonable(data), indent=2, sort_keys=False))


@overload
def json_option(func: F) -> F: ...


@overload
def json_option(*, keys: str) -> Callable[[F], F]: ...


def json_option(func: F | None = None, *, keys: str | None = None) -> Any:
    """The ``--json`` flag every reporting command takes: ``@json_option`` or
    ``@json_option(keys="a, b, c")`` to list the output's top-level keys in ``--help``."""
    text = "Print one JSON object on stdout instead of text"
    text += f" (keys: {keys})." if keys else " (stable keys)."

    def decorate(f: F) -> F:
        return click.option("--json", "as_json", is_flag=True, help=text)(f)

    return decorate if func is None else decorate(func)


# ------------------------------------------------------------------ tables
def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    align: str | None = None,
) -> str:
    """An aligned text table. ``align`` holds one of ``l``/``r`` per column (default: numbers
    and sizes right, text left). Cells are shown with ``str()``; format sizes before."""
    body = [[str(c) for c in row] for row in rows]
    if align is None:
        align = "".join(
            "r" if body and all(_looks_numeric(row[i]) for row in body) else "l"
            for i in range(len(headers))
        )
    widths = [max([len(h), *(len(row[i]) for row in body)]) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        out = [
            c.rjust(w) if a == "r" else c.ljust(w)
            for c, w, a in zip(cells, widths, align, strict=True)
        ]
        return "  ".join(out).rstrip()

    lines = [fmt(list(headers)), fmt(["-" * w for w in widths])]
    lines.extend(fmt(row) for row in body)
    return "\n".join(lines)


def size(nbytes: int | float | None) -> str:
    """A byte count for a table cell (IEC units), ``-`` when unknown."""
    return "-" if nbytes is None else format_bytes(nbytes)


def _looks_numeric(cell: str) -> bool:
    head = cell.split(" ", 1)[0].lstrip("-+")
    return cell == "-" or head.replace(".", "", 1).replace("%", "").isdigit()


# ------------------------------------------------------------------ progress
@contextmanager
def progress(items: Iterable[T], *, label: str, length: int | None = None,
             enabled: bool = True) -> Iterator[Iterable[T]]:
    """A click progress bar on stderr over ``items``; a plain iterator when disabled
    (``--json``) or when stderr is not a terminal (click then prints only the label)."""
    if not enabled:
        yield items
        return
    with click.progressbar(
        items, label=label, length=length, file=sys.stderr, show_pos=True
    ) as bar:
        yield bar


# ------------------------------------------------------------------ paths
def output_path(path: str | Path, *, force: bool, what: str) -> Path:
    """Check an output path before any work is done: refuse an existing file without
    ``--force``, a directory, or a parent that is a file. Returns it as a Path."""
    from memprof.errors import OutputExistsError

    target = Path(path)
    if target.is_dir():
        raise CommandError(f"{what} {target} is a directory: give a file name")
    if target.exists() and not force:
        raise OutputExistsError(f"{target} already exists (pass --force to replace it)")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CommandError(f"cannot write {what} {target}: {parent} is not a directory")
            break
    return target


EXAMPLE_EPILOG = "\b\nExamples:\n"


def examples(*lines: str) -> str:
    """An epilog for ``--help`` that keeps the example lines as written."""
    return EXAMPLE_EPILOG + "\n".join(f"  {line}" for line in lines)
