"""Allocator options: ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (or back).

No tensor changes size, so the step's allocated peak stays; what changes is the memory the
caching allocator reserves around it, which is what fills the GPU. The profile's allocator
replay (:mod:`memprof.tracking.reserved`) ran the run's allocations through the allocator model
with the run's options and, alongside, with ``expandable_segments`` the other way: the row's
saving is the difference of their reserved peaks. It changes no maths, and the row says why it
is not simulated (:data:`NOT_SIMULATED`).
"""

from __future__ import annotations

from memprof.advisor.core import Change, Facts, not_applicable
from memprof.units import format_bytes

GROUP = "allocator"
TECHNIQUE = "allocator"
#: Why the row has no measurement, on a CPU run as on a fake one.
NOT_SIMULATED = (
    "not simulated: the option acts on the CUDA caching allocator's segments, which a CPU or "
    "fake-tensor run does not have (the allocations do not change: the replay of this run's "
    "allocations through the allocator model is the prediction)"
)


def predict(facts: Facts) -> list[Change]:
    allocator = facts.profile.allocator_summary()
    if allocator is None or not allocator.what_if:
        return [
            not_applicable(
                TECHNIQUE,
                {},
                "the profile has no caching-allocator replay (recorded by an older "
                "memprof or with model_reserved=False)",
                group=GROUP,
            )
        ]
    base = allocator.replay
    changes = []
    for conf, other in allocator.what_if.items():
        before = base.reserved_peak_bytes
        after = other.reserved_peak_bytes
        how = (
            f"replay of the run's allocations through the caching allocator: reserved peak "
            f"{format_bytes(before)} with {allocator.conf or 'the default options'}, "
            f"{format_bytes(after)} with {conf} ({len(base.segments)} -> "
            f"{len(other.segments)} segments)"
        )
        changes.append(
            Change(
                TECHNIQUE,
                {"PYTORCH_CUDA_ALLOC_CONF": conf},
                how,
                predicted_peak=facts.peak_bytes,  # the tensors stay as they are
                reserved={"baseline": before, "predicted": after},
                caveats=[
                    "saves reserved memory (what nvidia-smi and an out-of-memory error count), "
                    "not allocated; set it before CUDA is first used",
                ],
                group=GROUP,
                not_simulated=NOT_SIMULATED,
            )
        )
    return changes
