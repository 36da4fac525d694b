"""Sharding over N GPUs: ZeRO-1/2/3, FSDP and CPU offload of the optimizer state, per rank.

Per-rank bytes from the profile's own categories (so the dtype mix is the one measured, not
assumed): with P parameter, G gradient and O optimizer-state bytes, ZeRO-1 keeps P + G + O/N;
ZeRO-2 P + G/N + O/N (plus one bucket of unsharded gradients, taken as the largest module's
gradients, and, while forward and backward run, the P/N of shards FSDP2 keeps beside the
gathered parameters); ZeRO-3 and FSDP (FULL_SHARD) (P + G + O)/N plus, while forward and
backward run, what FSDP2 gathers: the running unit's parameters and the next one's (prefetched), the
all-gather's copy of the local shard and, in backward, the running unit's unsharded gradients
before they are reduce-scattered. The units are those :func:`memprof.advisor.sharded_steps.
fsdp_units` wraps (the blocks of a ModuleList, else the root's children with parameters).
Activations, inputs and scratch stay per rank (the batch per rank is unchanged). In the step
that creates the optimizer's state (counted as scratch until the step ends) only O/N is
created. CPU offload moves O off the GPU. For mixed-precision Adam these are the 4P+12P/N,
2P+14P/N and 16P/N of the ZeRO paper (ZeRO-2 in its optimizer step).

Predicted by a fake run and simulated at every world size in one process, as rank 0 of a fake
process group (:mod:`memprof.advisor.sharded_steps`): ZeRO-1 by PyTorch's
ZeroRedundancyOptimizer, ZeRO-2 by FSDP2 without resharding after forward, ZeRO-3 by FSDP2.
The formulas above are the analytic fallback (a profile read from a file). The offload is
predicted only.
"""

from __future__ import annotations

from collections.abc import Callable

from memprof.advisor.core import (
    TRAINING_ONLY_REASON,
    Change,
    Facts,
    Sample,
    Transform,
    not_applicable,
    profile_tree,
    sparse_gradients,
)
from memprof.advisor.sharded_steps import fsdp_units, unavailable_reason
from memprof.advisor.workload import SimState

#: The stage each row runs (see :func:`memprof.advisor.sharded_steps.shard`).
STAGES = {"ZeRO-1": "zero1", "ZeRO-2": "zero2", "ZeRO-3 / FSDP": "zero3"}
#: How each stage runs, for the row's caveat.
RUN_BY = {
    "zero1": "PyTorch's ZeroRedundancyOptimizer",
    "zero2": "FSDP2 with reshard_after_forward=False",
    "zero3": "FSDP2 (fully_shard on each block, then the root)",
}
OFFLOAD_NOT_SIMULATED = (
    "the optimizer step on the CPU is not implemented here: its saving (the optimizer state) "
    "is predicted only"
)

FORMULAS = {
    "zero1": "P + G + O/N",
    "zero2": "P + G/N + O/N + one gradient bucket (+ P/N of shards in forward and backward)",
    "zero3": "(P + G + O)/N + the running and next units gathered (forward, backward)",
}


def _largest(facts: Facts, column: str) -> float:
    rows = facts.module_rows()
    leaves = [r for r in rows if r[column] > 0]
    return float(max((r[column] for r in leaves), default=0))


def largest_unit(facts: Facts) -> float:
    """The parameter bytes of the largest FSDP unit (the root's own parameters count as one)."""
    return max(unit_sizes(facts).values(), default=0.0)


def unit_sizes(facts: Facts) -> dict[str, float]:
    """The parameter bytes of each FSDP unit; the root's own parameters under ""."""
    rows = {str(r["module"]): r for r in facts.module_rows()}
    units = fsdp_units(
        profile_tree(facts.profile),
        lambda n: str(rows[n]["type"]),
        lambda n: float(rows[n]["parameter_total"]) > 0,
    )
    sizes = {u: float(rows[u]["parameter_total"]) for u in units}
    sizes[""] = max(0.0, float(facts.parameter_bytes) - sum(sizes.values()))
    return sizes


def phase_order(facts: Facts, phase: str) -> list[str]:
    """Modules in the order they first run in ``phase``, in the first profiled step that ran
    it."""
    timeline = facts.profile.timeline()
    rows = timeline[timeline["phase"] == phase]
    if not len(rows):
        return []
    first = rows[rows["step"] == rows["step"].iloc[0]]
    return list(dict.fromkeys(str(m) for m in first["module"]))


def gathered_while_running(facts: Facts) -> dict[tuple[str, str], float]:
    """ZeRO-2 (FSDP2 without resharding after forward): the gathered parameter bytes while a
    module runs, by (phase, module). A unit gathers its parameters when its forward starts and
    frees them when its backward ends; the root's own stay gathered from forward to backward.
    A module not listed (the root's own samples, which come both first and last): all."""
    sizes = unit_sizes(facts)
    root = sizes.pop("")

    def unit_of(module: str) -> str | None:
        return next((u for u in sizes if module == u or module.startswith(u + ".")), None)

    out: dict[tuple[str, str], float] = {}
    forward = phase_order(facts, "forward")
    started = {u: min((i for i, m in enumerate(forward) if unit_of(m) == u), default=-1)
               for u in sizes}
    for i, module in enumerate(forward):
        if module:
            out[("forward", module)] = root + sum(
                size for u, size in sizes.items() if 0 <= started[u] <= i)
    backward = phase_order(facts, "backward")
    ended = {u: max((i for i, m in enumerate(backward) if unit_of(m) == u), default=-1)
             for u in sizes}
    for i, module in enumerate(backward):
        if module:
            out[("backward", module)] = root + sum(
                size for u, size in sizes.items() if ended[u] < 0 or ended[u] >= i)
    return out


def shard_transform(facts: Facts, stage: str, n: int, offload: bool) -> Transform:
    largest_g = _largest(facts, "gradient")
    unit = largest_unit(facts) if stage == "zero3" else 0.0
    gathered_at = gathered_while_running(facts) if stage == "zero2" else {}
    opt = facts.profile.optimizers[0] if facts.profile.optimizers else {}
    state_total = float(opt.get("state_bytes", 0) or 0)

    def transform(s: Sample) -> Sample:
        out = dict(s)
        o = 0.0 if offload else s["optimizer_state"] / n
        out["optimizer_state"] = o
        if s["phase"] == "optimizer":
            # the state this step creates is scratch until it ends: only its share is created
            creating = max(0.0, state_total - s["optimizer_state"])
            kept = 0.0 if offload else creating / n
            out["temporary"] = max(0.0, s["temporary"] - creating + kept)
        if stage == "zero2":
            out["gradient"] = min(s["gradient"], s["gradient"] / n + largest_g)
            if s["phase"] in ("forward", "backward"):
                # each unit's shard, and its gathered parameters from forward to backward
                out["parameter"] = s["parameter"] / n
                whole = gathered_at.get((s["phase"], s["module"]), s["parameter"])
                out["other"] = s["other"] + min(whole, s["parameter"])
        if stage == "zero3":
            out["parameter"] = s["parameter"] / n
            out["gradient"] = s["gradient"] / n
            if s["phase"] in ("forward", "backward"):
                gathered = 2 * unit + unit / n
                if s["phase"] == "backward":
                    # the running unit's gradients are whole until reduce-scattered
                    running = min(unit, s["gradient"])
                    gathered += running
                    out["gradient"] = (s["gradient"] - running) / n
                out["other"] = s["other"] + gathered
        return out

    return transform


def _apply_shard(stage: str, n: int) -> Callable[[SimState], None]:
    def apply(state: SimState) -> None:
        state.shard, state.ranks = stage, n

    return apply


def run_world(facts: Facts) -> tuple[int, bool]:
    """The world size of the run the profile is one rank of (1 for a single process), and
    whether its parameters are sharded already (FSDP2: the profile counts the local shards)."""
    info = facts.profile.meta.get("distributed") or {}
    world = int(info.get("world_size", 1) or 1)
    sharded = any(e.get("kind") == "fsdp_sharded" for e in info.get("engine") or [])
    return world, sharded


def predict(facts: Facts, ranks: tuple[int, ...] = (2, 4, 8)) -> list[Change]:
    if not facts.has_optimizer:
        return [not_applicable("sharding", {}, TRAINING_ONLY_REASON, group="sharding")]
    world, sharded = run_world(facts)
    if sharded:
        return [
            not_applicable(
                "sharding",
                {"stage": "ZeRO-3 / FSDP", "ranks": world},
                f"this rank's profile is already sharded by FSDP2 across {world} rank(s): its "
                "parameters, gradients and optimizer state are the local shards",
                group="sharding",
            )
        ]
    if world > 1:  # one rank of a data-parallel run: its own world size is the first row
        ranks = (world, *(n for n in ranks if n != world))
    out = []
    why_not = unavailable_reason()
    sparse = sparse_gradients(facts)
    for n in ranks:
        for label, stage in STAGES.items():
            if sparse and stage != "zero1":
                out.append(not_applicable(
                    "sharding", {"stage": label, "ranks": n},
                    f"FSDP has no sparse-gradient kernel: {sparse} trained tensor(s) get sparse "
                    "gradients (nn.Embedding/EmbeddingBag(sparse=True)); make them dense, or "
                    "keep them out of fully_shard (ignored_params) and shard the rest",
                    group="sharding"))
                continue
            how = (
                f"run as rank 0 of {n} over a fake process group with {RUN_BY[stage]}; "
                "quality not measured (the fake collectives compute nothing)"
            )
            out.append(
                Change(
                    "sharding",
                    {"stage": label, "ranks": n},
                    f"per rank: {FORMULAS[stage]} "
                    "with the profile's P, G, O; activations unchanged",
                    transform=shard_transform(facts, stage, n, False),
                    apply=_apply_shard(stage, n) if why_not is None else None,
                    caveats=[
                        f"needs {n} GPUs and torch.distributed; {how}",
                        "communication adds step time (all-gather / reduce-scatter)",
                    ],
                    quality_cost=0.0,
                    speed_cost=0.1 * n,
                    training_only=True,
                    group="sharding",
                    not_simulated=f"not simulated: {why_not}" if why_not else "",
                )
            )
    out.append(
        Change(
            "sharding",
            {"stage": "CPU offload of optimizer state", "ranks": 1},
            "optimizer_state removed from the device (kept in host memory)",
            transform=shard_transform(facts, "offload", 1, True),
            caveats=["optimizer step runs on the CPU: slower steps; needs host memory for O"],
            quality_cost=0.0,
            speed_cost=1.0,
            training_only=True,
            group="sharding",
            not_simulated=OFFLOAD_NOT_SIMULATED,
        )
    )
    return out
