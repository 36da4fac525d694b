"""Sharding over N GPUs: ZeRO-1/2/3, FSDP and CPU offload of the optimizer state, per rank.

Per-rank bytes from the profile's own categories at the peak (so the dtype mix is the one
measured, not assumed): with P parameter, G gradient and O optimizer-state bytes,
ZeRO-1 keeps P + G + O/N; ZeRO-2 P + G/N + O/N (plus one bucket of unsharded gradients,
taken as the largest module's gradients); ZeRO-3 and FSDP (FULL_SHARD) (P + G + O)/N plus the
largest module's parameters and gradients gathered at a time. Activations, inputs and scratch
stay per rank (the batch per rank is unchanged). CPU offload moves O off the GPU. For
mixed-precision Adam these are the 4P+12P/N, 2P+14P/N and 16P/N of the ZeRO paper.
Not simulated: it needs N processes on N devices.
"""

from __future__ import annotations

from memprof.advisor.core import (
    TRAINING_ONLY_REASON,
    Change,
    Facts,
    Sample,
    Transform,
    not_applicable,
)

FORMULAS = {
    "zero1": "P + G + O/N",
    "zero2": "P + G/N + O/N + one gradient bucket",
    "zero3": "(P + G + O)/N + the largest module gathered",
}


def _largest(facts: Facts, column: str) -> float:
    rows = facts.module_rows()
    leaves = [r for r in rows if r[column] > 0]
    return float(max((r[column] for r in leaves), default=0))


def shard_transform(facts: Facts, stage: str, n: int, offload: bool) -> Transform:
    largest_p = _largest(facts, "parameter")
    largest_g = _largest(facts, "gradient")

    def transform(s: Sample) -> Sample:
        out = dict(s)
        o = 0.0 if offload else s["optimizer_state"] / n
        out["optimizer_state"] = o
        if stage in ("zero2", "zero3", "fsdp"):
            out["gradient"] = min(s["gradient"], s["gradient"] / n + largest_g)
        if stage in ("zero3", "fsdp"):
            out["parameter"] = min(s["parameter"], s["parameter"] / n + largest_p)
        return out

    return transform


def predict(facts: Facts, ranks: tuple[int, ...] = (2, 4, 8)) -> list[Change]:
    if not facts.has_optimizer:
        return [not_applicable("sharding", {}, TRAINING_ONLY_REASON, group="sharding")]
    out = []
    for n in ranks:
        for stage, label in (("zero1", "ZeRO-1"), ("zero2", "ZeRO-2"), ("zero3", "ZeRO-3 / FSDP")):
            out.append(
                Change(
                    "sharding",
                    {"stage": label, "ranks": n},
                    f"per rank: {FORMULAS[stage]} "
                    "with the profile's P, G, O; activations unchanged",
                    transform=shard_transform(facts, stage, n, False),
                    caveats=[
                        f"needs {n} GPUs and torch.distributed; not simulated here",
                        "communication adds step time (all-gather / reduce-scatter)",
                    ],
                    quality_cost=0.0,
                    speed_cost=0.1 * n,
                    training_only=True,
                    group="sharding",
                )
            )
    out.append(
        Change(
            "sharding",
            {"stage": "CPU offload of optimizer state", "ranks": 1},
            "optimizer_state removed from the device (kept in host memory)",
            transform=shard_transform(facts, "offload", 1, True),
            caveats=[
                "optimizer step runs on the CPU: slower steps; needs host memory for O",
                "not simulated here",
            ],
            quality_cost=0.0,
            speed_cost=1.0,
            training_only=True,
            group="sharding",
        )
    )
    return out
