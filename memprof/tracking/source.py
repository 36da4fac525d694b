"""Where in the user's code a storage was made: ``file:line in function``, captured cheaply.

Walking the Python stack costs a few microseconds, far too much for every allocation. It is
done only for storages that can still be among the largest at a peak: those larger than the
smallest of the ``keep`` largest seen so far (a min-heap of sizes), or larger than a fixed
threshold the user sets. The first frames outside torch and memprof are the user's (a model
library such as transformers counts as user code: its line is where the tensor is made).

Backward has no user frame (the engine runs it, on CUDA in a thread of its own), so a backward
temporary is given the line of the forward op whose autograd node made it: the pack hook, which
takes the line of a large saved tensor anyway, notes it under the saving node's sequence number
(``_get_sequence_nr() - 1`` there: the node is made just before it saves), and the node running
in backward carries that number (``_current_autograd_node()`` for the dispatch backend, the
recorder's or the profiler's node events for the events backend). Only ints and strings are
kept, for two steps (:meth:`~memprof.tracking.ledger.StorageLedger.rotate_node_sources`).
"""

from __future__ import annotations

import heapq
import os
import sys

import torch

_SKIP = (os.path.dirname(torch.__file__) + os.sep,
         os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)


#: Per file name: whether its frames are passed over (torch's, memprof's, ``<string>``'s).
_PASSED: dict[str, bool] = {}


def user_source(skip: int = 1) -> str:
    """``file:line in function`` of the innermost frame outside torch and memprof ("" if
    none: the allocation came from torch itself, say the autograd engine in backward)."""
    try:
        frame = sys._getframe(skip + 1)
    except ValueError:
        return ""
    passed = _PASSED
    while frame is not None:
        code = frame.f_code
        filename = code.co_filename
        skipped = passed.get(filename)
        if skipped is None:
            if len(passed) > 4096:  # (files made on the fly: keep the memo small)
                passed.clear()
            skipped = passed[filename] = filename.startswith(_SKIP) or filename.startswith("<")
        if not skipped:
            return f"{filename}:{frame.f_lineno} in {code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return ""


class SourceSampler:
    """Decides, in one comparison, whether an allocation's source line is worth capturing."""

    __slots__ = ("_heap", "floor", "keep", "threshold")

    def __init__(self, keep: int, threshold: int | None = None) -> None:
        self.keep = keep
        self.threshold = threshold
        self._heap: list[int] = []
        #: Allocations of at least this many bytes are captured (-1: all, until the heap fills).
        self.floor = -1 if keep > 0 else (threshold if threshold is not None else 1 << 62)

    def take(self, nbytes: int) -> str:
        """Call only when ``nbytes >= floor``: the source line, and the floor moved up."""
        self.admit(nbytes)
        return user_source(2)

    def admit(self, nbytes: int) -> None:
        """Move the floor up for a storage of ``nbytes`` whose line is known otherwise (a
        backward temporary: its node's forward line)."""
        heap = self._heap
        if self.keep > 0:
            if len(heap) < self.keep:
                heapq.heappush(heap, nbytes)
            elif nbytes > heap[0]:
                heapq.heapreplace(heap, nbytes)
            floor = heap[0] if len(heap) >= self.keep else -1
            if self.threshold is not None:
                floor = min(floor, self.threshold) if floor >= 0 else floor
            self.floor = floor
