"""LoRA rows: peft adapters on a copy (simulation) and on the fake copy (prediction)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from workloads import gpt2_workload, llama_workload, mlp_workload

from memprof.advisor import Workload, changes_for, lora
from memprof.advisor.core import Change, read_facts
from memprof.advisor.fake_prediction import fake_peak
from memprof.advisor.workload import Measurement, baseline, copy_state, seeded, simulate
from memprof.units import format_bytes

pytestmark = pytest.mark.slow  # peft LoRA on transformers models, simulated and faked

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="needs memprof[finetune] (peft)")


def lora_rows(ref: Measurement) -> dict[int, Change]:
    return {c.options["rank"]: c for c in changes_for(read_facts(ref.profile))
            if c.technique == "lora"}


@needs_peft
@pytest.mark.parametrize("rank", [8, 64])
def test_gpt2_lora_fake_prediction_matches_the_simulation(rank: int) -> None:
    """GIVEN a small GPT-2 trained with AdamW, WHEN its LoRA row is run on fake tensors and
    simulated with peft on a real copy, THEN the two peaks agree within 3%, the optimizer
    holds exactly the adapters, and the user's model is untouched."""
    workload = gpt2_workload()
    with seeded():
        ref = baseline(workload)
    change = lora_rows(ref)[rank]
    assert change.apply is not None
    assert change.options["modules"] == [
        f"transformer.h.{i}.{name}" for i in range(2)
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    with seeded():
        predicted = fake_peak(workload, [change.apply])
        measured = simulate(workload, [change.apply], ref)
    assert abs(predicted - measured.peak_bytes) <= 0.03 * measured.peak_bytes
    # hand count per block (width 64, MLP 256): c_attn 64->192, attn c_proj 64->64,
    # c_fc 64->256, mlp c_proj 256->64: rank * (256 + 128 + 320 + 320) fp32 elements
    adapters = 2 * rank * (256 + 128 + 320 + 320) * 4
    assert measured.profile.optimizers[0]["parameter_bytes"] == adapters
    assert f"(adapters {format_bytes(adapters)})" in change.how  # the peak's breakdown
    # the analytic rewrite (the planner's) is close too
    assert change.predicted_peak is not None
    assert abs(change.predicted_peak - measured.peak_bytes) <= 0.05 * measured.peak_bytes
    assert all(p.requires_grad for p in workload.model.parameters())
    assert not any("lora_" in n for n, _ in workload.model.named_modules())


@needs_peft
def test_llama_lora_targets_attention_and_mlp_projections() -> None:
    workload = llama_workload()
    with seeded():
        ref = baseline(workload)
    change = lora_rows(ref)[16]
    names = {n.rsplit(".", 1)[-1] for n in change.options["modules"]}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(change.options["modules"]) == 14  # 7 per layer, 2 layers
    assert change.apply is not None
    with seeded():
        predicted = fake_peak(workload, [change.apply])
        measured = simulate(workload, [change.apply], ref)
    assert abs(predicted - measured.peak_bytes) <= 0.03 * measured.peak_bytes
    # q, o: 64->64; k, v: 64->32 (2 of 4 heads' width); gate, up: 64->128; down: 128->64
    per_layer = 2 * 128 + 2 * 96 + 3 * 192
    assert measured.profile.optimizers[0]["parameter_bytes"] == 2 * 16 * per_layer * 4
    assert measured.peak_bytes < ref.peak_bytes
    # the analytic rewrite knows a frozen RMSNorm saves about half (without: +9% on llama-gqa)
    assert change.predicted_peak is not None
    assert abs(change.predicted_peak - measured.peak_bytes) <= 0.05 * measured.peak_bytes


@needs_peft
def test_unknown_architecture_adapts_every_linear_but_the_head() -> None:
    workload = mlp_workload()
    with seeded():
        ref = baseline(workload)
    change = lora_rows(ref)[8]
    assert change.options["modules"] == ["0", "2", "4"]  # the Linear(256, 10) head is left
    assert change.apply is not None
    with seeded():
        measured = simulate(workload, [change.apply], ref)
    assert measured.profile.optimizers[0]["parameter_bytes"] == 8 * (
        (64 + 256) + (256 + 256) + (256 + 256)) * 4


def test_without_peft_the_rows_predict_and_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workload = mlp_workload()
    with seeded():
        ref = baseline(workload)
    monkeypatch.setattr(lora, "peft_available", lambda: False)
    rows = lora_rows(ref)
    assert set(rows) == set(lora.RANKS)
    for change in rows.values():
        assert change.apply is None and change.predicted_peak is not None
        assert any("memprof[finetune]" in c for c in change.caveats)


@needs_peft
def test_bf16_base_trains_fp32_adapters_and_saves_their_fp32_inputs() -> None:
    """GIVEN a bf16 GPT-2, THEN the adapters are fp32 (peft's get_peft_model default), the fake
    run is within 3% of the simulation, and the analytic rewrite counts the fp32 copies of the
    adapted layers' inputs that peft casts for lora_A (without them it was 15% under)."""
    workload = gpt2_workload()
    workload.model.to(torch.bfloat16)
    workload = Workload(workload.model, torch.optim.AdamW(workload.model.parameters()),
                        workload.batch, steps=2)
    with seeded():
        ref = baseline(workload)
    change = lora_rows(ref)[16]
    assert change.apply is not None and change.predicted_peak is not None
    state = copy_state(workload)
    change.apply(state)
    adapters = state.param_groups[0]["params"]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    with seeded():
        predicted = fake_peak(workload, [change.apply])
        measured = simulate(workload, [change.apply], ref)
    assert abs(predicted - measured.peak_bytes) <= 0.03 * measured.peak_bytes
    assert abs(change.predicted_peak - measured.peak_bytes) <= 0.05 * measured.peak_bytes
    assert measured.profile.optimizers[0]["parameter_bytes"] == 2 * 16 * 1024 * 4


def test_the_plan_prints_what_a_lora_rows_peak_holds() -> None:
    """GIVEN a plan made of a LoRA row, THEN the summary prints that row's breakdown of its peak
    (parameters with the adapters, gradients, optimizer state, activations) beside the plan."""
    from memprof.advisor.advice import Advice

    options = {"rank": 16, "targets": "2 layers"}
    how = ("2 layers get adapters; at the predicted peak (forward): parameters 1.0 MiB "
           "(adapters 64.0 KiB), gradients 64.0 KiB, optimizer state 128.0 KiB, "
           "activations 2.0 MiB, temporaries 0 B")
    row = {"technique": "lora", "options": options, "applicable": True, "how": how,
           "predicted_peak_bytes": 3 << 20, "predicted_saving_bytes": 1 << 20, "saving_pct": 25.0}
    other = {**row, "options": {"rank": 64, "targets": "2 layers"}, "how": "rank 64"}
    plan = {"changes": [{"technique": "lora", "options": options}], "explanation": "lora fits"}
    text = Advice(rows=[other, row], plan=plan, baseline_peak_bytes=4 << 20).summary()
    lines = text.splitlines()
    assert lines[-2] == "plan: lora fits"
    assert lines[-1] == "  lora (analytic breakdown) " + how[how.index("at the predicted"):]
