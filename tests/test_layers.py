"""Imports flow one way: no memprof module imports one from a higher layer, not even inside a
function or under ``TYPE_CHECKING``.

GIVEN every module of the package, parsed (not imported), WHEN each import of a memprof module
is read, THEN the imported module's layer is at most the importer's, except for the few
imports listed in ALLOWED, each with the reason it is still there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import memprof
from memprof import hooks, oom

PACKAGE = Path(memprof.__file__).parent

#: Lowest first; a module belongs to the longest prefix that names it.
LAYERS: tuple[tuple[str, ...], ...] = (
    # the vocabulary every room speaks, and the hooks through which a lower room calls up
    (
        "memprof.categories",
        "memprof.units",
        "memprof.errors",
        "memprof._version",
        "memprof.hooks",
        "memprof.jsonable",
        "memprof.cost_tiers",
        "memprof.decimate",
        "memprof.quiet_import",
        "memprof.dict_record",
        "memprof.atomic_files",
    ),
    # the caching-allocator model and device truth (an out-of-memory error is one)
    ("memprof.allocator", "memprof.devices", "memprof.gpus", "memprof.oom"),
    # the Profile's records and file format: what tracking produces, so below it
    ("memprof.profile",),
    ("memprof.tracking",),
    (
        "memprof.estimate", "memprof.compare", "memprof.snapshot", "memprof.fake_scalars",
        "memprof.fake_kernels",
        "memprof.training_step",  # the step the estimate and the advisor's runs share
    ),
    ("memprof.advisor",),
    ("memprof.report",),
    ("memprof", "memprof._plug_in"),  # the facade
    ("memprof.integrations", "memprof.pytest_plugin"),
    ("memprof.cli", "memprof.commands", "memprof.__main__"),
)

#: "importer -> imported": why the import is still there.
ALLOWED: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    found = [
        (len(prefix), index)
        for index, layer in enumerate(LAYERS)
        for prefix in layer
        if module == prefix or module.startswith(prefix + ".")
    ]
    if not found:
        raise LookupError(f"{module} is in no layer: add it to LAYERS")
    return max(found)[1]


def imports_of(path: Path) -> set[str]:
    """The memprof modules ``path`` imports anywhere (``from memprof import x`` is the module
    ``memprof.x`` when there is one, else the facade)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            base = node.module or ""
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name == "memprof" or name.startswith("memprof.")}


def _upward_imports() -> set[str]:
    return {
        f"{module} -> {imported}"
        for module, path in MODULES.items()
        for imported in imports_of(path)
        if layer_of(imported) > layer_of(module)
    }


def test_every_module_has_a_layer() -> None:
    assert len(MODULES) > 80
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_a_higher_layer() -> None:
    assert _upward_imports() - set(ALLOWED) == set()


def test_every_allowed_import_is_still_there() -> None:
    assert set(ALLOWED) <= _upward_imports()  # a stale entry would hide a new one


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import memprof", {"memprof"}),
        ("from memprof import oom as o", {"memprof.oom"}),
        ("from memprof import profile", {"memprof.profile"}),
        ("from memprof import format_bytes", {"memprof"}),
        (
            "def f():\n    from memprof.report.notebook import profile_html",
            {"memprof.report.notebook"},
        ),
        ("if TYPE_CHECKING:\n    from memprof.advisor import Advice", {"memprof.advisor"}),
        ("import torch", set()),
    ],
)
def test_imports_are_found_wherever_they_are(
    tmp_path: Path, source: str, expected: set[str]
) -> None:
    path = tmp_path / "module.py"
    path.write_text(source)
    assert imports_of(path) == expected
    if expected:
        assert layer_of(next(iter(expected))) >= 0


def test_the_facade_plugs_in_every_hook() -> None:
    assert set(hooks.__annotations__) == {"profile_html", "advice_html", "write_report", "oom_plan"}
    assert [name for name in hooks.__annotations__ if getattr(hooks, name) is None] == []


def test_a_lower_room_calls_up_through_its_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(hooks, "oom_plan", lambda profile, report: calls.append((profile, report)))
    oom.with_plan("profile", "report")
    assert calls == [("profile", "report")]
    monkeypatch.setattr(hooks, "oom_plan", None)
    with pytest.raises(RuntimeError, match="oom_plan is not plugged in"):
        oom.with_plan("profile", "report")


def test_no_test_file_imports_another_test_file_or_conftest() -> None:
    """Shared helpers live in plain modules (models, workloads, report_inputs, ...)."""
    tests = Path(__file__).parent
    found = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            found += [
                f"{path.name}: {n}"
                for n in names
                if n.split(".")[0] in ("conftest", "tests") or n.startswith("test_")
            ]
    assert found == []
