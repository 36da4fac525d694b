"""Activation checkpointing of repeated blocks, chosen by activation saved per recompute cost.

Blocks are the children of the model's largest ``nn.ModuleList``/``nn.Sequential`` (the
transformer layers, the MLP's stages). Checkpointing a block drops the activations it saved
(``activation_total``) but keeps its input, and re-runs its forward in backward, when its
activations live again (as temporaries) together with the block's backward temporaries: the
baseline's own samples inside that block's backward, with the blocks before it reduced to what
checkpointing leaves of them. A block's input is estimated as the activation of its first child
when that child is a norm layer (which saves its input), else the output saved by the previous
block's last saving child (0 for the first block: its input is the batch or an embedding).

Where the profile charged that input matters. An activation is charged to the first module
that saved it: a block whose first layer saved something (a norm, a Linear) owns its input, and
checkpointing it frees ``activation_total`` less the input. A block whose first layer saved
nothing (a convolution after the previous block's ReLU, which saved its output) finds its input
charged to the previous block; checkpointing that previous block does not free it, because this
block keeps it (as its checkpoint input, or saved by its convolution). Forgetting this
under-predicted the CNN's peak by one block input (16%).

A transformers key/value cache is not passed to checkpointed blocks (see :func:`wrap`). In a
profile taken with the cache on, a block's attention saved the cache's copies of its keys and
values; recomputed without the cache it saves views of its own projection instead, so the
prediction over-counts the recomputed block by those copies (GPT-2 test config: 3.9% over).

Recompute cost is the block's measured forward time.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memprof.advisor.core import (
    NORM_TYPES,
    TRAINING_ONLY_REASON,
    Change,
    Facts,
    ModuleNames,
    Sample,
    Transform,
    not_applicable,
)
from memprof.advisor.workload import SimState


def find_blocks(facts: Facts) -> list[dict[str, Any]]:
    """Rows of the repeated blocks, in forward order (empty when there is no container).

    Blocks are the children of the ``ModuleList``/``Sequential`` whose children save the most
    activation. Containers of subtrees (transformer layers, residual blocks) come before
    containers of single layers (a ResNet stem's conv, norm and ReLU): a lone layer is worth
    recomputing only in a model made of nothing else (an MLP of Linear and ReLU)."""
    rows = facts.module_rows()
    parents = {r["parent"] for r in rows}
    containers = [r for r in rows if r["type"] in ("ModuleList", "Sequential")]
    best: list[dict[str, Any]] = []
    best_key = (False, 0.0)
    for c in containers:
        children = [r for r in rows if r["parent"] == c["module"]]
        heavy = [r for r in children if r["activation_total"] > 0 and not _is_norm(r)]
        if len(heavy) < 2:
            continue
        subtrees = any(r["module"] in parents for r in heavy)
        key = (subtrees, float(sum(r["activation_total"] for r in heavy)))
        if key > best_key:
            best, best_key = children, key
    return best


def _is_norm(row: dict[str, Any]) -> bool:
    """A normalisation layer alone: recomputing it frees nothing worth its input."""
    return str(row["type"]) in NORM_TYPES or "Norm" in str(row["type"])


def _first_layer(rows: list[dict[str, Any]], block: dict[str, Any]) -> dict[str, Any]:
    """The block's first child (the block itself when it is a leaf)."""
    children = [r for r in rows if r["parent"] == block["module"]]
    return children[0] if children else block


def _input_charged_to_previous(
    rows: list[dict[str, Any]], blocks: list[dict[str, Any]], i: int
) -> bool:
    """Whether block ``i``'s input is charged, in the profile, to the previous block.

    An activation is charged to the first module that saved it. When the block's first layer
    saved something of its own (a norm or a Linear saving its input) the input is the block's
    own. When the block saves activations but its first layer has none (a convolution whose
    input a ReLU already saved as its output), the input was charged to the previous block,
    whose last saving layer saved it: it stays live when the previous block is checkpointed,
    since this block still needs it (it keeps it as its checkpoint input, or saves it)."""
    block = blocks[i]
    return i > 0 and block["activation_total"] > 0 and _first_layer(rows, block)["activation"] == 0


def _kept_input(rows: list[dict[str, Any]], blocks: list[dict[str, Any]], i: int) -> float:
    block = blocks[i]
    children = [r for r in rows if r["parent"] == block["module"]]
    if children and children[0]["type"] in NORM_TYPES:
        return float(children[0]["activation"])
    if i == 0:
        return 0.0
    prev = blocks[i - 1]
    inner = [r for r in rows if r["parent"] == prev["module"] and r["activation_total"] > 0]
    if inner:
        return float(inner[-1]["activation_total"])
    return float(prev["activation"])


def plan(facts: Facts, fraction: float) -> tuple[list[str], float, float, float]:
    names, dropped, kept, recompute, _ = plan_blocks(facts, fraction)
    return names, dropped, kept, recompute


def plan_blocks(
    facts: Facts, fraction: float
) -> tuple[list[str], float, float, float, list[tuple[str, float]]]:
    """The blocks to checkpoint (best bytes per second of recompute first), the activation
    bytes dropped, the inputs kept and the largest recompute."""
    blocks = find_blocks(facts)
    rows = facts.module_rows()
    kept_in = [_kept_input(rows, blocks, i) for i in range(len(blocks))]
    to_previous = [_input_charged_to_previous(rows, blocks, i) for i in range(len(blocks))]
    scored = []
    for i, b in enumerate(blocks):
        if b["activation_total"] <= 0 or _is_norm(b):
            continue
        # what stays live of the block's activations: its input when charged to it, and its
        # output when that is the next block's input charged to this block
        stays = (0.0 if to_previous[i] else kept_in[i]) + (
            kept_in[i + 1] if i + 1 < len(blocks) and to_previous[i + 1] else 0.0
        )
        saved = b["activation_total"] - stays
        cost = max(float(b["forward_time_s"]), 1e-9)
        if saved > 0:
            total = float(b["activation_total"])
            scored.append((saved / cost, b["module"], total, kept_in[i], saved))
    scored.sort(reverse=True)
    count = max(1, round(len(scored) * fraction)) if scored else 0
    chosen = scored[:count]
    dropped = sum(c[2] for c in chosen)
    kept = sum(c[3] for c in chosen)
    recompute = max((c[2] for c in chosen), default=0.0)
    freed = {c[1]: c[4] for c in chosen}
    # every block in forward order with the bytes checkpointing it frees (0 if not chosen)
    order = [(b["module"], freed.get(b["module"], 0.0)) for b in blocks]
    return [c[1] for c in chosen], dropped, kept, recompute, order


def transform_for(facts: Facts, order: list[tuple[str, float]]) -> Transform:
    """Per sample, by where it was taken: inside block i (forward or backward) the blocks
    before i hold only what checkpointing leaves of them (their kept inputs, and their outputs
    still needed by the next block), block i holds all it saves (in backward it has just been
    recomputed, and the baseline's sample there has its backward temporaries beside its
    activations); after the blocks (the head, the loss, the start of backward) all
    checkpointed blocks hold only what they leave; before them, nothing changes."""
    rows = facts.module_rows()
    position = {r["module"]: i for i, r in enumerate(rows)}
    names = [name for name, _ in order]
    first = min((position.get(n, 0) for n in names), default=0)
    freed_before = []
    total = 0.0
    for _, freed in order:
        freed_before.append(total)
        total += freed

    def transform(s: Sample) -> Sample:
        out = dict(s)
        module = str(s.get("module", ""))
        subtract = total
        for i, name in enumerate(names):
            if module == name or module.startswith(name + "."):
                subtract = freed_before[i]
                break
        else:
            ancestor = any(n.startswith(module + ".") for n in names)
            if module and not ancestor and module in position and position[module] < first:
                subtract = 0.0
        out["activation"] = max(0.0, s["activation"] - subtract)
        return out

    return transform


def _apply(names: list[str]) -> Any:
    def apply(state: SimState) -> None:
        modules = ModuleNames(state.model)
        for name in names:
            wrap(modules[name])

    return apply


def wrap(module: nn.Module) -> None:
    """Make ``module`` run under ``torch.utils.checkpoint`` (non-reentrant).

    A Hugging Face key/value cache passed to the block is dropped, as transformers' own
    gradient checkpointing does (``use_cache=True`` "is incompatible with gradient
    checkpointing"): the recompute in backward would run the cache update a second time,
    concatenating a second copy of the block's keys and values into the cache, and the cache,
    held by every checkpoint's saved arguments, would keep those copies and the blocks' kept
    inputs alive to the end of backward (measured on GPT-2: +1 MiB, 13% of the peak)."""
    forward = module.forward
    keeps_cache = bool(getattr(module, "_can_checkpoint_with_cache", False))
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if not keeps_cache:
            args = tuple(None if _is_kv_cache(a) else a for a in args)
            kwargs = {k: None if _is_kv_cache(v) else v for k, v in kwargs.items()}
        fn = forward
        if norms:
            calls = [0]

            def run(*a: Any, **k: Any) -> Any:
                calls[0] += 1
                if calls[0] == 1:  # the step's own forward updates the running statistics
                    return forward(*a, **k)
                with running_stats_kept(norms):  # the recompute in backward must not
                    return forward(*a, **k)

            fn = run
        if _fake_cpu_run():
            fn = _holding_rng_stand_ins(fn)
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed


def _fake_cpu_run() -> bool:
    """Whether a fake run of a CPU step is profiling (it charges the CPU's hidden bytes)."""
    from memprof.tracking.session import Profiler

    active = Profiler._active
    return active is not None and getattr(active, "_corrections", None) is not None


def _holding_rng_stand_ins(fn: Any) -> Any:
    """``fn``, holding fake stand-ins of the CPU RNG states a checkpoint keeps, for a fake run.

    ``checkpoint`` stashes ``torch.get_rng_state()`` (5,056 B on the CPU) when a block runs
    forward, held by the checkpoint's recompute function until autograd drops the block's
    saved tensors, and its recompute forks the RNG (a second copy while the block reruns). The
    real states are made outside the dispatcher, so a fake run never sees them; on a CPU they
    are device memory (ResNet-BN's one checkpointed block: +0.7% measured, predicted 0). On a
    GPU they are host memory, and the fake run of a CUDA step leaves them out."""
    size = torch.get_rng_state().numel()
    stash = torch.empty(size, dtype=torch.uint8)  # fake: the ledger charges it
    calls = [0]

    def run(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            return fn(*a, **k)
        forked = torch.empty_like(stash)  # fork_rng's copy, while the block is recomputed
        try:
            return fn(*a, **k)
        finally:
            del forked

    run.stash = stash  # type: ignore[attr-defined]  # lives as long as the checkpoint's frame
    return run


@contextlib.contextmanager
def running_stats_kept(norms: Sequence[nn.Module]) -> Iterator[None]:
    """Restore the BatchNorms' running statistics (and batch counts) on exit: a training-mode
    BatchNorm recomputed by checkpointing would otherwise update them twice per step."""
    saved = [
        [(b, b.clone()) for b in (getattr(m, n, None) for n in _STATS) if b is not None]
        for m in norms
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for pairs in saved:
                for live, kept in pairs:
                    live.copy_(kept)


_STATS = ("running_mean", "running_var", "num_batches_tracked")


def rows_of(facts: Facts, names: list[str]) -> list[dict[str, Any]]:
    """The rows of the modules in ``names`` and of everything inside them."""
    return [r for r in facts.module_rows()
            if any(r["module"] == n or r["module"].startswith(n + ".") for n in names)]


def _has_batchnorm(rows: list[dict[str, Any]]) -> bool:
    return any(str(r["type"]).startswith("BatchNorm") or "BatchNorm" in str(r["type"])
               for r in rows)


def _is_kv_cache(value: Any) -> bool:
    """Whether ``value`` is a transformers ``Cache`` (without importing transformers)."""
    cache_utils = sys.modules.get("transformers.cache_utils")
    cache = getattr(cache_utils, "Cache", None)
    return isinstance(cache, type) and isinstance(value, cache)


def predict(facts: Facts) -> list[Change]:
    if not facts.has_optimizer:
        return [not_applicable("checkpointing", {}, TRAINING_ONLY_REASON, group="checkpointing")]
    blocks = find_blocks(facts)
    if not blocks:
        return [
            not_applicable(
                "checkpointing",
                {},
                "no repeated blocks (ModuleList/Sequential "
                "children holding activations) to checkpoint",
                group="checkpointing",
            )
        ]
    out = []
    seen: set[frozenset[str]] = set()
    for fraction in (1.0, 0.5):
        names, dropped, kept, recompute, order = plan_blocks(facts, fraction)
        if not names or frozenset(names) in seen:  # one row per set of checkpointed blocks
            continue
        seen.add(frozenset(names))
        label = f"{len(names)} of {len(blocks)} blocks"
        out.append(
            Change(
                "checkpointing",
                {"blocks": label, "modules": names},
                f"{dropped:.0f} B of block activations dropped, {kept:.0f} B of block inputs kept, "
                f"{sum(f for _, f in order):.0f} B freed (a block's output that the next block "
                "needs stays); each timeline sample loses what the checkpointed blocks before it "
                "no longer hold "
                f"(in backward a block's {recompute:.0f} B at most live again while recomputed)",
                transform=transform_for(facts, order),
                apply=_apply(names),
                caveats=[
                    "recomputes those blocks' forward in backward (about +1/3 step time for "
                    "all blocks)",
                    "a transformers key/value cache is not passed to checkpointed blocks (as "
                    "with model.gradient_checkpointing_enable()): the recompute would append "
                    "their keys and values to it a second time",
                ]
                + (["training-mode BatchNorm inside: its running statistics are restored "
                    "after the recompute, so they are updated once per step as without "
                    "checkpointing"] if _has_batchnorm(rows_of(facts, names)) else []),
                quality_cost=0.0,
                speed_cost=0.33 * fraction,
                training_only=True,
                group="checkpointing",
            )
        )
    return out
