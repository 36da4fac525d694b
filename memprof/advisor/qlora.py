"""QLoRA: the LoRA targets' weights stored as 4-bit NormalFloat (NF4), frozen, with peft's
LoRA adapters trained on top (see :mod:`memprof.advisor.lora` for the adapters, targets and
optimizer).

The base weights become torchao's ``NF4Tensor`` (``to_nf4``: 4 bits per element, one int8
scale per block of 64 and one fp32 scale per block of those scales): about 0.52 bytes per
element, against 2 (bf16) or 4 (fp32). The forward dequantizes one layer's weight at a time to
the input's dtype (``torchao``'s ``linear_nf4``: the frozen weight saves only itself for
backward, which dequantizes it again). transformers' ``Conv1D`` (GPT-2) becomes the
equivalent ``nn.Linear`` first (its weight transposed), because ``NF4Tensor`` implements
``F.linear`` and not Conv1D's ``addmm``. A weight whose size does not divide into blocks of 64
stays as it is (frozen, unquantized).

This is the bitsandbytes ``Linear4bit`` recipe with torchao's NF4 on every device: torchao runs
on the CPU, so the simulation here runs the real quantized weights. What differs on a GPU with
bitsandbytes: its kernels dequantize in blocks rather than the whole weight (the transient here
is one full-precision weight, an upper bound), and its double quantization packs the scales
slightly differently (within a percent of the weight bytes). memprof's ledger counts an
``NF4Tensor`` by its largest inner tensor (the packed 4-bit data): its scales, 1/32 of that,
are not in the measured or fake-run peaks; the analytic figure includes them.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memprof.advisor import lora
from memprof.advisor.core import (
    ADAPTED_REASON,
    TRAINING_ONLY_REASON,
    Change,
    Facts,
    ModuleNames,
    Sample,
    Transform,
    adapted_bases,
    lora_adapted,
    not_applicable,
)
from memprof.advisor.workload import SimState
from memprof.quiet_import import quiet_import

RANKS = (16, 64)
BLOCK = 64
#: Bytes per NF4 element: 4 bits, an int8 scale per 64, an fp32 per 256 scales.
NF4_BYTES_PER_ELEMENT = 0.5 + 1 / BLOCK + 4 / (BLOCK * 256)
INSTALL = "pip install 'memprof[finetune]' (peft, torchao) to simulate"


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("peft", "torchao"))


def nf4_module() -> Any:
    """torchao's NF4 module: ``to_nf4``, ``NF4Tensor`` and its constructor's metadata."""
    with quiet_import():
        try:
            from torchao.quantization import to_nf4
        except ImportError:  # torchao before 0.10 kept it here
            from torchao.dtypes.nf4tensor import to_nf4
    return sys.modules[to_nf4.__module__]


def scaler_block(numel: int) -> int | None:
    """The largest block of scales (256 down to 1) that divides the weight's blocks of 64, or
    None when the weight is not a whole number of blocks."""
    if numel % BLOCK:
        return None
    blocks = numel // BLOCK
    for size in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if blocks % size == 0:
            return size
    return None


def quantize_layer(layer: nn.Module) -> nn.Module:
    """A frozen ``nn.Linear`` whose weight is ``layer``'s in NF4 (``layer`` itself when its
    weight does not divide into blocks). Works on real and on fake tensors."""
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    w = weight.detach()
    if type(layer).__name__ == "Conv1D":  # transformers: y = x @ W + b, W is (in, out)
        w = w.t().contiguous()
    scalers = scaler_block(w.numel())
    if scalers is None:
        return layer
    out_features, in_features = int(w.shape[0]), int(w.shape[1])
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    with torch.no_grad():
        nf4 = (fake_nf4 if _is_fake(w) else nf4_module().to_nf4)(w, BLOCK, scalers)
        linear.weight = nn.Parameter(nf4, requires_grad=False)
    bias = getattr(layer, "bias", None)
    if isinstance(bias, nn.Parameter):
        linear.bias = bias
    return linear


def fake_nf4(w: torch.Tensor, block: int, scalers: int) -> torch.Tensor:
    """``to_nf4(w, block, scalers)`` for a fake ``w``, made directly: torchao's ``NF4Tensor``
    around new tensors of the shapes and dtypes its conversion makes (``from_tensor``: the
    4-bit pairs, an int8 scale per block, a scale per block of scales, their mean and the
    16-value table). Quantizing under fake tensors issued a few hundred fake ops per weight
    (it quantizes in chunks of 2**20 elements): 0.3 s of a GPT-2 small row, 9.6 s of a 7B
    estimate; the values, which a fake run never reads, are all it skips."""
    module = nf4_module()
    elements = w.numel()
    blocks = elements // block

    def new(*shape: int, dtype: torch.dtype = w.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=w.device)

    meta = module.SubclassTensorArgs(w.size(), w.stride(), w.storage_offset(), w.dtype,
                                     w.device, w.requires_grad)
    return module.NF4Tensor(
        meta, block, blocks, scalers,
        new(blocks, dtype=torch.int8),  # quantized_scalers
        # one per block of scales: the first column of a (blocks of scales, scalers) tensor,
        # made contiguous (a new storage unless it already is one: one block of scales)
        new(blocks // scalers, scalers)[:, 0].contiguous(),  # quantization_factor
        new(),  # scaler_mean
        new(elements // 2, dtype=torch.uint8),  # quantized_data
        new(16),  # nf4: the table of the 16 values
    )


def _is_fake(tensor: torch.Tensor) -> bool:
    from memprof.advisor.fake_prediction import is_fake

    return is_fake(tensor)


def quantize_layers(model: nn.Module, names: list[str]) -> None:
    """Replace each layer named in ``names`` by its NF4 form (:func:`quantize_layer`)."""
    modules = ModuleNames(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, quantize_layer(getattr(parent, child)))


def _apply(rank: int, names: list[str]) -> Callable[[SimState], None]:
    def apply(state: SimState) -> None:
        quantize_layers(state.model, names)
        lora.lora_apply(rank, names)(state)

    return apply


def _apply_to_bases(names: list[str]) -> Callable[[SimState], None]:
    """The model's own peft adapters kept, the frozen base layers under them in NF4."""
    def apply(state: SimState) -> None:
        quantize_layers(state.model, names)

    return apply


def base_transform(facts: Facts, shapes: dict[str, tuple[int, int, int]]) -> Transform:
    """The analytic rewrite for bases already frozen under adapters: their weights' bytes become
    NF4's and, inside a base layer's transient moments, its dequantized weight is live;
    gradients and optimizer states (the adapters') do not change."""
    own = {str(r["module"]): float(r["parameter"]) for r in facts.module_rows()}
    dequantized: dict[str, float] = {}
    removed = added = 0.0
    for name, (i, o, _) in shapes.items():
        params = own.get(name, 0.0)
        if not params or scaler_block(i * o) is None:
            continue
        element = 2.0 if params < 3 * i * o else 4.0  # 16-bit or fp32 weights
        dequantized[name] = element * i * o
        removed += element * i * o
        added += NF4_BYTES_PER_ELEMENT * i * o

    def transform(s: Sample) -> Sample:
        out = dict(s)
        out["parameter"] = s["parameter"] - removed + added
        if s.get("transient") and s["phase"] in ("forward", "backward"):
            out["temporary"] = s["temporary"] + dequantized.get(str(s["module"]), 0.0)
        return out

    return transform


def _predict_for_adapters(facts: Facts) -> list[Change]:
    """QLoRA from a model that already trains peft LoRA adapters: its base layers to NF4."""
    names = adapted_bases(facts)
    if not names:
        return [not_applicable("qlora", {}, ADAPTED_REASON, group="weights")]
    shapes = lora.layer_shapes(facts, names)
    weights = sum(i * o for i, o, _ in shapes.values() if scaler_block(i * o) is not None)
    can_simulate = available()
    caveats: list[Any] = [
        "the model's own adapters train as before; the base's rounding (NF4) changes the "
        "model they learn on",
        "the scales of the NF4 weights (1/32 of their 4-bit data) are not in a measured or "
        "fake-run peak (memprof counts a tensor subclass by its largest inner tensor)",
        "on a GPU bitsandbytes dequantizes in blocks: one full weight live at a time here is "
        "an upper bound",
    ]
    if not can_simulate:
        caveats.append(f"torchao is not installed: predicted analytically; {INSTALL}")
    return [Change(
        "qlora",
        {"base": "nf4", "adapters": "the model's own (peft)",
         "targets": f"{len(names)} base layers under the adapters", "modules": names},
        f"{weights} frozen base weight elements under the model's peft LoRA adapters stored as "
        f"NF4 ({NF4_BYTES_PER_ELEMENT:.3f} B each, torchao to_nf4); the adapters, their "
        "gradients and optimizer states unchanged; one weight dequantized at a time",
        transform=base_transform(facts, shapes),
        apply=_apply_to_bases(names) if can_simulate else None,
        caveats=caveats,
        quality_cost=0.8,
        speed_cost=0.2,
        training_only=True,
        group="weights",
    )]


def transform_for(facts: Facts, rank: int, names: list[str],
                  shapes: dict[str, tuple[int, int, int]]) -> Transform:
    """LoRA's rewrite, with the targets' weights in NF4 and, inside a target (its transient
    moments in forward and backward), its dequantized weight live."""
    adapters = lora.transform_for(facts, rank, names, shapes)
    nf4 = base_transform(facts, shapes)

    def transform(s: Sample) -> Sample:
        return nf4(adapters(s))

    return transform


def predict(facts: Facts) -> list[Change]:
    if not facts.has_optimizer:
        return [not_applicable("qlora", {}, TRAINING_ONLY_REASON, group="weights")]
    if lora_adapted(facts):
        return _predict_for_adapters(facts)
    what, names = lora.targets(facts)
    if not names:
        return [not_applicable("qlora", {}, "no Linear layer besides the output head to adapt",
                               group="weights")]
    shapes = lora.layer_shapes(facts, names)
    weights = sum(i * o for i, o, _ in shapes.values())
    can_simulate = available()
    out = []
    for rank in RANKS:
        adapters = lora.ADAPTER_BYTES_PER_ELEMENT * lora.adapter_elements(shapes, rank)
        transform = transform_for(facts, rank, names, shapes)
        caveats: list[Any] = [
            f"only the adapters train ({adapters} B) on a 4-bit frozen base: the base's "
            "rounding (NF4) changes the model the adapters learn on",
            "the scales of the NF4 weights (1/32 of their 4-bit data) are not in a measured or "
            "fake-run peak (memprof counts a tensor subclass by its largest inner tensor)",
            "on a GPU bitsandbytes dequantizes in blocks: one full weight live at a time here "
            "is an upper bound",
        ]
        if not can_simulate:
            caveats.append(f"peft or torchao is not installed: predicted analytically; {INSTALL}")
        out.append(Change(
            "qlora",
            {"rank": rank, "base": "nf4", "targets": f"{len(names)} layers: {what}",
             "modules": names},
            f"{weights} target weight elements stored as NF4 "
            f"({NF4_BYTES_PER_ELEMENT:.3f} B each, torchao to_nf4), frozen; fp32 LoRA adapters "
            f"of rank {rank} ({adapters} B) trained; gradients, optimizer states and the "
            "step's scratch scale to the adapters' share; one weight dequantized at a time; "
            + lora.breakdown(facts, transform, adapters),
            transform=transform,
            apply=_apply(rank, names) if can_simulate else None,
            caveats=caveats,
            quality_cost=1.0 - 0.1 * RANKS.index(rank),
            speed_cost=0.2,
            training_only=True,
            group="weights",
        ))
    return out
