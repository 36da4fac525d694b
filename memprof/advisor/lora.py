"""LoRA with peft: the base model frozen, low-rank adapters trained, the optimizer over them only.

Targets: for known architectures the attention and MLP projections (GPT-2's ``c_attn``,
``c_proj``, ``c_fc``; Llama's and Mistral's ``q/k/v/o_proj`` and ``gate/up/down_proj``), every
``nn.Linear`` (and transformers' ``Conv1D``) otherwise, the output head excepted (peft's
"all-linear" convention). Ranks 8, 16 and 64, ``lora_alpha = 2 * rank``, no adapter dropout,
``bias="none"``; the adapters are kept in fp32 whatever the base's dtype, as
``peft.get_peft_model`` does by default (``autocast_adapter_dtype=True``).

Adapter bytes: ``rank * (in_features + out_features)`` fp32 elements per adapted layer, from the
layer geometry the profile records (its first input's and output's last dimension).

Prediction: a fake run (peft injects the adapters into the fake copy; see :func:`apply_lora`)
is the figure the advisor reports when the model is at hand. Without it the analytic rewrite
of the timeline adds the adapters to the parameters, scales gradients, optimizer states and the
optimizer step's scratch by ``adapter bytes / parameter bytes`` and drops the saved inputs of
the frozen Linears that get no adapter (a frozen Linear needs only its weight to pass the
gradient back: the output head's input goes) and half of what an RMSNorm saves (its normalized
input, kept only for its frozen weight's gradient); on a 16-bit base each adapted layer's
input is saved as the fp32 copy peft casts for the adapter. It keeps everything else the model
saves: an adapted layer's input is saved by its ``lora_A`` instead of by the base layer.

Simulation: peft's ``inject_adapter_in_model`` on the deep copy, then the steps as measured.
peft is an optional dependency (``pip install memprof[finetune]``); without it the row is
predicted (fake runs need peft too, so analytically) and says what to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memprof.advisor.core import (
    TRAINING_ONLY_REASON,
    Change,
    Facts,
    ModuleNames,
    Sample,
    Transform,
    lora_adapted,
    names_in,
    not_applicable,
    weight_read_directly,
)
from memprof.advisor.workload import SimState

RANKS = (8, 16, 64)
#: Why LoRA is not a row for a model that already trains peft LoRA adapters.
ADAPTED_REASON = (
    "the model already trains peft LoRA adapters (only they train): its adapters' rank is the "
    "user's choice, and adapters on the adapters would change nothing; see the qlora and "
    "weight-quantization rows for its frozen base"
)
LINEAR_TYPES = frozenset({"Linear", "Conv1D"})
#: Projections LoRA adapts in architectures whose layer names are known: attention and MLP.
KNOWN_TARGETS: dict[str, tuple[str, ...]] = {
    "GPT-2": ("c_attn", "c_proj", "c_fc"),
    "Llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
ADAPTER_BYTES_PER_ELEMENT = 4  # fp32 adapters
INSTALL = "pip install 'memprof[finetune]' (peft) to simulate"


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


#: Layers peft refuses to adapt in a Mamba-style model (its ``_check_lora_target_modules_mamba``:
#: ``out_proj`` and ``conv1d`` of mamba, mamba2, falcon_mamba, falcon_h1 and nemotron_h models).
PEFT_MAMBA_REFUSED = ("out_proj", "conv1d")


def targets(facts: Facts) -> tuple[str, list[str]]:
    """(what was targeted, the qualified names of the layers LoRA adapts)."""
    return targets_in(facts.module_rows())


def targets_in(rows: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """:func:`targets` from module rows (``module``, ``type``; ``forward_calls`` and
    ``parent`` where known), a profile's or a model's (:func:`model_rows`)."""
    if is_mamba(rows):  # peft raises for these: leave them out, as a user has to
        rows = [r for r in rows if str(r["module"]).rsplit(".", 1)[-1] not in PEFT_MAMBA_REFUSED]
    # a layer whose forward never runs (the model reads its .weight directly, as Mamba's mixer
    # does dt_proj's) would never use an adapter, and QLoRA's NF4 weight cannot be read so
    direct = weight_read_directly(rows)
    rows = [r for r in rows if r["module"] not in direct]
    linears = [r for r in rows if str(r["type"]) in LINEAR_TYPES]
    for family, names in KNOWN_TARGETS.items():
        hits = [str(r["module"]) for r in linears
                if str(r["module"]).rsplit(".", 1)[-1] in names]
        if hits:
            return f"attention and MLP projections ({family})", hits
    # the output head stays as it is: the last Linear, or any layer named *head*
    layers = [str(r["module"]) for r in linears][:-1]
    return "every Linear but the output head", [
        n for n in layers if "head" not in n.rsplit(".", 1)[-1]]


def model_rows(model: nn.Module) -> list[dict[str, Any]]:
    """A model's modules as the rows :func:`targets_in` reads (every forward taken as run)."""
    return [{"module": name, "type": type(module).__name__}
            for name, module in model.named_modules() if name]


def is_mamba(rows: list[dict[str, Any]]) -> bool:
    """Whether the profiled model has a Mamba mixer (a module type named ``*Mamba*Mixer``)."""
    return any("Mamba" in str(r["type"]) and "Mixer" in str(r["type"]) for r in rows)


def layer_shapes(facts: Facts, names: list[str]) -> dict[str, tuple[int, int, int]]:
    """Per adapted layer: (in_features, out_features, tokens per forward), from the recorded
    geometry; a layer recorded without it is taken as square with one token per row of its
    weight (a rough guess, said in the row's ``how``)."""
    wanted = set(names)
    out: dict[str, tuple[int, int, int]] = {}
    for m in facts.profile.modules_stats:
        if m.name not in wanted:
            continue
        g = m.geometry or {}
        shape_in, shape_out = g.get("input"), g.get("output")
        if shape_in and shape_out:
            tokens = math.prod(int(d) for d in shape_in[:-1])
            out[m.name] = (int(shape_in[-1]), int(shape_out[-1]), tokens)
        else:
            side = math.isqrt(max(1, int(m.own.get("parameter", 0)) // 4))
            out[m.name] = (side, side, side)
    return out


def adapter_elements(shapes: dict[str, tuple[int, int, int]], rank: int) -> int:
    """Elements of the adapters: ``lora_A`` (rank x in) and ``lora_B`` (out x rank) per layer."""
    return sum(rank * (i + o) for i, o, _ in shapes.values())


def transform_for(facts: Facts, rank: int, names: list[str],
                  shapes: dict[str, tuple[int, int, int]]) -> Transform:
    """The analytic rewrite (see the module docstring)."""
    adapters = float(ADAPTER_BYTES_PER_ELEMENT * adapter_elements(shapes, rank))
    trained = adapters / facts.parameter_bytes if facts.parameter_bytes else 0.0
    adapted = set(names)
    rows = facts.module_rows()
    # frozen Linears without an adapter keep no input for a weight gradient
    dropped = sum(float(r["activation"]) for r in rows
                  if str(r["type"]) in LINEAR_TYPES and str(r["module"]) not in adapted)
    # an RMSNorm written in elementary ops (Llama's) saves its normalized input for its
    # weight's gradient, about half of what it saves: frozen, it does not
    dropped += sum(0.5 * float(r["activation"]) for r in rows if "RMSNorm" in str(r["type"]))
    # each adapter saves its rank-wide hidden state for lora_B's gradient
    hidden = float(sum(ADAPTER_BYTES_PER_ELEMENT * rank * t for _, _, t in shapes.values()))
    # on a 16-bit base peft casts each adapted layer's input to the adapters' fp32 and lora_A
    # saves that copy, where the base layer saved the 16-bit input
    own = {str(r["module"]): r for r in rows}
    for name, (i, o, t) in shapes.items():
        row = own.get(name)
        if row is not None and 0 < float(row["parameter"]) < 3 * i * o:  # 16-bit weights
            hidden += ADAPTER_BYTES_PER_ELEMENT * t * i - float(row["activation"])
    most = max((s["activation"] for s in facts.samples), default=0.0)
    keep = 1.0 - (dropped - hidden) / most if most else 1.0

    def transform(s: Sample) -> Sample:
        out = dict(s)
        out["parameter"] = s["parameter"] + adapters
        out["gradient"] = s["gradient"] * trained
        out["optimizer_state"] = s["optimizer_state"] * trained
        out["activation"] = s["activation"] * keep
        if s["phase"] == "optimizer":
            out["temporary"] = s["temporary"] * trained
        return out

    return transform


def breakdown(facts: Facts, transform: Transform, adapters: int) -> str:
    """What the analytic rewrite holds at its own peak, by category: the figures a fine-tuner
    reads beside the peak (the adapters are inside the parameters)."""
    from memprof.categories import CATEGORIES
    from memprof.units import format_bytes

    best: Sample | None = None
    for sample in facts.samples:
        s = transform(dict(sample))
        if best is None or sum(s[c] for c in CATEGORIES) > sum(best[c] for c in CATEGORIES):
            best = s
    if best is None:
        return ""
    parts = [f"parameters {format_bytes(round(best['parameter']))} (adapters "
             f"{format_bytes(adapters)})"]
    for category, label in (("gradient", "gradients"), ("optimizer_state", "optimizer state"),
                            ("activation", "activations"), ("temporary", "temporaries")):
        parts.append(f"{label} {format_bytes(round(max(0.0, best[category])))}")
    return f"at the predicted peak ({best['phase']}): " + ", ".join(parts)


def apply_lora(model: nn.Module, rank: int, names: list[str]) -> nn.Module:
    """Inject LoRA adapters of ``rank`` into ``names`` with peft (in place) and freeze the rest.

    On a fake model (advisor prediction) peft cannot move its new adapters to the base layer's
    device: a fake parameter is always swapped by ``Module.to`` and the fake mode holds a weak
    reference to it, which ``swap_tensors`` refuses. So peft creates them on the meta device
    (``low_cpu_mem_usage=True``, its own path for loading adapters later) and they are made
    fake here, with the base layer's device; their values do not matter for memory. peft makes
    them outside the fake mode: inside it, its meta-device context yields fake parameters on
    the base's device again, which it then tries to move."""
    from memprof.quiet_import import quiet_import

    with quiet_import():
        from peft import LoraConfig, inject_adapter_in_model

    from memprof.advisor.fake_prediction import is_fake_model

    fake = is_fake_model(model)
    names = names_in(model, names)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                        target_modules=list(names))
    with warnings.catch_warnings(), _outside_fake_mode(fake):
        warnings.simplefilter("ignore")  # "fan_in_fan_out is set to False ... Conv1D"
        model = inject_adapter_in_model(config, model, low_cpu_mem_usage=fake)
    device = next((p.device for p in model.parameters() if p.device.type != "meta"),
                  torch.device("cpu"))
    with torch.no_grad():
        for name, module in model.named_modules():
            if "lora_" not in name:
                continue
            for key, p in list(module._parameters.items()):
                if p is None:
                    continue
                fp32 = torch.float32 if p.is_floating_point() else p.dtype
                if p.device.type == "meta":
                    new = torch.zeros(p.shape, dtype=fp32, device=device)
                elif p.dtype != fp32:  # peft's default keeps adapters in fp32 (see module doc)
                    new = p.detach().to(fp32)
                else:
                    continue
                module._parameters[key] = nn.Parameter(new, requires_grad=p.requires_grad)
    return model


def _outside_fake_mode(fake: bool) -> contextlib.AbstractContextManager[Any]:
    if not fake:
        return contextlib.nullcontext()
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lora_apply(rank: int, names: list[str]) -> Callable[[SimState], None]:
    """The row's ``apply``: adapters on ``names`` and the optimizer over them only."""

    def apply(state: SimState) -> None:
        group = _group_of(state, names)
        state.model = apply_lora(state.model, rank, names)
        adapters = trainable_parameters(state.model)
        hyper = {k: v for k, v in group.items() if k != "params"}
        # the optimizer over the adapters only (one group: the hyperparameters, and optimizer,
        # of the group that trained the adapted layers)
        state.param_groups = [{**hyper, "params": adapters}]

    return apply


def _group_of(state: SimState, names: list[str]) -> dict[str, Any]:
    """The param group that trains the first adapted layer's weight (the first group if none
    does): with several optimizers (SparseAdam for embeddings beside Adam), the adapters'."""
    modules = ModuleNames(state.model)
    adapted = {id(p) for name in names_in(state.model, names)
               for p in modules[name].parameters()}
    for group in state.param_groups:
        if any(id(p) in adapted for p in group["params"]):
            return group
    return state.param_groups[0] if state.param_groups else {}


def predict(facts: Facts) -> list[Change]:
    if not facts.has_optimizer:
        return [not_applicable("lora", {}, TRAINING_ONLY_REASON, group="weights")]
    if lora_adapted(facts):
        return [not_applicable("lora", {}, ADAPTED_REASON, group="weights")]
    what, names = targets(facts)
    if not names:
        return [not_applicable("lora", {}, "no Linear layer besides the output head to adapt",
                               group="weights")]
    shapes = layer_shapes(facts, names)
    guessed = sum(1 for m in facts.profile.modules_stats
                  if m.name in shapes and not (m.geometry or {}).get("input"))
    can_simulate = peft_available()
    out = []
    for rank in RANKS:
        adapters = ADAPTER_BYTES_PER_ELEMENT * adapter_elements(shapes, rank)
        transform = transform_for(facts, rank, names, shapes)
        caveats = [
            f"only the adapters train ({adapters} B, "
            f"{100 * adapters / max(1, facts.parameter_bytes):.2f}% of the parameter bytes): "
            "the base model stays as it is; quality depends on the task and the rank",
            "no adapter dropout (lora_dropout > 0 saves a dropout output and mask per layer)",
        ]
        if not can_simulate:
            caveats.append(f"peft is not installed: predicted analytically; {INSTALL}")
        if is_mamba(facts.module_rows()):
            caveats.append(f"{' and '.join(PEFT_MAMBA_REFUSED)} are left out: peft refuses "
                           "to adapt them in Mamba models")
        out.append(Change(
            "lora",
            {"rank": rank, "targets": f"{len(names)} layers: {what}", "modules": names},
            f"{len(names)} layers get fp32 adapters of rank {rank} ({adapters} B: rank x "
            "(in + out) elements each); the base is frozen: gradients, optimizer states and "
            "the step's scratch scale to the adapters' share; the frozen Linears without an "
            "adapter keep no input"
            + (f"; {guessed} layers without recorded geometry taken as square" if guessed else "")
            + f"; {breakdown(facts, transform, adapters)}",
            transform=transform,
            apply=lora_apply(rank, names) if can_simulate else None,
            caveats=caveats,
            quality_cost=0.7 - 0.1 * RANKS.index(rank),  # a higher rank trains more
            speed_cost=0.0,
            training_only=True,
            group="weights",
        ))
    return out
