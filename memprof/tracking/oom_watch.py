"""Where an out-of-memory error struck inside a profile, kept while the error propagates, and
its post-mortem (:mod:`memprof.oom`) once the profile is built."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memprof import oom as oom_report
from memprof.categories import CATEGORIES
from memprof.tracking.events import EventStream
from memprof.tracking.ledger import StorageLedger
from memprof.tracking.modules import ModuleRegistry

_graph_task_id = torch._C._current_graph_task_id


class OomWatch:
    """The innermost module an out-of-memory error left, and what was alive there.

    ``name`` gives a module index's name (:func:`memprof.tracking.records.module_name`)."""

    def __init__(self, ledger: StorageLedger, name: Callable[[int], str]) -> None:
        self._ledger = ledger
        self._name = name
        #: The id of the out-of-memory error seen while it propagated (not the error: its
        #: traceback holds tensors), and the (module, phase, live bytes by module) at its
        #: innermost point; see :mod:`memprof.oom`.
        self.seen: int | None = None
        self.where: tuple[str, str, dict[str, dict[str, int]]] | None = None

    def check(self, module: nn.Module, registry: ModuleRegistry,
              events: EventStream | None) -> None:
        """In a forward hook run while an exception propagates (``always_call``): if it is an
        out-of-memory error, this module is the innermost that asked."""
        exc = sys.exc_info()[1]
        if exc is None or id(exc) == self.seen or not oom_report.is_oom(exc):
            return  # no error, or the enclosing modules of the one that asked
        self.seen = id(exc)
        idx = registry.index.get(module)
        name = registry.infos[idx].name if idx is not None else ""
        phase = "backward" if _graph_task_id() != -1 else "forward"
        if events is None:
            self.snapshot(name, phase)
        else:  # what was alive is known once the events before this moment are replayed
            events.point(self.snapshot, name, phase)

    def snapshot(self, module: str, phase: str) -> None:
        """Keep what the ledger has alive now, by module and category."""
        by_module: dict[str, dict[str, int]] = {}
        for entry in self._ledger.entries.values():
            row = by_module.setdefault(self._name(entry.module), dict.fromkeys(CATEGORIES, 0))
            row[CATEGORIES[entry.category]] += entry.nbytes
        self.where = (module, phase, by_module)

    def build(self, error: BaseException, profile: Any, step: int) -> Any:
        """The post-mortem of ``error`` for ``profile`` (the Profile just built: typed as
        :func:`memprof.oom.with_plan` types it), or None with a warning in the profile."""
        assert self.where is not None and profile is not None
        module, phase, by_module = self.where
        try:
            report = oom_report.build_report(
                error=error, module=module, phase=phase, step=step,
                by_module=by_module, kind=profile.device.kind,
            )
            return oom_report.with_plan(profile, report)
        except Exception as exc:  # the post-mortem must never hide the script's own error
            profile.warnings.append(f"out-of-memory post-mortem failed: {exc}")
            return None
