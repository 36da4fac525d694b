"""Pruning, honestly.

* ``torch.nn.utils.prune`` (unstructured, magnitude) keeps ``weight_orig`` (the parameter),
  adds ``weight_mask`` (a buffer the size of the weight, same dtype) and recomputes ``weight``
  (a plain tensor the size of the weight) on every forward: +2 weights of memory per pruned
  layer until ``prune.remove``. After ``prune.remove`` the zeros are stored densely: 0 saved.
* Stored sparse (CSR: values + int64 column indices + int64 row pointers) a tensor saves only
  below a break-even density, computed per tensor: ``d* = (e*s - 8*(rows+1)) / (e*(s+8))`` for
  ``e`` elements of ``s`` bytes (about 33% density, 67% zeros, for fp32).
* Structured pruning removes hidden units of Linear -> activation -> Linear pairs inside an
  ``nn.Sequential``: both matrices really shrink, and so do the hidden activations.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from memprof.advisor.core import Change, Facts, Sample, Transform
from memprof.advisor.workload import SimState

ELEMENTWISE = frozenset({"ReLU", "GELU", "SiLU", "Tanh", "Dropout", "LeakyReLU", "Sigmoid"})


def csr_break_even_density(
    rows: int, cols: int, element_bytes: int = 4, index_bytes: int = 8
) -> float:
    """Density below which CSR storage is smaller than the dense tensor."""
    e = rows * cols
    return max(
        0.0, (e * element_bytes - index_bytes * (rows + 1)) / (e * (element_bytes + index_bytes))
    )


def _linear_rows(facts: Facts) -> list[dict[str, Any]]:
    return [
        r for r in facts.module_rows() if r["type"] in ("Linear", "Conv2d") and r["parameter"] > 0
    ]


def prune_transform(extra: float) -> Transform:
    def transform(s: Sample) -> Sample:
        out = dict(s)
        out["buffer"] = s["buffer"] + extra / 2  # the masks
        out["other"] = s["other"] + extra / 2  # the recomputed dense weights
        return out

    return transform


def _apply_prune(names: list[str], amount: float) -> Any:
    def apply(state: SimState) -> None:
        modules = dict(state.model.named_modules())
        for name in names:
            prune.l1_unstructured(modules[name], "weight", amount=amount)

    return apply


def _apply_prune_remove(names: list[str], amount: float) -> Any:
    def apply(state: SimState) -> None:
        _apply_prune(names, amount)(state)
        modules = dict(state.model.named_modules())
        for name in names:
            prune.remove(modules[name], "weight")

    return apply


def structured_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(first, second) Linear names inside a Sequential joined by elementwise modules only."""
    pairs: list[tuple[str, str]] = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        items = list(seq.named_children())
        for i, (name, mod) in enumerate(items):
            if not isinstance(mod, nn.Linear):
                continue
            for later_name, later in items[i + 1 :]:
                if isinstance(later, nn.Linear):
                    used = {n for pair in pairs for n in pair}
                    first = f"{prefix}.{name}".lstrip(".")
                    if later.in_features == mod.out_features and first not in used:
                        pairs.append(
                            (f"{prefix}.{name}".lstrip("."), f"{prefix}.{later_name}".lstrip("."))
                        )
                    break
                if type(later).__name__ not in ELEMENTWISE:
                    break
    return pairs


def _row_pairs(facts: Facts) -> list[tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]]:
    """The same pairs read from the profile's module table (types and order only)."""
    rows = facts.module_rows()
    out: list[tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]] = []
    for seq in (r for r in rows if r["type"] == "Sequential"):
        children = [r for r in rows if r["parent"] == seq["module"]]
        for i, r in enumerate(children):
            if r["type"] != "Linear":
                continue
            between: list[dict[str, Any]] = []
            for later in children[i + 1 :]:
                if later["type"] == "Linear":
                    if all(r is not o[1] for o in out):
                        out.append((r, later, between))
                    break
                if later["type"] not in ELEMENTWISE:
                    break
                between.append(later)
    return out


def structured_transform(facts: Facts, keep: float) -> Transform:
    removed_p = 0.0
    removed_act = 0.0
    narrowed: set[str] = set()  # modules whose work is as wide as the pruned hidden units
    for first, second, between in _row_pairs(facts):
        removed_p += (1 - keep) * (float(first["parameter"]) + float(second["parameter"]))
        removed_act += (1 - keep) * sum(float(b["activation"]) for b in between)
        narrowed.update(str(r["module"]) for r in (first, second, *between))
    p = float(facts.parameter_bytes) or 1.0
    frac = removed_p / p
    peak_act = max((s["activation"] for s in facts.samples), default=0.0)
    act_ratio = (peak_act - removed_act) / peak_act if peak_act else 1.0

    def transform(s: Sample) -> Sample:
        out = dict(s)
        for c in ("parameter", "gradient", "optimizer_state"):
            out[c] = s[c] * (1 - frac)
        out["activation"] = s["activation"] * act_ratio
        if s["phase"] == "optimizer":
            out["temporary"] = s["temporary"] * (1 - frac)
        elif s.get("module") in narrowed:
            # Inside a pruned pair, forward and backward scratch (the hidden activations'
            # gradients, the weight gradient being formed) is as wide as the hidden units.
            out["temporary"] = s["temporary"] * keep
        return out

    return transform


def _apply_structured(keep: float) -> Any:
    def apply(state: SimState) -> None:
        pairs = structured_pairs(state.model)
        modules = dict(state.model.named_modules())
        replaced: dict[int, nn.Parameter] = {}
        for a_name, b_name in pairs:
            a, b = modules[a_name], modules[b_name]
            n = a.out_features
            k = max(1, math.ceil(n * keep))
            score = a.weight.detach().abs().sum(dim=1) * b.weight.detach().abs().sum(dim=0)
            idx = score.topk(k).indices.sort().values
            na = nn.Linear(a.in_features, k, bias=a.bias is not None, dtype=a.weight.dtype)
            nb = nn.Linear(k, b.out_features, bias=b.bias is not None, dtype=b.weight.dtype)
            with torch.no_grad():
                na.weight.copy_(a.weight[idx])
                if a.bias is not None:
                    na.bias.copy_(a.bias[idx])
                nb.weight.copy_(b.weight[:, idx])
                if b.bias is not None:
                    nb.bias.copy_(b.bias)
            for old, new in ((a, na), (b, nb)):
                for pname in ("weight", "bias"):
                    if getattr(old, pname) is not None:
                        replaced[id(getattr(old, pname))] = getattr(new, pname)
            for name, new in ((a_name, na), (b_name, nb)):
                parent, _, child = name.rpartition(".")
                setattr(modules[parent] if parent else state.model, child, new)
        for g in state.param_groups:
            g["params"] = [replaced.get(id(p), p) for p in g["params"]]

    return apply


def predict(facts: Facts, amount: float = 0.5) -> list[Change]:
    rows = _linear_rows(facts)
    out: list[Change] = []
    if rows:
        names = [r["module"] for r in rows if r["type"] == "Linear"]
        weight_bytes = float(sum(r["parameter"] for r in rows if r["type"] == "Linear"))
        extra = 2 * weight_bytes
        out.append(
            Change(
                "pruning",
                {
                    "method": "torch.nn.utils.prune (l1_unstructured)",
                    "amount": amount,
                    "state": "before prune.remove",
                },
                f"+{extra:.0f} B: a mask and a recomputed weight per pruned Linear "
                f"({weight_bytes:.0f} B of weights), weight_orig kept: memory INCREASES",
                transform=prune_transform(extra),
                apply=_apply_prune(names, amount),
                caveats=["costs more memory until prune.remove()"],
                quality_cost=0.5,
                speed_cost=0.05,
                group="pruning",
            )
        )
        out.append(
            Change(
                "pruning",
                {
                    "method": "magnitude, then prune.remove",
                    "amount": amount,
                    "state": "dense zeros",
                },
                "zeros stored densely occupy the same bytes: saves 0",
                transform=lambda s: dict(s),
                apply=_apply_prune_remove(names, amount),
                caveats=[
                    f"stored as CSR (fp32 values, int64 indices) a tensor saves only below "
                    f"~{100 * csr_break_even_density(1024, 1024):.0f}% density "
                    f"(per tensor: see memprof.advisor.pruning.csr_break_even_density); "
                    f"at {100 * (1 - amount):.0f}% density it would grow"
                ],
                quality_cost=0.5,
                speed_cost=0.0,
                group="pruning",
            )
        )
    if _row_pairs(facts):
        keep = 1 - amount
        out.append(
            Change(
                "pruning",
                {"method": "structured (hidden units of Linear pairs)", "keep": keep},
                f"parameters, grads and states of the paired Linears x{keep}, their hidden "
                f"activations x{keep} (pairs read from the module table)",
                transform=structured_transform(facts, keep),
                apply=_apply_structured(keep),
                caveats=["accuracy drops without fine-tuning: check the quality column"],
                quality_cost=1.0,
                speed_cost=-0.2,
                group="pruning",
            )
        )
    return out
