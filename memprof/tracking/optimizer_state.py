"""Optimizer accounting: the persistent state tensors of each step and a summary per
optimizer (class, hyperparameters, parameters, state bytes) for the profile."""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from memprof.tracking.ledger import OUTSIDE, StorageLedger, charged_bytes, facts_of


class OptimizerStates:
    """What the profiler knows of the optimizers it saw step."""

    def __init__(self) -> None:
        self._summaries: dict[int, dict[str, Any]] = {}
        self._state_facts: dict[int, dict[int, tuple[Any, int, tuple[Any, int], int, int]]] = {}
        self._owners_version: dict[int, int] = {}  # per optimizer, as of its last collect
        self._wrappers: set[int] = set()  # optimizers that step another inside their step
        self._wrapper_names: dict[int, str] = {}  # per inner optimizer, its wrapper's class

    def wrapped_by(self, inner: torch.optim.Optimizer, outer: torch.optim.Optimizer) -> None:
        """``inner`` stepped inside ``outer``'s step (ZeRO-1's ZeroRedundancyOptimizer and the
        optimizer it holds): one optimizer, listed once, as ``inner`` (its class, the state)
        with ``wrapped_by``; they were listed twice, the wrapper with no state."""
        self._wrappers.add(id(outer))
        self._wrapper_names[id(inner)] = type(outer).__name__

    def summaries(self) -> list[dict[str, Any]]:
        """One summary per optimizer, in the order they first stepped."""
        return [{**s, "wrapped_by": self._wrapper_names[key]} if key in self._wrapper_names
                else s for key, s in self._summaries.items() if key not in self._wrappers]

    def collect(self, optimizer: torch.optim.Optimizer, ledger: StorageLedger,
                owner: Mapping[Any, int], round_to: int,
                owners_version: int | None = None) -> list[tuple[Any, int]]:
        """The optimizer's persistent state tensors with their owning modules (live part). Under
        the events backend, only those it did not give at an earlier step: a state tensor that
        is still the same object at the same address, with the same owner, is still tracked in
        that role (its storage lives, and nothing else reclassifies optimizer state), so its
        replay would change nothing (one ledger lookup per state tensor per step, saved).
        While ``owners_version`` (the version of ``owner``) stays the same, the owners are
        not looked up again for the state tensors found unchanged."""
        state: list[tuple[Any, int]] = []
        state_bytes = 0
        round_to = max(round_to, 1)
        # Events backend: the facts of a state tensor that is still the same object at the same
        # address are the same as last step's. The cache holds the tensors weakly and only
        # those seen this time.
        cache = self._state_facts.get(id(optimizer), {}) if ledger.by_ptr else None
        seen: dict[int, tuple[Any, int, tuple[Any, int], int, int]] = {}
        same_owners = (cache is not None and owners_version is not None
                       and self._owners_version.get(id(optimizer)) == owners_version)
        for param, values in optimizer.state.items():
            module = None if same_owners else owner.get(param, OUTSIDE)
            for value in values.values():
                if not isinstance(value, torch.Tensor):
                    continue
                for part in ledger.parts(value):  # one, unless the state is sparse
                    if cache is not None:
                        ptr = part.data_ptr()
                        hit = cache.get(id(part))
                        if (hit is not None and hit[0]() is part and hit[1] == ptr
                                and hit[4] == id(param)
                                and (module is None or hit[2][1] == module)):
                            seen[id(part)] = hit
                            state_bytes += hit[3]
                            continue
                    if module is None:
                        module = owner.get(param, OUTSIDE)
                    item = (facts_of(part) if ledger.by_ptr else part, module)
                    state.append(item)
                    raw = charged_bytes(part.untyped_storage().nbytes(), part, round_to)
                    state_bytes += raw
                    if cache is not None:
                        seen[id(part)] = (weakref.ref(part), ptr, item, raw, id(param))
        if cache is not None:
            self._state_facts[id(optimizer)] = seen
            if owners_version is not None:
                self._owners_version[id(optimizer)] = owners_version
        summary = self._summaries.get(id(optimizer))
        if summary is None:  # once per optimizer: this runs on every step
            params = [p for group in optimizer.param_groups for p in group["params"]]
            summary = self._summaries[id(optimizer)] = {
                "class": type(optimizer).__name__,
                "defaults": json_safe(hyperparameters(optimizer)),
                "num_parameters": int(sum(p.numel() for p in params)),
                "parameter_bytes": int(sum(part.untyped_storage().nbytes()
                                           for p in params for part in ledger.parts(p))),
                # Per trained tensor: what optimizers with shape-dependent state (Adafactor's
                # factored moments) or per-tensor scratch need to be predicted.
                "parameter_shapes": [[int(d) for d in p.shape] for p in params],
                "parameter_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in params}),
                # Trained tensors whose gradient is sparse (nn.Embedding(sparse=True)): FSDP
                # and most optimizers have no kernel for them.
                "sparse_gradients": sum(1 for p in params
                                        if p.grad is not None
                                        and p.grad.layout is not torch.strided),
            }
        summary["state_bytes"] = state_bytes
        return state


def hyperparameters(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What runs: the first param group's hyperparameters over the optimizer's defaults
    (a group can differ from them: ``foreach``, ``lr``, ...)."""
    first = optimizer.param_groups[0] if optimizer.param_groups else {}
    return {**optimizer.defaults, **{k: v for k, v in first.items() if k != "params"}}


def json_safe(values: dict[str, Any]) -> dict[str, Any]:
    safe: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, bool | int | str) or value is None:
            safe[key] = value
        elif isinstance(value, float):
            safe[key] = value if math.isfinite(value) else str(value)
        elif isinstance(value, tuple | list) and all(isinstance(v, int | float) for v in value):
            safe[key] = list(value)
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            safe[key] = value.item()
        else:
            safe[key] = repr(value)
    return safe
