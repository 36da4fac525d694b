"""memprof: where every byte of a PyTorch training step goes, and what to change so it fits.

Public API::

    with memprof.profile(model, optimizer) as prof:
        ...; prof.step()
    prof.modules(); prof.peak(); prof.timeline(); prof.save("reports/run.json")
    profile = memprof.load("reports/run.json")
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("memprof")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from memprof.advisor import Advice, Workload, advise
from memprof.categories import CATEGORIES, PHASES
from memprof.compare import compare
from memprof.errors import (
    BudgetError,
    DeviceNotAvailableError,
    MemprofError,
    OutputExistsError,
    ProfileActiveError,
    ProfileLoadError,
    UnknownGPUError,
)
from memprof.estimate import EstimateError, estimate
from memprof.profile import Peak, Profile, StepStats, load
from memprof.report import write_report as report
from memprof.snapshot.load import load_snapshot
from memprof.tracking.schedule import Schedule, StepAction, schedule
from memprof.tracking.session import MemoryLeakWarning, Profiler, profile
from memprof.units import format_bytes, parse_size

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
