"""One errors module: every exception memprof raises of its own is defined in memprof/errors.py
as a MemprofError, and the modules that raised it before still export it under its old name.

GIVEN the source of every memprof module, WHEN its class definitions are read, THEN no class
derived from an exception is defined outside errors.py, except the control-flow signals listed.
"""

from __future__ import annotations

import ast
import builtins
import importlib
from pathlib import Path

import pytest

import memprof
from memprof import errors

PACKAGE = Path(memprof.__file__).parent

#: Exceptions that are no error a user sees: each with the reason it stays where it is.
CONTROL_FLOW = {
    "advisor/script.py:_Enough": "a BaseException that stops the user's script once the steps "
    "are measured (its own `except Exception` must not catch it); never reaches a caller",
}

#: The classes moved into errors.py, by the module that defined (and still exports) them.
MOVED = {
    "memprof.allocator": "AllocatorOOM",
    "memprof.advisor.fake_prediction": "FakeRunError",
    "memprof.advisor.script": "ScriptFailed",
    "memprof.advisor.capture": "CaptureError",
}


def _is_exception_base(base: ast.expr) -> bool:
    name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
    builtin = getattr(builtins, name, None)
    if isinstance(builtin, type) and issubclass(builtin, BaseException):
        return not issubclass(builtin, Warning)
    return name.endswith(("Error", "Exception")) or hasattr(errors, name)


def _exception_classes() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(map(_is_exception_base, node.bases)):
                found.append(f"{path.relative_to(PACKAGE).as_posix()}:{node.name}")
    return found


def test_every_exception_lives_in_errors() -> None:
    classes = _exception_classes()
    outside = [c for c in classes if not c.startswith("errors.py:") and c not in CONTROL_FLOW]
    assert outside == []
    assert len([c for c in classes if c.startswith("errors.py:")]) >= 16
    assert set(CONTROL_FLOW) <= set(classes)  # an entry whose class is gone is stale


def test_every_exception_in_errors_is_a_memprof_error() -> None:
    defined = [
        v
        for v in vars(errors).values()
        if isinstance(v, type) and issubclass(v, BaseException) and v.__module__ == errors.__name__
    ]
    assert len(defined) >= 16
    assert all(issubclass(cls, errors.MemprofError) for cls in defined)
    assert all(isinstance(cls.exit_code, int) and cls.exit_code > 0 for cls in defined)


@pytest.mark.parametrize(("module", "name"), sorted(MOVED.items()))
def test_moved_exceptions_keep_their_old_import(module: str, name: str) -> None:
    cls = getattr(importlib.import_module(module), name)
    assert cls is getattr(errors, name)
    assert issubclass(cls, errors.MemprofError)


def test_fake_run_error_is_still_a_runtime_error() -> None:
    with pytest.raises(RuntimeError, match="needs several processes"):
        raise errors.FakeRunError("a sharded run needs several processes")
