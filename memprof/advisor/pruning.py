"""Pruning, honestly.

* ``torch.nn.utils.prune`` (unstructured, magnitude) keeps ``weight_orig`` (the parameter),
  adds ``weight_mask`` (a buffer the size of the weight, same dtype) and recomputes ``weight``
  (a plain tensor the size of the weight) on every forward: +2 weights of memory per pruned
  layer until ``prune.remove``. After ``prune.remove`` the zeros are stored densely: 0 saved.
* Stored sparse (CSR: values + int64 column indices + int64 row pointers) a tensor saves only
  below a break-even density, computed per tensor: ``d* = (e*s - 8*(rows+1)) / (e*(s+8))`` for
  ``e`` elements of ``s`` bytes (about 33% density, 67% zeros, for fp32).
* Structured pruning removes the hidden units of Linear -> elementwise -> Linear pairs, and the
  channels of Conv -> BatchNorm/elementwise/pooling -> Conv pairs, where they run one after the
  other inside ``nn.Sequential`` containers (nested ones included): the first layer's output
  units, the second's matching inputs and a BatchNorm's statistics between them go, so the
  tensors really shrink, and so do the activations saved between them. GPT-2-style blocks
  (transformers' Conv1D) get the same for their MLP's hidden units and their attention heads.
* ``torch.nn.utils.prune`` is offered for every layer with a weight of its own (Linear,
  convolutions, Conv1D).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._prims_common import is_non_overlapping_and_dense_or_false
from torch.nn.utils import prune

from memprof.advisor.core import (
    CONV_TYPES,
    Change,
    Facts,
    ModuleNames,
    Sample,
    Transform,
    model_tree,
    not_applicable,
    profile_tree,
    weight_read_directly,
)
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


#: Layers ``torch.nn.utils.prune`` is offered for: each has a ``weight`` of its own.
PRUNABLE_TYPES = frozenset({"Linear", "Conv1D"}) | CONV_TYPES


def _weight_rows(facts: Facts) -> list[dict[str, Any]]:
    """Prunable layers, each with ``parameter`` set to all its own parameters' bytes: a tied
    weight (an LM decoder sharing the embedding's) is charged to its first owner in the
    profile, but pruning the layer acts on it all the same."""
    own = {m.name: int(m.geometry.get("parameter_bytes", 0)) for m in facts.profile.modules_stats}
    rows = []
    for r in facts.module_rows():
        if r["type"] not in PRUNABLE_TYPES:
            continue
        r = {**r, "parameter": max(float(r["parameter"]), float(own.get(r["module"], 0)))}
        if r["parameter"] > 0:
            rows.append(r)
    return rows


def prune_transform(extra: float) -> Transform:
    def transform(s: Sample) -> Sample:
        out = dict(s)
        out["buffer"] = s["buffer"] + extra / 2  # the masks
        out["other"] = s["other"] + extra / 2  # the recomputed dense weights
        return out

    return transform


def _apply_prune(names: list[str], amount: float) -> Any:
    def apply(state: SimState) -> None:
        modules = ModuleNames(state.model)
        for name in names:
            prune.l1_unstructured(modules[name], "weight", amount=amount)

    return apply


def _apply_prune_remove(names: list[str], amount: float) -> Any:
    def apply(state: SimState) -> None:
        _apply_prune(names, amount)(state)
        modules = ModuleNames(state.model)
        for name in names:
            prune.remove(modules[name], "weight")

    return apply


def weights_own_their_storages(names: list[str]) -> Callable[[Any], bool]:
    """Whether a workload's ``names`` modules each have a dense weight alone in its storage:
    then pruning them and ``prune.remove`` leaves the step as it was, tensor for tensor (each
    weight is the same parameter, its data a product of the same shape and storage size, no
    hook or mask left), and the row's fake run is the unchanged step's (:attr:`Change
    .unchanged_step`). A weight that is a view of a larger storage (parameters kept in one
    flat buffer) would get a storage of its own, and the run is made."""

    def check(workload: Any) -> bool:
        modules = ModuleNames(workload.model)
        found = [getattr(modules[name], "weight", None) for name in names]
        weights = [w for w in found if isinstance(w, nn.Parameter)]
        if not weights or len(weights) != len(found):
            return False
        others = [t for t in (*workload.model.parameters(), *workload.model.buffers())
                  if t is not None and not any(t is w for w in weights)]
        taken = {t.untyped_storage()._cdata for t in others}
        for w in weights:
            storage = w.untyped_storage()
            if (storage._cdata in taken or not is_non_overlapping_and_dense_or_false(w)
                    or storage.nbytes() != w.numel() * w.element_size()):
                return False
            taken.add(storage._cdata)  # (a weight two modules share is pruned twice)
        return True

    return check


#: Modules that act on each channel (or feature) on its own: what may stand between the two
#: layers of a structured pair, narrowed along with them.
CHANNELWISE = ELEMENTWISE | frozenset({
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Dropout2d", "Dropout3d", "Identity",
    "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d",
})
LINEAR_TYPES = frozenset({"Linear"})


@dataclass(frozen=True)
class Layer:
    """A module as structured pruning sees it: its width in and out (features or channels)."""

    name: str
    type: str
    width_in: int = 0
    width_out: int = 0
    groups: int = 1


@dataclass(frozen=True)
class Pair:
    """Two layers of the same kind where the first's outputs are the second's only inputs,
    with channelwise modules between them: the first's output units can be removed."""

    first: str
    second: str
    between: tuple[str, ...]
    kind: str  # "linear", "conv", "mlp" (a GPT-2 MLP) or "heads" (a GPT-2 attention)


def find_pairs(chain: list[Layer]) -> list[Pair]:
    """Pairs in a chain of layers that run one after the other; a layer is in one pair at most."""
    pairs: list[Pair] = []
    used: set[str] = set()
    for i, a in enumerate(chain):
        kind = "linear" if a.type in LINEAR_TYPES else "conv" if a.type in CONV_TYPES else None
        if kind is None or a.name in used or a.groups != 1:
            continue
        between: list[str] = []
        for b in chain[i + 1 :]:
            if b.type in (LINEAR_TYPES if kind == "linear" else CONV_TYPES):
                if b.groups == 1 and b.width_in == a.width_out and b.width_in > 1:
                    pairs.append(Pair(a.name, b.name, tuple(between), kind))
                    used.update((a.name, b.name))
                break
            if b.type not in CHANNELWISE:
                break
            between.append(b.name)
    return pairs


def _chains(tree: dict[str, list[str]], is_sequential: Callable[[str], bool]) -> list[list[str]]:
    """Module names in the order they run, for each outermost ``nn.Sequential`` (its own
    Sequential children spliced in: each output is the next one's only input)."""
    parents = {child: name for name, children in tree.items() for child in children}
    return [_run_order(name, tree, is_sequential) for name in tree if is_sequential(name)
            and not (name in parents and is_sequential(parents[name]))]


def _run_order(name: str, tree: dict[str, list[str]], is_sequential: Callable[[str], bool]
               ) -> list[str]:
    # A plain function, not a closure calling itself: that would be a reference cycle holding
    # the model's old modules (and their weights) until the garbage collector runs.
    return [leaf for child in tree.get(name, []) for leaf in
            (_run_order(child, tree, is_sequential) if is_sequential(child) else [child])]


def block_pairs(tree: dict[str, list[str]], type_of: Callable[[str], str]) -> list[Pair]:
    """Pairs inside GPT-2-style blocks (transformers' Conv1D layers, whose forward is known):
    an MLP's hidden units (``c_fc`` -> ``act`` -> ``c_proj``) and an attention's heads
    (``c_attn`` -> the attention itself -> ``c_proj``; cross-attention, with ``q_attn``, is
    left alone)."""
    out: list[Pair] = []
    for name, children in tree.items():
        kids = {child.rpartition(".")[2]: child for child in children}
        conv1d = {k for k, child in kids.items() if type_of(child) == "Conv1D"}
        if {"c_fc", "c_proj"} <= conv1d and "act" in kids:
            out.append(Pair(kids["c_fc"], kids["c_proj"], (kids["act"],), "mlp"))
        elif {"c_attn", "c_proj"} <= conv1d and "q_attn" not in kids:
            out.append(Pair(kids["c_attn"], kids["c_proj"], (name,), "heads"))
    return out


def model_pairs(model: nn.Module) -> list[Pair]:
    """The structured pairs of ``model``, read from its modules."""
    modules = dict(model.named_modules())
    tree = model_tree(model)

    def layer(name: str) -> Layer:
        m = modules[name]
        if isinstance(m, nn.Linear):
            return Layer(name, "Linear", m.in_features, m.out_features)
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            return Layer(name, type(m).__name__, m.in_channels, m.out_channels, m.groups)
        return Layer(name, type(m).__name__)

    chains = _chains(tree, lambda n: isinstance(modules[n], nn.Sequential))
    blocks = [
        p for p in block_pairs(tree, lambda n: type(modules[n]).__name__)
        if p.kind != "heads" or all(
            hasattr(modules[p.between[0]], a) for a in ("num_heads", "head_dim", "split_size")
        )
    ]
    return [p for chain in chains for p in find_pairs([layer(n) for n in chain])] + blocks


def profile_pairs(facts: Facts) -> list[Pair]:
    """The same pairs read from the profile: module types, order and recorded shapes."""
    stats = {m.name: m for m in facts.profile.modules_stats}
    tree = profile_tree(facts.profile)

    def layer(name: str) -> Layer:
        m = stats[name]
        g = m.geometry
        if "input" not in g or "output" not in g or not (
            m.type in LINEAR_TYPES or m.type in CONV_TYPES
        ):
            return Layer(name, m.type)
        axis = -1 if m.type in LINEAR_TYPES else 1
        return Layer(name, m.type, g["input"][axis], g["output"][axis], g.get("groups", 1))

    chains = _chains(tree, lambda n: stats[n].type == "Sequential")
    blocks = block_pairs(tree, lambda n: stats[n].type)
    return [p for chain in chains for p in find_pairs([layer(n) for n in chain])] + blocks


def structured_transform(facts: Facts, pairs: list[Pair], keep: float) -> Transform:
    """Parameters (and a BatchNorm's buffers) of the paired layers and what stands between
    them, and the activations saved between them, x ``keep``."""
    rows = {str(r["module"]): r for r in facts.module_rows()}
    removed_p = removed_b = removed_act = 0.0
    narrowed: set[str] = set()  # modules whose work is as wide as the pruned units
    for pair in pairs:
        inside = [rows[n] for n in (pair.first, *pair.between, pair.second)]
        removed_p += (1 - keep) * sum(float(r["parameter"]) for r in inside)
        removed_b += (1 - keep) * sum(float(r["buffer"]) for r in inside)
        removed_act += (1 - keep) * sum(float(r["activation"]) for r in inside[1:])
        narrowed.update(str(r["module"]) for r in inside)
    p = float(facts.parameter_bytes) or 1.0
    frac = removed_p / p
    peak_act = max((s["activation"] for s in facts.samples), default=0.0)
    act_ratio = (peak_act - removed_act) / peak_act if peak_act else 1.0

    def transform(s: Sample) -> Sample:
        out = dict(s)
        for c in ("parameter", "gradient", "optimizer_state"):
            out[c] = s[c] * (1 - frac)
        out["buffer"] = max(0.0, s["buffer"] - removed_b)  # a model's buffers live throughout
        out["activation"] = s["activation"] * act_ratio
        if s["phase"] == "optimizer":
            out["temporary"] = s["temporary"] * (1 - frac)
        elif s.get("module") in narrowed:
            # Inside a pruned pair, forward and backward scratch (the hidden activations'
            # gradients, the weight gradient being formed) is as wide as the kept units.
            out["temporary"] = s["temporary"] * keep
        return out

    return transform


Narrowable = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d


def _narrow_norm(norm: nn.modules.batchnorm._BatchNorm, keep: torch.Tensor) -> nn.Module:
    """A copy of a BatchNorm with only the kept channels (parameters and statistics)."""
    new = type(norm)(len(keep), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                     track_running_stats=norm.track_running_stats)
    with torch.no_grad():
        # new tensors in the old ones' dtypes, set in place of the fresh module's (not a
        # ``.to(dtype)``: fake parameters cannot be swapped in place)
        for name, t in norm.named_parameters(recurse=False):
            setattr(new, name, nn.Parameter(_kept(t, keep), requires_grad=t.requires_grad))
        for name, buffer in norm.named_buffers(recurse=False):
            new._buffers[name] = _kept(buffer, keep)
    return new


def _kept(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor of ``t``'s ``keep`` entries (all of a 0-dim ``t``)."""
    return (t if t.dim() == 0 else t[keep]).detach().clone(memory_format=torch.contiguous_format)


def _narrow_layer(layer: Narrowable, keep_out: torch.Tensor | None,
                  keep_in: torch.Tensor | None) -> nn.Module:
    """A copy of a Linear or convolution with only the kept output and input units."""
    weight = layer.weight.detach()
    if keep_out is not None:
        weight = weight[keep_out]
    if keep_in is not None:
        weight = weight[:, keep_in]
    bias = layer.bias.detach() if layer.bias is not None else None
    if bias is not None and keep_out is not None:
        bias = bias[keep_out]
    # A fresh module, not a copy: a copy would carry the hooks (and a profiler's) along.
    new: Narrowable
    if isinstance(layer, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                        dtype=weight.dtype)
    else:
        conv: Any = type(layer)  # each ConvNd's own tuple sizes
        new = conv(weight.shape[1], weight.shape[0], layer.kernel_size, stride=layer.stride,
                   padding=layer.padding, dilation=layer.dilation, bias=bias is not None,
                   padding_mode=layer.padding_mode, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None and new.bias is not None:
            new.bias.copy_(bias)
    new.requires_grad_(layer.weight.requires_grad)
    return new


def _narrow_conv1d(layer: Any, cols: torch.Tensor | None, rows: torch.Tensor | None
                   ) -> nn.Module:
    """A copy of a transformers Conv1D (weight ``(in, out)``) with only the kept output
    columns and input rows."""
    weight, bias = layer.weight.detach(), layer.bias.detach()
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight, bias = weight[:, cols], bias[cols]
    new: Any = type(layer)(weight.shape[1], weight.shape[0])  # Conv1D(nf, nx)
    grad = layer.weight.requires_grad
    with torch.no_grad():  # the kept weights in their own dtype (fake ones cannot be cast)
        new.weight = nn.Parameter(weight.clone(memory_format=torch.contiguous_format), grad)
        new.bias = nn.Parameter(bias.clone(memory_format=torch.contiguous_format), grad)
    return new


def _top(units: int, keep: float, score: Callable[[], torch.Tensor], fake: bool) -> torch.Tensor:
    """The indices of the ``keep`` fraction of ``units`` that ``score()`` rates highest, in
    order. On fake tensors (a prediction: only shapes matter, and scores have no values) the
    first ones, and no score is computed (a GPT-2 small's scores took 4,000 fake ops)."""
    if fake:
        return torch.arange(_kept_units(units, keep))
    return score().topk(_kept_units(units, keep)).indices.sort().values


def _kept_units(units: int, keep: float) -> int:
    return max(1, math.ceil(units * keep))


def _narrowed(pair: Pair, modules: dict[str, nn.Module], keep: float) -> dict[str, nn.Module]:
    """The new modules for ``pair``, by name. A unit's importance is the L1 norm of its
    weights in times that of its weights out."""
    from memprof.advisor.fake_prediction import is_fake

    a: Any = modules[pair.first]  # Linear, convolution or Conv1D: each has a weight
    b: Any = modules[pair.second]
    fake = is_fake(a.weight)

    def abs_weights() -> tuple[torch.Tensor, torch.Tensor]:
        return a.weight.detach().abs(), b.weight.detach().abs()

    if pair.kind == "mlp":  # Conv1D: c_fc (embed, hidden) -> c_proj (hidden, embed)
        def mlp_score() -> torch.Tensor:
            wa, wb = abs_weights()
            return wa.sum(0) * wb.sum(1)

        idx = _top(a.weight.shape[1], keep, mlp_score, fake)
        return {pair.first: _narrow_conv1d(a, idx, None), pair.second: _narrow_conv1d(b, None, idx)}
    if pair.kind == "heads":  # c_attn (embed, 3 x heads x head_dim) -> c_proj
        attn: Any = modules[pair.between[0]]
        heads, dim, width = int(attn.num_heads), int(attn.head_dim), int(attn.split_size)

        def head_score() -> torch.Tensor:
            wa, wb = abs_weights()
            return torch.stack([
                sum(wa[:, part * width + cols].sum() for part in range(3)) * wb[cols].sum()
                for cols in (torch.arange(h * dim, (h + 1) * dim) for h in range(heads))
            ])

        kept = (list(range(_kept_units(heads, keep))) if fake
                else [int(h) for h in _top(heads, keep, head_score, fake).tolist()])
        rows = torch.cat([torch.arange(h * dim, (h + 1) * dim) for h in kept])
        cols = torch.cat([part * width + rows for part in range(3)])
        attn.num_heads, attn.split_size = len(kept), len(kept) * dim
        return {pair.first: _narrow_conv1d(a, cols, None),
                pair.second: _narrow_conv1d(b, None, rows)}
    assert isinstance(a, Narrowable) and isinstance(b, Narrowable)

    def unit_score() -> torch.Tensor:
        wa, wb = abs_weights()
        return wa.flatten(1).sum(1) * wb.transpose(0, 1).flatten(1).sum(1)

    idx = _top(a.weight.shape[0], keep, unit_score, fake)
    new = {pair.first: _narrow_layer(a, idx, None), pair.second: _narrow_layer(b, None, idx)}
    for name in pair.between:
        norm = modules[name]
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            new[name] = _narrow_norm(norm, idx)
    return new


def _apply_structured(keep: float) -> Any:
    def apply(state: SimState) -> None:
        modules = ModuleNames(state.model)
        replaced: dict[int, nn.Parameter] = {}
        for pair in model_pairs(state.model):
            for name, module in _narrowed(pair, modules, keep).items():
                old = modules[name]
                for pname, param in old.named_parameters(recurse=False):
                    replaced[id(param)] = getattr(module, pname)
                parent, _, child = name.rpartition(".")
                setattr(modules[parent] if parent else state.model, child, module)
        for g in state.param_groups:
            g["params"] = [replaced.get(id(p), p) for p in g["params"]]

    return apply


def predict(facts: Facts, amount: float = 0.5) -> list[Change]:
    rows = _weight_rows(facts)
    out: list[Change] = []
    if rows:
        names = [r["module"] for r in rows]
        # prune's forward pre-hook recomputes the pruned weight: a layer whose forward never
        # runs (the model reads its .weight directly, as Mamba's mixer does dt_proj's) would
        # use the weight made once, with its graph, in every step (a second backward fails)
        direct = weight_read_directly(facts.module_rows())
        hooked = [r for r in rows if r["module"] not in direct]
        unhooked = [r["module"] for r in rows if r not in hooked]
        options = {"method": "torch.nn.utils.prune (l1_unstructured)", "amount": amount,
                   "state": "before prune.remove"}
        if not hooked:
            out.append(not_applicable(
                "pruning", options, "no prunable layer's forward runs (the model reads their "
                ".weight directly), and prune recomputes a pruned weight only in the forward",
                group="pruning"))
        else:
            weight_bytes = float(sum(r["parameter"] for r in hooked))
            extra = 2 * weight_bytes
            left_out = ([f"left out: {len(unhooked)} layer(s) whose forward never runs "
                         f"({', '.join(unhooked[:3])}{', ...' if len(unhooked) > 3 else ''}: "
                         "the model reads their .weight directly, and prune recomputes a pruned "
                         "weight only in the forward)"] if unhooked else [])
            out.append(
                Change(
                    "pruning",
                    options,
                    f"+{extra:.0f} B: a mask and a recomputed weight per pruned layer "
                    f"({weight_bytes:.0f} B of weights), weight_orig kept: memory INCREASES",
                    transform=prune_transform(extra),
                    apply=_apply_prune([r["module"] for r in hooked], amount),
                    caveats=["costs more memory until prune.remove()", *left_out],
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
                unchanged_step=weights_own_their_storages(names),
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
    pairs = profile_pairs(facts)
    if pairs:
        keep = 1 - amount
        kinds = {p.kind for p in pairs}
        what = " and ".join(
            w for k, w in (("linear", "hidden units of Linear pairs"),
                           ("conv", "channels of convolution pairs"),
                           ("mlp", "MLP hidden units"), ("heads", "attention heads")) if k in kinds
        )
        out.append(
            Change(
                "pruning",
                {"method": f"structured ({what})", "keep": keep},
                f"parameters, grads and states of {len(pairs)} layer pairs (and any BatchNorm "
                f"between) x{keep}, the activations saved between them x{keep} (pairs read "
                "from the module table and the recorded shapes)",
                transform=structured_transform(facts, pairs, keep),
                apply=_apply_structured(keep),
                caveats=["accuracy drops without fine-tuning: check the quality column"],
                quality_cost=1.0,
                speed_cost=-0.2,
                group="pruning",
            )
        )
    return out
