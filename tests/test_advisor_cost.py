"""GIVEN advice rows, THEN they are ranked by what they cost the training (no change to the
maths, small, changes the training), by saving within a tier; the planner and the headline's
best fix take the first tier that reaches the budget, not the optimizer swap."""

from __future__ import annotations

from workloads import gpt2_workload, measured, mlp_workload

from memprof.advisor import advise
from memprof.cost_tiers import (
    ADAPTERS,
    CHANGES_TRAINING,
    FROZEN,
    MORE_GPUS,
    NO_CHANGE,
    SMALL,
    TIERS,
    cost_of,
    rank,
)
from memprof.report import advice_view


def test_tiers_of_known_changes() -> None:
    assert cost_of("optimizer", {"from": "AdamW", "to": "zero_grad(set_to_none=True)"}) == NO_CHANGE
    assert cost_of("optimizer", {"from": "AdamW foreach", "to": "AdamW foreach=False"}) == NO_CHANGE
    assert cost_of("checkpointing", {"blocks": "2 of 4 blocks"}) == NO_CHANGE
    assert cost_of("batch", {"batch": 8, "micro_batch": 4, "accumulation": 2}) == NO_CHANGE
    assert cost_of("mixed_precision", {"mode": "autocast", "dtype": "bf16"}) == SMALL
    assert cost_of("optimizer", {"from": "AdamW", "to": "AdamW8bit"}) == SMALL
    assert cost_of("mixed_precision", {"mode": "pure", "dtype": "bf16",
                                       "master_weights": False}) == CHANGES_TRAINING
    assert cost_of("optimizer", {"from": "AdamW", "to": "SGD"}) == CHANGES_TRAINING
    assert cost_of("pruning", {"keep": 0.5}) == CHANGES_TRAINING
    # a quantized frozen base with no adapter trained on it: after LoRA/QLoRA
    assert cost_of("quantization", {"weights": "int8"}) == FROZEN
    assert cost_of("quantization", {"from": "AdamW", "to": "AdamW8bit"}) == SMALL
    assert cost_of("offload", {"activations": "to pinned host memory"}) == NO_CHANGE
    assert cost_of("lora", {"rank": 16}) == ADAPTERS
    assert cost_of("qlora", {"rank": 16, "base": "nf4"}) == ADAPTERS
    assert cost_of("sharding", {"stage": "ZeRO-3 / FSDP", "ranks": 8}) == MORE_GPUS
    assert cost_of("sharding", {"stage": "CPU offload of optimizer state", "ranks": 1}) == NO_CHANGE
    # adapters only when full training cannot fit; more GPUs after every single-GPU plan
    assert rank(CHANGES_TRAINING) < rank(ADAPTERS) < rank(FROZEN) < rank(MORE_GPUS)


def test_rows_carry_their_tier_and_are_ranked_by_it() -> None:
    _w, ref = measured("mlp", mlp_workload)
    advice = advise(ref.profile)
    applicable = [r for r in advice.rows if r["applicable"]]
    assert all(r["cost"] in TIERS for r in advice.rows)
    keys = [(rank(r["cost"]), -(r["predicted_saving_bytes"] or 0)) for r in applicable]
    assert keys == sorted(keys)
    # on main the first row was the largest saving whatever its cost (an optimizer swap)
    assert applicable[0]["cost"] != CHANGES_TRAINING


def test_budget_is_met_from_the_first_tier_that_reaches_it() -> None:
    _w, ref = measured("gpt2", gpt2_workload)
    free = advise(ref.profile)
    rows = [r for r in free.rows if r["applicable"] and (r["predicted_saving_bytes"] or 0) > 0]
    # sharding needs more GPUs: the planner tries it only when nothing else fits
    cheap = [r for r in rows if r["cost"] in (NO_CHANGE, SMALL) and r["technique"] != "sharding"]
    dear = [r for r in rows if r["cost"] == CHANGES_TRAINING]
    assert cheap and dear
    # a budget the best small-or-free row reaches: the plan must not swap the optimizer
    budget_peak = min(r["predicted_peak_bytes"] for r in cheap)
    advice = advise(ref.profile, budget=int(budget_peak / 0.9) + 1)
    assert advice.plan is not None and advice.plan["fits"]
    for change in advice.plan["changes"]:
        assert cost_of(change["technique"], change["options"]) in (NO_CHANGE, SMALL)
    best = advice_view.best(advice.to_dict())
    assert best is not None and best["cost"] in (NO_CHANGE, SMALL)
