"""Running a user's script (or ``-m module``) in-process as ``python`` would: find and check
the target, set its ``sys.argv``, ``sys.path`` and working directory, run it as ``__main__``
inside a profiler, and turn how it ended into an exit status (``memprof run`` and
``memprof advise SCRIPT`` share it)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import runpy
import sys
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import click

from memprof.commands.common import CommandError, one_line
from memprof.errors import ProfileActiveError

_PYTHON_SUFFIXES = (".py", ".pyw")


@dataclass
class Target:
    """What to run: a script path or a module name, and the ``sys.argv`` it will see."""

    name: str
    is_module: bool
    argv: list[str]
    path: Path | None = None

    @property
    def stem(self) -> str:
        """The default report name: the script's stem or the module's last component."""
        if self.is_module:
            return self.name.rsplit(".", 1)[-1] or "module"
        assert self.path is not None
        return self.path.stem


@dataclass
class Outcome:
    """How the script ended."""

    exit_code: int = 0
    error: str | None = None
    optimizer_steps: int = 0
    notes: list[str] = field(default_factory=list)



def resolve_target(args: tuple[str, ...], *, as_module: bool) -> Target:
    """Check the script or module exists and is Python; build the argv it will see."""
    if not args:
        raise CommandError(
            "no script given: use memprof run SCRIPT.py [ARGS]... or memprof run -m MODULE"
        )
    name, rest = args[0], list(args[1:])
    if as_module:
        return _module_target(name, rest)
    path = Path(name)
    if not path.exists():
        raise CommandError(f"{name}: no such script")
    if path.is_dir():
        raise CommandError(f"{name} is a directory, not a Python script")
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise CommandError(f"{name}: cannot read it ({exc.strerror or exc})") from None
    _check_python(path, source)
    return Target(name=name, is_module=False, argv=[name, *rest], path=path)


def _check_python(path: Path, source: bytes) -> None:
    """Refuse a file Python could not run: compile it (nothing is executed)."""
    try:
        compile(source, str(path), "exec", dont_inherit=True)
    except SyntaxError as exc:
        where = f" (line {exc.lineno})" if exc.lineno else ""
        hint = "" if path.suffix in _PYTHON_SUFFIXES else ", and it has no .py suffix"
        raise CommandError(
            f"{path} is not a Python script: {exc.msg}{where}{hint}"
        ) from None
    except ValueError as exc:  # source with NUL bytes: a binary file
        raise CommandError(f"{path} is not a Python script ({exc})") from None


def _module_target(name: str, rest: list[str]) -> Target:
    if not name or name.startswith("-"):
        raise CommandError("-m needs a module name: memprof run -m package.module [ARGS]...")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:  # `python -m` looks in the current directory first
        sys.path.insert(0, cwd)
    try:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations is not None:
            spec = importlib.util.find_spec(f"{name}.__main__")
            if spec is None:
                raise CommandError(f"{name} is a package with no __main__ module: cannot run it")
    except (ImportError, ValueError) as exc:
        raise CommandError(f"cannot find module {name}: {one_line(exc)}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    if spec is None:
        raise CommandError(f"no module named {name}")
    return Target(name=name, is_module=True, argv=[spec.origin or name, *rest])


# ------------------------------------------------------------------ execution
def execute(
    target: Target, profiler: Any, *, quiet_stdout: bool = False, capture: Any = None
) -> Outcome:
    """Run the target as ``__main__`` inside ``profiler``; never raises for the script's
    errors (they are printed as Python prints them and become exit code 1). ``capture`` (a
    :class:`~memprof.advisor.capture.ScriptCapture`) takes what fake runs need meanwhile."""
    outcome = Outcome()
    redirect = (
        contextlib.redirect_stdout(sys.stderr) if quiet_stdout else contextlib.nullcontext()
    )

    def count_step(*_: Any) -> None:
        outcome.optimizer_steps += 1

    from torch.optim.optimizer import register_optimizer_step_post_hook

    counter = register_optimizer_step_post_hook(count_step)
    try:
        with script_environment(target), redirect, warnings.catch_warnings(), \
                capture if capture is not None else contextlib.nullcontext():
            from memprof.tracking.session import MemoryLeakWarning

            warnings.simplefilter("ignore", MemoryLeakWarning)  # it is in the summary
            try:
                with profiler:
                    try:
                        run_target(target)
                    except SystemExit as exc:  # a deliberate exit is not an interruption
                        outcome.exit_code = _exit_status(exc.code)
                    finally:
                        if capture is not None:  # its loss trace closes inside the profiler
                            capture.stop()
            except KeyboardInterrupt:
                outcome.exit_code = 130
                outcome.error = "KeyboardInterrupt"
                click.echo("KeyboardInterrupt", err=True)
            except Exception as exc:
                outcome.exit_code = 1
                outcome.error = f"{type(exc).__name__}: {one_line(exc)}"
                _print_script_traceback(exc)
                if isinstance(exc, ProfileActiveError):
                    outcome.notes.append(
                        "the script profiles itself with memprof.profile: run it with python, "
                        "or remove its memprof.profile block to use memprof run"
                    )
    finally:
        counter.remove()
        sys.stdout.flush()
    return outcome


@contextlib.contextmanager
def script_environment(target: Target) -> Iterator[None]:
    """``sys.argv`` and ``sys.path[0]`` as Python sets them for the target; restored after,
    with the working directory (outputs are named from where memprof was started) and the
    memory limits (a script that capped its address space must not starve the report)."""
    saved_argv, saved_path, saved_cwd = sys.argv[:], sys.path[:], os.getcwd()
    saved_limits = _memory_limits()
    sys.argv = list(target.argv)
    if target.is_module:
        sys.path.insert(0, os.getcwd())
    else:
        assert target.path is not None
        sys.path.insert(0, str(target.path.resolve().parent))
    try:
        yield
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        if os.getcwd() != saved_cwd:
            os.chdir(saved_cwd)
        _restore_memory_limits(saved_limits)


def _memory_limits() -> dict[int, tuple[int, int]]:
    """The soft and hard address-space and data limits (empty where ``resource`` is not)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return {}
    limits = (resource.RLIMIT_AS, resource.RLIMIT_DATA)
    return {which: resource.getrlimit(which) for which in limits}


def _restore_memory_limits(saved: dict[int, tuple[int, int]]) -> None:
    """Put back the soft limits the script changed, as far as its hard limits still allow."""
    import resource

    for which, (soft, _hard) in saved.items():
        current_soft, current_hard = resource.getrlimit(which)
        if current_soft == soft:
            continue
        if current_hard != resource.RLIM_INFINITY and (
            soft == resource.RLIM_INFINITY or soft > current_hard
        ):
            soft = current_hard  # the script lowered the hard limit: the most it allows
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(which, (soft, current_hard))


def run_target(target: Target) -> None:
    """Run the target as ``__main__`` (its argv, path and cwd are the caller's to set)."""
    if target.is_module:
        runpy.run_module(target.name, run_name="__main__", alter_sys=True)
    else:
        assert target.path is not None
        runpy.run_path(str(target.path), run_name="__main__")


def _exit_status(code: object) -> int:
    """What the interpreter would exit with for ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    click.echo(str(code), err=True)
    return 1


def _print_script_traceback(exc: BaseException) -> None:
    """Print the traceback from the script's first frame on, as ``python script.py`` would."""
    tb: TracebackType | None = exc.__traceback__
    first = tb
    while first is not None and _is_launcher_frame(first.tb_frame.f_code.co_filename):
        first = first.tb_next
    sys.stdout.flush()
    traceback.print_exception(type(exc), exc, first or tb, file=sys.stderr)


def _is_launcher_frame(filename: str) -> bool:
    """Frames of memprof and runpy that sit between ``memprof run`` and the script."""
    if filename.startswith("<frozen runpy"):
        return True
    try:
        path = Path(filename).resolve()
    except (OSError, ValueError):
        return False
    return path == Path(runpy.__file__).resolve() or _MEMPROF_DIR in path.parents


_MEMPROF_DIR = Path(__file__).resolve().parent.parent
