"""Reserved memory during a profile: the run's allocations replayed through the caching
allocator's model as they happen (see :mod:`memprof.allocator`).

The ledger hands every tracked storage's allocation and free, in order, to one
:class:`ReservedModel`. It replays them with the allocator options the run uses
(``PYTORCH_CUDA_ALLOC_CONF`` unless told otherwise) and, alongside, with
``expandable_segments`` switched the other way, so that the advisor can say what that option
would change without the run's events being kept. On a CPU or under fake tensors the figures
are what the CUDA allocator would reserve for the same requests.
"""

from __future__ import annotations

from typing import Any

from memprof.allocator import (
    NOT_MODELLED,
    AllocatorConf,
    AllocatorSummary,
    CachingAllocatorModel,
    Replay,
    conf_from_environment,
    parse_conf,
)
from memprof.errors import AllocatorConfError
from memprof.tracking import native

#: What the replay of a profile leaves out, beyond the allocator model's own limits.
PROFILE_NOT_MODELLED = [
    "memory allocated before profiling started is replayed as allocated when first seen",
    "kernel workspaces the allocator serves but no operator returns are seen only by the "
    "events backend",
]


class _ShadowedModel(CachingAllocatorModel):
    """The run's allocator model, handing each request to a second model too. The second one
    (the what-if) is read only for the profile's summary: its requests wait in a flat list and
    run in batches, off the replay's path."""

    def __init__(self, conf: AllocatorConf, shadow: CachingAllocatorModel) -> None:
        super().__init__(conf)
        self.shadow = shadow
        #: Requests for the shadow, two ints each: (key, bytes) a malloc, (key, FREE) a free,
        #: (bytes, MALLOC_FREE) a malloc_free.
        self.waiting: list[int] = []

    def malloc(self, key: int, nbytes: int) -> None:
        super().malloc(key, nbytes)
        waiting = self.waiting
        waiting.append(key)
        waiting.append(nbytes)
        if len(waiting) > SHADOW_BATCH:
            self.settle()

    def free(self, key: int) -> None:
        if key in self.live:  # (the shadow has the same keys live: it ignores the others too)
            super().free(key)
            self.waiting.append(key)
            self.waiting.append(_FREE)

    def malloc_free(self, nbytes: int) -> None:
        super().malloc_free(nbytes)
        self.waiting.append(nbytes)
        self.waiting.append(_MALLOC_FREE)

    def settle(self) -> CachingAllocatorModel:
        """Run the waiting requests through the shadow; returns it."""
        waiting, self.waiting = self.waiting, []
        shadow = self.shadow
        malloc, free, malloc_free = shadow.malloc, shadow.free, shadow.malloc_free
        it = iter(waiting)
        for first, second in zip(it, it, strict=True):
            if second >= 0:
                malloc(first, second)
            elif second == _FREE:
                free(first)
            else:
                malloc_free(first)
        return shadow


#: Requests the shadow model lets wait (two ints each) before it runs them.
SHADOW_BATCH = 1 << 17
_FREE, _MALLOC_FREE = -1, -2


class NativeModel:
    """The same model in C++ (``allocator_model.cpp``, built with memprof's recorder), for a
    device without a capacity: the figures of :class:`CachingAllocatorModel`, request by
    request, at a fraction of its cost. With a ``shadow`` every request goes to it too."""

    def __init__(self, module: Any, conf: AllocatorConf, shadow: NativeModel | None = None):
        self.conf = conf
        self.core = module.AllocatorModel(
            conf.expandable_segments,
            conf.max_split_size,
            conf.max_non_split_rounding,
            list(conf.roundup_power2_divisions),
        )
        self.shadow = shadow
        if shadow is not None:
            self.core.set_shadow(shadow.core)
        # The hot path calls the C++ methods directly; ``key in model.live`` asks the core.
        self.malloc = self.core.malloc
        self.free = self.core.free
        self.malloc_free = self.core.malloc_free
        self.live = self.core

    @property
    def reserved(self) -> int:
        return int(self.core.reserved)

    @property
    def allocated(self) -> int:
        return int(self.core.allocated)

    def settle(self) -> NativeModel:
        """The what-if model (it has seen every request already)."""
        assert self.shadow is not None
        return self.shadow

    def result(self) -> Replay:
        figures = self.core.figures()
        not_modelled = list(NOT_MODELLED)
        not_modelled += [f"option {name} (no effect on one stream)" for name in self.conf.ignored]
        return Replay(
            conf=self.conf.text,
            reserved_peak_bytes=figures["reserved_peak"],
            allocated_peak_bytes=figures["allocated_peak"],
            allocated_at_reserved_peak_bytes=figures["allocated_at_reserved_peak"],
            segments=figures["segments"],
            largest_free_block_bytes=figures["largest_free_at_peak"],
            reserved_end_bytes=figures["reserved"],
            allocated_end_bytes=figures["allocated"],
            events=figures["events"],
            segment_allocs=figures["segment_allocs"],
            cache_flushes=0,  # no capacity: the cache is never released
            not_modelled=not_modelled,
        )


#: Whether profiles use :class:`NativeModel` where the recorder module builds (tests compare).
USE_NATIVE = True


class ReservedModel:
    """The allocator models of one profile and their summary for :class:`Profile`."""

    def __init__(self, conf: AllocatorConf) -> None:
        flipped = "False" if conf.expandable_segments else "True"
        self.alternative = conf.with_options(f"expandable_segments:{flipped}")
        module = native.load() if USE_NATIVE else None
        self.model: _ShadowedModel | NativeModel
        if module is not None and hasattr(module, "AllocatorModel"):
            self.model = NativeModel(module, conf, NativeModel(module, self.alternative))
        else:
            self.model = _ShadowedModel(conf, CachingAllocatorModel(self.alternative))

    @classmethod
    def create(cls, conf: str | None) -> tuple[ReservedModel | None, str | None]:
        """A model for ``conf`` (None: this process's); with a malformed configuration, no
        model and the reason (the profile still runs: the option only matters on CUDA)."""
        text = conf_from_environment() if conf is None else conf
        try:
            return cls(parse_conf(text)), None
        except AllocatorConfError as exc:
            return None, f"reserved memory not modelled: {exc}"

    def summary(self) -> AllocatorSummary:
        """The replay's figures as the profile stores them."""
        main = self.model.result()
        other = self.model.settle().result()
        return AllocatorSummary(
            conf=self.model.conf.text,
            replay=main,
            what_if={self.alternative.text: other},
            not_modelled=[*NOT_MODELLED, *PROFILE_NOT_MODELLED],
        )
