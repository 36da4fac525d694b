"""What an estimate records of itself (``meta["estimate"]``, what was modelled rather than
measured) and whether its step fits a GPU (:func:`fit_verdict`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from memprof.devices import CUDA_BLOCK_BYTES
from memprof.estimate.catalog import ModelSpec
from memprof.estimate.options import EstimateOptions
from memprof.gpus import CUDA_CONTEXT_BYTES as GPU_CONTEXT_BYTES
from memprof.gpus import FRAGMENTATION_FRACTION, budget_of, replay_cached_bytes
from memprof.profile import Profile
from memprof.units import format_bytes

#: The CUDA context a process holds before its first tensor (driver state, kernels,
#: cuBLAS/cuDNN handles): memprof.gpus' figure, shared with the advisor's budgets. Modelled, not
#: measured: see ``meta["estimate"]``.
CUDA_CONTEXT_BYTES = GPU_CONTEXT_BYTES


def annotate(profile: Profile, *, spec: ModelSpec | None, options: EstimateOptions,
             kv_cache_bytes: int | None, num_params: int, param_bytes: int,
             budget: tuple[int, str] | None) -> Profile:
    """Record what was estimated and what was modelled; add the fit verdict for the options'
    ``gpu``."""
    device, mixed_precision, gpu = options.device, options.mixed_precision, options.gpu
    peak = profile.peak_info.total_bytes if profile.peak_info is not None else 0
    context = CUDA_CONTEXT_BYTES if device == "cuda" else 0
    modelled = list(profile.device.modelled)
    replayed = profile.allocator_summary()
    if device == "cuda":
        if not any("rounding" in m for m in modelled):
            modelled.append(f"allocator rounding to {CUDA_BLOCK_BYTES}-byte blocks")
        modelled.append(
            f"CUDA context reserve of {format_bytes(context)} (0.3-2 GiB in practice), added "
            "to device_total_bytes, not to the tensors")
        modelled.append("optimizer built with foreach=True, torch's default on CUDA")
        modelled.append("run on fake CPU tensors: CPU kernels choose the intermediates "
                        "(attention uses the CPU flash/sdpa kernel)")
        if replayed is not None:
            modelled.append(
                "reserved memory: the step's allocations replayed through a model of the CUDA "
                "caching allocator (memprof.allocator; one stream, options "
                f"{replayed.conf or 'default'}); the fit verdict counts it")
        else:
            modelled.append(
                "fragmentation of the caching allocator is not in the tensor figures; a fit "
                f"verdict keeps {FRAGMENTATION_FRACTION:.0%} of the memory left after the "
                "context for it")
    if mixed_precision:
        modelled.append(f"mixed precision through CPU autocast to {mixed_precision}")
    profile.device = dataclasses.replace(profile.device, modelled=modelled)
    info: dict[str, Any] = {
        "model": spec.name if spec is not None else None,
        "description": spec.description if spec is not None else None,
        "mode": "inference" if options.inference else "training",
        "optimizer": options.step_optimizer,
        "dtype": "fp32" if mixed_precision else options.dtype,
        "mixed_precision": mixed_precision,
        "device": device,
        "steps": options.steps,
        "context_len": options.context_len,
        "kv_cache_bytes": kv_cache_bytes,
        "num_parameters": num_params,
        "parameter_bytes": param_bytes,
        "peak_bytes": peak,
        "cuda_context_bytes": context,
        "device_total_bytes": peak + context,
        "modelled": modelled,
    }
    cached = replay_cached_bytes(replayed)
    if cached is not None and replayed is not None:
        replay = replayed.replay
        info["reserved_bytes"] = replay.reserved_peak_bytes
        info["fragmentation_bytes"] = replay.fragmentation_bytes
        info["largest_free_block_bytes"] = replay.largest_free_block_bytes
        if device == "cuda":
            info["device_total_bytes"] = replay.reserved_peak_bytes + context
    if gpu is not None and budget is not None:
        info["fit"] = fit_verdict(peak, gpu, budget=budget, cached_bytes=cached)
    profile.meta["estimate"] = info
    return profile


def gpu_budget(gpu: str) -> tuple[int, str]:
    """The memory of ``gpu``: a name, or a size, as :func:`memprof.gpus.resolve_budget` reads.

    Raises :class:`~memprof.errors.UnknownGPUError` for a name the catalog lacks and
    :class:`~memprof.errors.BudgetError` for text that is neither.
    """
    from memprof.gpus import resolve_budget

    budget, description = resolve_budget(gpu)
    return int(budget), str(description)


def fit_verdict(tensor_bytes: int, gpu: str, *, budget: tuple[int, str] | None = None,
                cached_bytes: int | None = None) -> dict[str, Any]:
    """Whether a step whose tensors peak at ``tensor_bytes`` fits ``gpu``.

    ``usable_bytes`` comes from :func:`memprof.gpus.budget_of`, the one budget function the
    advisor's plan uses too: the device's memory (as its driver reports it) less the CUDA
    context and the allocator's reserve: with ``cached_bytes`` (reserved minus allocated in
    the allocator replay) that replay's, else a fixed share. ``needed_bytes`` is the tensors
    plus that reserve plus the context, ``headroom_bytes`` what is left of ``usable_bytes``.
    ``budget`` (total bytes and label, from :func:`gpu_budget`) is only a name check already
    made; the figures are budget_of's.
    """
    del budget
    b = budget_of(gpu, cached_bytes=cached_bytes)
    return {
        "gpu": gpu,
        "budget_bytes": b.total_bytes,
        "budget": b.label,
        "usable_bytes": b.usable_bytes,
        "usable": b.describe(),
        "needed_bytes": tensor_bytes + (cached_bytes or 0) + CUDA_CONTEXT_BYTES,
        "reserve": "allocator replay" if cached_bytes is not None
        else f"{FRAGMENTATION_FRACTION:.0%} fragmentation share",
        "fits": tensor_bytes <= b.usable_bytes,
        "headroom_bytes": b.usable_bytes - tensor_bytes,
    }
