"""Activation offloading: what autograd saves goes to (pinned) host memory until backward.

``torch.autograd.graph.save_on_cpu(pin_memory=True)`` around the forward: its pack hook copies
every tensor autograd saves into a new pinned host tensor (a view is copied at its own size; a
Linear's saved weight is copied too), its unpack hook copies it back to the device when the
node's backward runs, and the host copy is freed once that node is done. Alone, and after
checkpointing every block (the blocks then keep only their inputs, which the checkpoint
holds on the device; what runs outside them, the head and the loss, is offloaded).

On a GPU (a CUDA profile, or an estimate modelling CUDA): the device keeps parameters,
gradients, optimizer state, inputs and the working set of the running op; the saved tensors
come back only while their node's backward runs. The fake run models exactly that (see
:func:`offload_hooks` with ``device_model=True``): its pack hook records the bytes a pinned
copy would take (the host ledger) and allocates nothing on the fake device, which stands for
the GPU; its unpack hook allocates the device copy anew. The host side is the largest sum of
copies alive; the transfer is those bytes twice a step (device to host in forward, back in
backward) over PCIe, stated at :data:`PCIE_BYTES_PER_S`.

On the CPU host and device are one memory: the copies sit beside whatever else still holds
the originals, so offloading saves nothing there (a view saved by autograd is even copied at
its own size). The simulation then measures that total, and the fake run of a CPU profile
runs the real ``save_on_cpu`` on fake tensors to predict the same; the device figures for a
GPU are modelled, and the host ledger is checked against the one the simulation keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from memprof.advisor import checkpointing
from memprof.advisor.core import (
    MATMUL_TYPES,
    TRAINING_ONLY_REASON,
    Change,
    Facts,
    ModuleNames,
    Sample,
    Transform,
    not_applicable,
    predict_peak,
    scaled,
)
from memprof.advisor.mixed_precision import target_device
from memprof.advisor.workload import SimState, StepFn
from memprof.units import format_bytes

#: Host-to-device bandwidth the transfer cost is stated at: PCIe 4.0 x16 with pinned memory
#: (about 25 GB/s of its 32 GB/s in practice; PCIe 5.0 doubles it).
PCIE_BYTES_PER_S = 25e9


@dataclass
class HostLedger:
    """Bytes of host copies alive and the most alive at once."""

    live: int = 0
    peak: int = 0
    copied: int = 0  # bytes copied to the host, all steps together

    def add(self, nbytes: int) -> None:
        self.live += nbytes
        self.copied += nbytes
        self.peak = max(self.peak, self.live)

    def release(self, nbytes: int) -> None:
        self.live -= nbytes


class _Held:
    """One packed tensor: keeps the host copy (or, in the device model, only its size) and
    returns its bytes to the ledger when autograd lets it go."""

    def __init__(self, ledger: HostLedger, nbytes: int, tensor: torch.Tensor | None,
                 shape: torch.Size, dtype: torch.dtype) -> None:
        self.ledger, self.nbytes, self.tensor = ledger, nbytes, tensor
        self.shape, self.dtype = shape, dtype
        ledger.add(nbytes)

    def __del__(self) -> None:
        self.ledger.release(self.nbytes)


def offload_hooks(ledger: HostLedger, *, device_model: bool) -> Any:
    """``save_on_cpu(pin_memory=True)``'s hooks with a host ledger around them; with
    ``device_model`` the host copy is not made (see the module docstring: on fake tensors the
    one fake device stands for the GPU, so a copy there would be counted as device memory)."""
    if device_model:
        def pack(t: torch.Tensor) -> tuple[torch.device, _Held]:
            return t.device, _Held(ledger, t.numel() * t.element_size(), None, t.size(), t.dtype)

        def unpack(packed: tuple[torch.device, _Held]) -> torch.Tensor:
            device, held = packed
            return torch.empty(held.shape, dtype=held.dtype, device=device)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    inner = torch.autograd.graph.save_on_cpu(pin_memory=True)

    def pack_real(t: torch.Tensor) -> tuple[torch.device, _Held]:
        device, copy = inner.pack_hook(t)
        return device, _Held(ledger, copy.numel() * copy.element_size(), copy, copy.size(),
                             copy.dtype)

    def unpack_real(packed: tuple[torch.device, _Held]) -> torch.Tensor:
        device, held = packed
        assert held.tensor is not None
        out: torch.Tensor = inner.unpack_hook((device, held.tensor))
        return out

    return torch.autograd.graph.saved_tensors_hooks(pack_real, unpack_real)


def _wrap(ledger: HostLedger, device_model: bool) -> Callable[[StepFn], StepFn]:
    def wrap(loss_of: StepFn) -> StepFn:
        def step(model: torch.nn.Module, batch: Any) -> torch.Tensor:
            with offload_hooks(ledger, device_model=device_model):
                return loss_of(model, batch)

        return step

    return wrap


def offload_apply(
    device: str, blocks: list[str], ledger: HostLedger
) -> Callable[[SimState], None]:
    """Checkpoint ``blocks``, then offload the forward's saved tensors, counting the host
    copies in ``ledger``; on a fake model with ``device`` "cuda", the device model."""

    def apply(state: SimState) -> None:
        from memprof.advisor.fake_prediction import is_fake_model

        modules = ModuleNames(state.model)
        for name in blocks:
            checkpointing.wrap(modules[name])
        device_model = device == "cuda" and is_fake_model(state.model)
        state.wrap_step.append(_wrap(ledger, device_model))

    return apply


def device_transform(facts: Facts) -> Transform:
    """On a GPU: no saved tensor stays on the device, except, while a module's backward runs,
    its own saved tensors copied back (its ``activation`` column)."""
    own = {str(r["module"]): float(r["activation"]) for r in facts.module_rows()}

    def transform(s: Sample) -> Sample:
        out = dict(s)
        back = own.get(str(s["module"]), 0.0) if s["phase"] == "backward" else 0.0
        out["activation"] = min(s["activation"], back)
        return out

    return transform


def _then(first: Transform, second: Transform) -> Transform:
    return lambda s: second(first(s))


def saved_weight_bytes(facts: Facts) -> float:
    """Bytes of the matmul/convolution weights (tied ones counted by each user) that their
    layers save for backward: save_on_cpu copies them too."""
    total = 0.0
    for m in facts.profile.modules_stats:
        if m.type in MATMUL_TYPES:
            total += float((m.geometry or {}).get("parameter_bytes", m.own.get("parameter", 0)))
    return total


def host_bytes(facts: Facts) -> float:
    """Host copies at most alive: the most activation bytes the profile saw at once and the
    weights the layers saved (views are copied at their own size: a little more)."""
    most = max((float(s["activation"]) for s in facts.samples), default=0.0)
    return most + saved_weight_bytes(facts) if most else 0.0


def cpu_transform(facts: Facts) -> Transform:
    """On the CPU the saved weights' copies join the activations, in proportion to how much of
    the forward's saving has happened (the copies of the activations replace them)."""
    most = max((float(s["activation"]) for s in facts.samples), default=0.0)
    grow = saved_weight_bytes(facts) / most if most else 0.0
    return scaled(activation=1.0 + grow)


def predict(facts: Facts) -> list[Change]:
    if not facts.has_optimizer:
        return [not_applicable("offload", {}, TRAINING_ONLY_REASON, group="offload")]
    device = target_device(facts)
    host = host_bytes(facts)
    if host <= 0:
        return [not_applicable("offload", {}, "the profile saved no activations to offload",
                               group="offload")]
    seconds = 2 * host / PCIE_BYTES_PER_S
    transfer = (f"transfer: at least {format_bytes(2 * host)} a step over PCIe "
                f"(~{1e3 * seconds:.1f} ms at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s), overlapped "
                "with compute only in part")
    where = (
        "on a GPU the device keeps no saved tensor but the running node's (modelled: the fake "
        "run allocates each one again when backward unpacks it)"
        if device == "cuda" else
        "on the CPU host and device are one memory: the copies sit beside the originals, so "
        "nothing is saved here; on a GPU the device would keep no saved tensor but the running "
        "node's (modelled, not measured here)"
    )
    names, _dropped, _kept, _recompute, order = checkpointing.plan_blocks(facts, 1.0)
    variants: list[tuple[dict[str, Any], list[str], Transform]] = [
        ({"activations": "to pinned host memory"}, [],
         device_transform(facts) if device == "cuda" else cpu_transform(facts)),
    ]
    if names:
        ckpt = checkpointing.transform_for(facts, order)
        variants.append((
            {"activations": "to pinned host memory",
             "checkpointing": f"{len(names)} blocks", "modules": names},
            # on the CPU: inside checkpointed blocks the checkpoint's own hooks save, not
            # save_on_cpu's, so no weight there is copied (measured: within 1% without them)
            names, _then(ckpt, device_transform(facts)) if device == "cuda" else ckpt,
        ))
    out = []
    for options, blocks, transform in variants:
        ledger = HostLedger()
        # the pair with checkpointing is shown, not planned: the planner composes the
        # offload row with a checkpointing row itself (one wrap per block)
        out.append(Change(
            "offload",
            options,
            "torch.autograd.graph.save_on_cpu(pin_memory=True) around the forward"
            + (f", after checkpointing {len(blocks)} blocks (their inputs stay on the device)"
               if blocks else "")
            + f"; host: about {format_bytes(host)} pinned (the most activation bytes alive and "
            "the weights the layers save)"
            + f"; {where}; {transfer}",
            transform=None if blocks else transform,
            predicted_peak=predict_peak(facts, [transform]) if blocks else None,
            apply=offload_apply(device, blocks, ledger),
            caveats=[
                "no change to the maths: the step is slower by the transfers it cannot hide",
                "save_on_cpu copies every saved tensor, a Linear's saved weight included, and "
                "copies it back in backward: host bytes and transfers exceed the activations",
                *(["on the CPU it saves nothing: measured and predicted here is host plus "
                   "device, one memory"] if device != "cuda" else []),
            ],
            quality_cost=0.0,
            speed_cost=0.5 + (0.33 if blocks else 0.0),
            training_only=True,
            group="offload",
        ))
    return out
