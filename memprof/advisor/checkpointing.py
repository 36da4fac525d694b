"""Activation checkpointing of repeated blocks, chosen by activation saved per recompute cost.

Blocks are the children of the model's largest ``nn.ModuleList``/``nn.Sequential`` (the
transformer layers, the MLP's stages). Checkpointing a block drops the activations it saved
(``activation_total``) but keeps its input, and re-runs its forward in backward, when its
activations live again for a moment: the peak grows by the largest checkpointed block's
activations during backward. A block's input is estimated as the activation of its first child
when that child is a norm layer (which saves its input), else the output saved by the previous
block's last saving child (0 for the first block: its input is the batch or an embedding).
Recompute cost is the block's measured forward time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memprof.advisor.core import (
    NORM_TYPES,
    TRAINING_ONLY_REASON,
    Change,
    Facts,
    Sample,
    Transform,
    not_applicable,
)
from memprof.advisor.workload import SimState


def find_blocks(facts: Facts) -> list[dict[str, Any]]:
    """Rows of the repeated blocks, in forward order (empty when there is no container)."""
    rows = facts.module_rows()
    containers = [r for r in rows if r["type"] in ("ModuleList", "Sequential")]
    best: list[dict[str, Any]] = []
    for c in containers:
        children = [r for r in rows if r["parent"] == c["module"]]
        heavy = [r for r in children if r["activation_total"] > 0]
        if len(heavy) >= 2 and sum(r["activation_total"] for r in heavy) > sum(
            r["activation_total"] for r in best
        ):
            best = children
    return best


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
    scored = []
    for i, b in enumerate(blocks):
        if b["activation_total"] <= 0:
            continue
        kept = _kept_input(rows, blocks, i)
        saved = b["activation_total"] - kept
        cost = max(float(b["forward_time_s"]), 1e-9)
        if saved > 0:
            scored.append((saved / cost, b["module"], float(b["activation_total"]), kept))
    scored.sort(reverse=True)
    count = max(1, round(len(scored) * fraction)) if scored else 0
    chosen = scored[:count]
    dropped = sum(c[2] for c in chosen)
    kept = sum(c[3] for c in chosen)
    recompute = max((c[2] for c in chosen), default=0.0)
    chosen_names = {c[1] for c in chosen}
    # every block in forward order with the bytes checkpointing it frees (0 if not chosen)
    order = [
        (b["module"], next((c[2] - c[3] for c in chosen if c[1] == b["module"]), 0.0))
        for b in blocks
    ]
    return [c[1] for c in chosen if c[1] in chosen_names], dropped, kept, recompute, order


def transform_for(facts: Facts, order: list[tuple[str, float]]) -> Transform:
    """Per sample, by where it was taken: inside block i (forward or backward) the blocks
    before i hold only their kept inputs, block i holds all it saves (in backward it has just
    been recomputed); after the blocks (the head, the loss, the start of backward) all
    checkpointed blocks hold only their inputs; before them, nothing changes."""
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
        modules = dict(state.model.named_modules())
        for name in names:
            wrap(modules[name])

    return apply


def wrap(module: nn.Module) -> None:
    """Make ``module`` run under ``torch.utils.checkpoint`` (non-reentrant)."""
    forward = module.forward

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed


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
    for fraction in (1.0, 0.5):
        names, dropped, kept, recompute, order = plan_blocks(facts, fraction)
        if not names:
            continue
        label = f"{len(names)} of {len(blocks)} blocks"
        out.append(
            Change(
                "checkpointing",
                {"blocks": label, "modules": names},
                f"{dropped:.0f} B of block activations dropped, {kept:.0f} B of block inputs kept; "
                "each timeline sample loses what the checkpointed blocks before it no longer hold "
                f"(in backward a block's {recompute:.0f} B at most live again while recomputed)",
                transform=transform_for(facts, order),
                apply=_apply(names),
                caveats=[
                    "recomputes those blocks' forward in backward (about +1/3 step time for "
                    "all blocks)"
                ],
                quality_cost=0.0,
                speed_cost=0.33 * fraction,
                training_only=True,
                group="checkpointing",
            )
        )
    return out
