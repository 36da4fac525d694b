"""memprof: where every byte of a PyTorch training step goes, and what to change so it fits.

Public API::

    with memprof.profile(model, optimizer) as prof:
        ...; prof.step()
    prof.modules(); prof.peak(); prof.timeline(); prof.save("reports/run.json")
    profile = memprof.load("reports/run.json")
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from memprof._plug_in import plug_in
from memprof._version import __version__
from memprof.categories import CATEGORIES, PHASES
from memprof.errors import (
    BudgetError,
    DeviceNotAvailableError,
    EstimateError,
    MemprofError,
    OutputExistsError,
    ProfileActiveError,
    ProfileLoadError,
    UnknownGPUError,
)
from memprof.profile import Peak, Profile, StepStats, load
from memprof.tracking.schedule import Schedule, StepAction, schedule
from memprof.tracking.session import MemoryLeakWarning, Profiler, profile
from memprof.units import format_bytes, parse_size

if TYPE_CHECKING:
    from memprof.advisor import Advice, Workload, advise
    from memprof.compare import compare
    from memprof.estimate import estimate
    from memprof.report import write_report as report
    from memprof.snapshot.load import load_snapshot

plug_in()  # the report and the advisor, for the rooms below them (memprof.hooks)

#: Public names loaded on first use, so that ``import memprof`` costs only the measurement:
#: name -> (module, attribute).
_LAZY: dict[str, tuple[str, str]] = {
    "Advice": ("memprof.advisor", "Advice"),
    "Workload": ("memprof.advisor", "Workload"),
    "advise": ("memprof.advisor", "advise"),
    "compare": ("memprof.compare", "compare"),
    "estimate": ("memprof.estimate", "estimate"),
    "load_snapshot": ("memprof.snapshot.load", "load_snapshot"),
    "report": ("memprof.report", "write_report"),
}

#: Submodules that ``import memprof`` loaded before it loaded them lazily: still reachable as
#: attributes (``memprof.advisor.workload``) without an import of their own.
_SUBMODULES = frozenset({"advisor", "allocator", "devices", "gpus", "oom", "snapshot"})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})


class _Facade(types.ModuleType):
    """The package module, kept from losing a public function to its namesake submodule.

    Loading a submodule sets it as an attribute of its package, so the first
    ``from memprof.report import ...`` anywhere would replace the function ``memprof.report``
    with the module ``memprof.report`` (the same for ``compare``, ``estimate``, ``profile``).
    Loaded eagerly, the facade's own binding came last; loaded lazily, it must refuse the
    submodule instead (it stays in ``sys.modules``; ``__getattr__`` gives the function).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


_SHADOWED = frozenset({"compare", "estimate", "profile", "report"})
sys.modules[__name__].__class__ = _Facade

__all__ = [
    "CATEGORIES",
    "PHASES",
    "Advice",
    "BudgetError",
    "DeviceNotAvailableError",
    "EstimateError",
    "MemoryLeakWarning",
    "MemprofError",
    "OutputExistsError",
    "Peak",
    "Profile",
    "ProfileActiveError",
    "ProfileLoadError",
    "Profiler",
    "Schedule",
    "StepAction",
    "StepStats",
    "UnknownGPUError",
    "Workload",
    "__version__",
    "advise",
    "compare",
    "estimate",
    "format_bytes",
    "load",
    "load_snapshot",
    "parse_size",
    "profile",
    "report",
    "schedule",
]
