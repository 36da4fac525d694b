"""Which steps to profile, in the style of ``torch.profiler.schedule``."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class StepAction(Enum):
    """What the profiler does during a step."""

    SKIP = "skip"  #: nothing is tracked: the step runs at full speed
    WARMUP = "warmup"  #: tracked so roles are learned, but not reported
    ACTIVE = "active"  #: tracked and reported


@dataclass(frozen=True)
class Schedule:
    """Cycles of ``wait`` skipped, ``warmup`` and ``active`` steps after ``skip_first`` steps.

    ``repeat=0`` repeats the cycle until the profile ends. Example: ``schedule(wait=1,
    warmup=1, active=2)`` skips step 0, warms up on step 1 and reports steps 2 and 3, 6 and 7, ...
    """

    wait: int = 0
    warmup: int = 0
    active: int = 1
    repeat: int = 0
    skip_first: int = 0

    def __post_init__(self) -> None:
        if min(self.wait, self.warmup, self.repeat, self.skip_first) < 0 or self.active < 1:
            raise ValueError(
                "schedule needs active >= 1 and non-negative wait, warmup, repeat, skip_first"
            )

    def __call__(self, step: int) -> StepAction:
        if step < self.skip_first:
            return StepAction.SKIP
        step -= self.skip_first
        cycle = self.wait + self.warmup + self.active
        if self.repeat and step >= cycle * self.repeat:
            return StepAction.SKIP
        pos = step % cycle
        if pos < self.wait:
            return StepAction.SKIP
        if pos < self.wait + self.warmup:
            return StepAction.WARMUP
        return StepAction.ACTIVE


def schedule(
    *, wait: int = 0, warmup: int = 0, active: int = 1, repeat: int = 0, skip_first: int = 0
) -> Schedule:
    """Build a :class:`Schedule` (keyword arguments as in ``torch.profiler.schedule``)."""
    return Schedule(wait=wait, warmup=warmup, active=active, repeat=repeat, skip_first=skip_first)


def every_step(step: int) -> StepAction:
    """The default schedule: every step is profiled."""
    return StepAction.ACTIVE
