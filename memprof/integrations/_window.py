"""What the training-loop callbacks share: profile a window of steps, write the profile and
its report next to the trainer's outputs without replacing anything, and the numbers they log.

A framework callback calls :meth:`StepWindow.begin` when a step starts (with the model and
optimizer), :meth:`StepWindow.end` when it has finished (after the optimizer step), and
:meth:`StepWindow.close` when training stops (normally or not). Steps are numbered as the
trainers number them in their logs: the first optimizer step is step 1.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from memprof.categories import CATEGORIES
from memprof.profile import Profile
from memprof.tracking.schedule import StepAction

#: The prefix of every key the callbacks log.
LOG_PREFIX = "memprof/"


def chosen_steps(steps: int | Iterable[int]) -> frozenset[int]:
    """``3`` -> steps 1, 2, 3; an iterable: exactly those steps (each >= 1)."""
    if isinstance(steps, bool):
        raise TypeError("steps must be a number of steps or the step numbers to profile")
    if isinstance(steps, int):
        if steps < 1:
            raise ValueError(f"steps must be at least 1, not {steps}")
        return frozenset(range(1, steps + 1))
    chosen = frozenset(int(s) for s in steps)
    if not chosen or min(chosen) < 1:
        raise ValueError("steps must name at least one step, numbered from 1")
    return chosen


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a wrapper (accelerate's AcceleratedOptimizer, Lightning's
    LightningOptimizer): the one whose step hooks fire and whose state is the real state."""
    seen = 0
    while optimizer is not None and not _is_torch_optimizer_itself(optimizer) and seen < 4:
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None:
            break
        optimizer, seen = inner, seen + 1
    return optimizer


def _is_torch_optimizer_itself(optimizer: Any) -> bool:
    import torch

    wrapped = getattr(optimizer, "optimizer", None)
    return isinstance(optimizer, torch.optim.Optimizer) and not isinstance(
        wrapped, torch.optim.Optimizer)


def free_path(directory: Path, stem: str, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Paths ``directory/stem{suffix}`` for each suffix (a rank tag added under torchrun),
    none of which exists: ``stem_2``, ``stem_3``, ... when taken."""
    from memprof.tracking.distributed import rank_from_env, rank_path

    rank = rank_from_env()
    n = 1
    while True:
        name = stem if n == 1 else f"{stem}_{n}"
        paths = {s: rank_path(directory / f"{name}{s}", rank) for s in suffixes}
        if not any(p.exists() for p in paths.values()):
            return paths
        n += 1


def log_entry(profile: Profile) -> dict[str, float]:
    """The numbers a callback logs: the peak and its bytes by category, and the number of
    profiled steps (``memprof/peak_bytes``, ``memprof/peak_<category>_bytes``, ...)."""
    if profile.peak_info is None:
        return {}
    peak = profile.peak_info
    entry = {f"{LOG_PREFIX}peak_bytes": float(peak.total_bytes),
             f"{LOG_PREFIX}peak_step": float(peak.step)}
    for cat in CATEGORIES:
        entry[f"{LOG_PREFIX}peak_{cat}_bytes"] = float(peak.by_category.get(cat, 0))
    entry[f"{LOG_PREFIX}profiled_steps"] = float(len(profile.steps_stats))
    return entry


class StepWindow:
    """Profiles the chosen steps with one :class:`~memprof.tracking.session.Profiler`, open from
    the start of the first chosen step to the end of the last; steps in between that were not
    chosen run unprofiled (the schedule skips them)."""

    def __init__(self, steps: int | Iterable[int], *, framework: str, html: bool = True,
                 advise: bool = True, name: str = "memprof", prediction: str = "fake") -> None:
        if prediction not in ("fake", "analytic"):
            raise ValueError(f"prediction must be 'fake' or 'analytic', not {prediction!r}")
        self.chosen = chosen_steps(steps)
        self.framework = framework
        self.html = html
        self.advise = advise
        self.name = name
        self._profiler: Any = None
        self._capture: Any = None
        #: Predict the advice by fake runs of the model, batch and loss taken from the first
        #: profiled step (False: from the profile alone).
        self.fake_predictions = prediction == "fake"
        self._first = 0
        #: The finished profile, and where it was written ({".json": path, ".html": path}).
        self.profile: Profile | None = None
        self.paths: dict[str, Path] = {}
        #: Why something was not written (the report or the advice failing never stops training).
        self.notes: list[str] = []

    @property
    def active(self) -> bool:
        return self._profiler is not None

    def begin(self, step: int, model: Any, optimizer: Any) -> None:
        """Step ``step`` (1-based) starts: open the profiler if this is the first chosen step."""
        if self.active or self.profile is not None:
            return
        if step not in self.chosen:
            return
        from memprof.tracking.session import Profiler

        first, chosen = step, self.chosen

        def schedule(i: int) -> StepAction:
            return StepAction.ACTIVE if first + i in chosen else StepAction.SKIP

        self._first = first
        profiler = Profiler(model, unwrap_optimizer(optimizer), schedule=schedule)
        profiler.__enter__()
        self._profiler = profiler
        if self.advise and self.fake_predictions:
            try:
                from memprof.advisor.capture import ScriptCapture
            except ImportError:
                return
            self._capture = ScriptCapture().__enter__()  # inside the profiler: it leaves first

    def end(self, step: int) -> bool:
        """Step ``step`` has finished. True when it was the last chosen one (the profile is
        then closed and :attr:`profile` set; call :meth:`write`)."""
        if not self.active:
            return False
        if step >= max(self.chosen):
            self._close(None)
            return True
        self._profiler.step()
        return False

    def close(self, error: BaseException | None = None) -> bool:
        """Training stopped: close an open profile (its last step partial when ``error``).
        True when a profile was closed now."""
        if not self.active:
            return False
        self._close(error)
        return True

    def _close(self, error: BaseException | None) -> None:
        profiler, self._profiler = self._profiler, None
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
        if error is None:
            profiler.__exit__(None, None, None)
        else:
            profiler.__exit__(type(error), error, error.__traceback__)
        profile = profiler.profile
        profile.meta["integration"] = {
            "framework": self.framework,
            "steps": sorted(self.chosen),
            "first_step": self._first,
        }
        self.profile = profile

    def write(self, directory: str | os.PathLike[str]) -> dict[str, Path]:
        """Write the profile (and its report) into ``directory`` under a name no file has."""
        profile = self.profile
        if profile is None:
            return {}
        steps = sorted(self.chosen)
        span = f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
        paths = free_path(Path(directory), f"{self.name}_steps{span}",
                          (".json", ".html") if self.html else (".json",))
        advice = None
        if self.advise and profile.peak_info is not None:
            try:
                from memprof.advisor.capture import predict

                advice = predict(profile, self._capture, budget=None)
                self._capture = None  # its fake copies are no longer needed
                from memprof.jsonable import to_jsonable

                profile.advice = to_jsonable(advice)
            except Exception as exc:  # advice is a bonus: never lose the profile over it
                self.notes.append(f"advice skipped: {type(exc).__name__}: {exc}")
        profile.save(paths[".json"])
        self.paths = {".json": paths[".json"]}
        if ".html" in paths:
            try:
                profile.report(paths[".html"], advice=advice)
                self.paths[".html"] = paths[".html"]
            except Exception as exc:
                self.notes.append(f"HTML report not written: {type(exc).__name__}: {exc}")
        return dict(self.paths)
