"""Weight-only quantization (int8 per output channel, int4 in groups of 128) of Linear layers
(``nn.Linear``, and transformers' ``Conv1D``, a Linear with its weight stored transposed).

For inference or a frozen base (QLoRA-style training of the rest): each ``nn.Linear`` weight
becomes int8 (1 byte per element) plus one fp32 scale per output row, or int4 (half a byte)
plus one fp32 scale per group of 128; biases stay fp32. Embeddings, norms and the output head
(``lm_head``, or the model's last Linear) stay in high precision. In a training profile the
quantized weights are frozen: their gradients and optimizer states go too (the weights kept in
high precision still train). The forward dequantizes one layer's weight at a time, in place (a
temporary the size of that fp32 weight, and for int4 one unpacked nibble plane, an eighth of
it, while it fills); backward dequantizes again rather than keeping it.
8-bit optimizer *states* for full training are in :mod:`memprof.advisor.optimizer`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memprof.advisor.core import (
    ADAPTED_REASON,
    Change,
    Facts,
    ModuleNames,
    Sample,
    Transform,
    adapted_bases,
    gradients_before,
    lora_adapted,
    not_applicable,
    weight_read_directly,
)
from memprof.advisor.workload import SimState

GROUP = 128
LINEAR_TYPES = frozenset({"Linear", "Conv1D"})


class _DequantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x)
        return nn.functional.linear(x, layer.weight_fp().to(x.dtype), None)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (_x,) = ctx.saved_tensors
        w = ctx.layer.weight_fp().to(grad.dtype)
        return grad @ w, None


class WeightStandIn(torch.Tensor):
    """Shape, dtype and device of a weight that is not stored: any operation on it raises."""

    @staticmethod
    def __new__(
        cls, shape: torch.Size, dtype: torch.dtype, device: torch.device
    ) -> WeightStandIn:
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=device, requires_grad=False
        )

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        raise RuntimeError(
            f"{func}: a quantized layer's weight is not stored in floating point; "
            "call layer.weight_fp() for its dequantized value"
        )

    def __repr__(self) -> str:  # type: ignore[override]
        return f"WeightStandIn(shape={tuple(self.shape)}, dtype={self.dtype})"

    def __deepcopy__(self, memo: dict[int, Any]) -> WeightStandIn:
        return WeightStandIn(self.shape, self.dtype, self.device)


class QuantLinear(nn.Module):
    """A frozen weight-only quantized Linear (symmetric; int4 packed two per byte)."""

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, linear: nn.Module, bits: int) -> None:
        super().__init__()
        weight, bias = linear.weight, linear.bias
        assert isinstance(weight, torch.Tensor)
        w = weight.detach().float()
        if type(linear).__name__ == "Conv1D":  # transformers: y = x @ W + b, W is (in, out)
            w = w.t()
        self.out_features: int = int(w.shape[0])
        self.in_features: int = int(w.shape[1])
        self.bits = bits
        if bits == 8:
            scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
            self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
            self.register_buffer("scale", scale.reshape(-1))
        else:
            pad = (-self.in_features) % GROUP
            g = nn.functional.pad(w, (0, pad)).reshape(self.out_features, -1, GROUP)
            scale = g.abs().amax(dim=2, keepdim=True).clamp_min(1e-12) / 7
            q = (torch.round(g / scale).clamp(-8, 7) + 8).to(torch.uint8).reshape(-1)
            self.register_buffer("qweight", q[0::2] | (q[1::2] << 4))
            self.register_buffer("scale", scale.reshape(-1))
        self.bias = bias if isinstance(bias, nn.Parameter) else None
        # not a buffer: owns no storage, is never moved or saved (see ``weight``)
        self._weight_placeholder = WeightStandIn(weight.shape, weight.dtype, weight.device)

    @property
    def weight(self) -> torch.Tensor:
        """A storage-less stand-in with the replaced weight's shape, dtype and device, for
        model code that reads ``layer.weight.dtype`` (T5 casts its hidden states to it).
        Computing with it raises instead of using wrong values; the real weight is
        :meth:`weight_fp`, built only inside this layer's forward and backward."""
        return self._weight_placeholder

    def weight_fp(self) -> torch.Tensor:
        """The fp32 weight, built in place: its own bytes plus, for int4, one nibble plane
        (half a byte per element) at a time."""
        if self.bits == 8:
            return self.qweight.float().mul_(self.scale.view(-1, 1))
        w = torch.empty(self.qweight.numel() * 2, dtype=torch.float32, device=self.qweight.device)
        w[0::2] = self.qweight & 0xF
        w[1::2] = self.qweight >> 4
        groups = w.sub_(8).view(self.out_features, -1, GROUP)
        groups.mul_(self.scale.view(self.out_features, -1, 1))
        return groups.view(self.out_features, -1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _DequantLinear.apply(x, self)
        return out + self.bias.to(out.dtype) if self.bias is not None else out


def targets(model_rows: list[dict[str, Any]]) -> list[str]:
    """Linear modules to quantize: all but the last (the head) and any named *head*, and none
    whose forward never ran (the model reads its ``.weight`` directly, as Mamba's mixer does
    ``dt_proj``'s: a quantized layer's weight is not a float tensor)."""
    linears = [r["module"] for r in model_rows if r["type"] in LINEAR_TYPES][:-1]
    unused = weight_read_directly(model_rows)
    return [n for n in linears if "head" not in n.rsplit(".", 1)[-1] and n not in unused]


def layers_to_quantize(facts: Facts) -> list[str]:
    """:func:`targets`; in a model that trains peft LoRA adapters, the frozen base layers under
    them (peft's ``base_layer``: the peft layer itself wraps the adapters)."""
    return adapted_bases(facts) if lora_adapted(facts) else targets(facts.module_rows())


def quantized_bytes(rows: list[dict[str, Any]], bits: int,
                    layers: list[str]) -> tuple[float, float]:
    """(fp bytes removed, quantized bytes added) for the Linears named in ``layers``.

    From a profile alone the bias share is unknown; it is taken as negligible (a Linear of
    n x m has n bias elements against n*m weights)."""
    names = set(layers)
    removed = added = 0.0
    for r in rows:
        if r["module"] in names:
            p = float(r["parameter"])
            elements = p / 4  # fp32 (the profile's dtype mix is fp32 for these tests)
            if bits == 8:
                added += elements * 1 + 4 * elements**0.5  # ~one scale per row
            else:
                added += elements * 0.5 + 4 * elements / GROUP
            removed += p
    return removed, added


def transform_for(facts: Facts, bits: int) -> Transform:
    """Weights quantized and frozen; inside a quantized layer (its transient moments) the
    dequantized fp32 weight is live, and its backward no longer computes a weight gradient.
    Bases already frozen under LoRA adapters keep the gradients and states (the adapters')."""
    rows = facts.module_rows()
    layers = layers_to_quantize(facts)
    removed, added = quantized_bytes(rows, bits, layers)
    trained = removed if not lora_adapted(facts) else 0.0
    frozen_fraction = trained / facts.parameter_bytes if facts.parameter_bytes else 0.0
    names = set(layers)
    own = {r["module"]: (float(r["parameter"]), float(r["gradient"])) for r in rows
           if r["module"] in names}
    frozen_before = gradients_before(facts, names)  # frozen grads the backward had made
    unpack = 1.125 if bits == 4 else 1.0  # int4: one nibble plane while the weight fills

    def transform(s: Sample) -> Sample:
        out = dict(s)
        out["parameter"] = s["parameter"] - removed
        out["buffer"] = s["buffer"] + added
        if s["phase"] == "backward" and s["module"] in frozen_before:
            out["gradient"] = max(0.0, s["gradient"] - frozen_before[s["module"]])
        else:
            out["gradient"] = s["gradient"] * (1 - frozen_fraction)
        out["optimizer_state"] = s["optimizer_state"] * (1 - frozen_fraction)
        if s["phase"] in ("forward", "backward"):
            if s.get("transient") and s["module"] in own:
                weight, weight_grad = own[s["module"]]
                dropped = weight_grad if s["phase"] == "backward" else 0.0
                out["temporary"] = s["temporary"] + weight * unpack - dropped
        elif s["phase"] == "optimizer":  # the foreach scratch covers the trained params only
            out["temporary"] = s["temporary"] * (1 - frozen_fraction)
        return out

    return transform


def _apply(bits: int, names: list[str]) -> Any:
    def apply(state: SimState) -> None:
        modules = ModuleNames(state.model)
        replaced = set()
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else state.model
            layer = getattr(parent, child)
            replaced.add(id(layer.weight))
            setattr(parent, child, QuantLinear(layer, bits))
        for g in state.param_groups:
            g["params"] = [p for p in g["params"] if id(p) not in replaced]

    return apply


def predict(facts: Facts) -> list[Change]:
    rows = facts.module_rows()
    names = layers_to_quantize(facts)
    adapted = lora_adapted(facts)
    out = []
    for bits in (8, 4):
        removed, added = quantized_bytes(rows, bits, names)
        if not names and adapted:
            out.append(not_applicable("quantization", {"weights": f"int{bits}"}, ADAPTED_REASON,
                                      group="weights"))
            continue
        if not names:
            out.append(not_applicable(
                "quantization", {"weights": f"int{bits}"},
                "no Linear layer besides the output head (convolution and embedding weights "
                "are not quantized here)", group="weights"))
            continue
        what = ("base under the model's LoRA adapters" if adapted else
                "frozen base for training" if facts.has_optimizer else "inference")
        gone = ("the adapters train as before" if adapted
                else "their grads and optimizer states go")
        out.append(
            Change(
                "quantization",
                {"weights": f"int{bits}", "layers": f"{len(names)} Linear", "use": what},
                f"{removed:.0f} B of Linear weights become {added:.0f} B of int{bits} + "
                "fp32 scales "
                f"({'per row' if bits == 8 else f'per {GROUP}'}); {gone}; "
                "one fp32 weight dequantized at a time",
                transform=transform_for(facts, bits),
                apply=_apply(bits, names),
                caveats=[
                    "embeddings, norms and the output head stay high precision",
                    "quantized weights are frozen: train adapters (LoRA) on them",
                ]
                + (["int4 error is larger: check the quality column"] if bits == 4 else []),
                quality_cost=0.5 if bits == 8 else 1.0,
                speed_cost=0.2,
                group="weights",
            )
        )
    return out
