"""Simulation on an unchanged script (memprof.advisor.script): the change reaches the script's
own model and optimizer, is measured like a Workload simulation of the same model, and leaves
nothing behind."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
from script_runs import runner
from torch import nn
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from memprof.advisor import Workload, WorkloadSimulator, advise, changes_for
from memprof.advisor.capture import ScriptCapture
from memprof.advisor.core import Change, read_facts
from memprof.advisor.script import ScriptFailed, ScriptSimulator, untracked_copy

pytestmark = pytest.mark.slow  # runs of a training script, unchanged and per change


def tiny_workload() -> Workload:
    """The script's model, optimizer and first batch, built the same way."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = (torch.randn(16, 64), torch.randint(0, 8, (16,)))
    return Workload(model, optimizer, batch, steps=2)


def pick(changes: list[Change], technique: str, **options: object) -> Change:
    return next(
        c for c in changes
        if c.technique == technique and all(c.options.get(k) == v for k, v in options.items())
    )


@pytest.fixture(scope="module")
def measured() -> tuple[ScriptSimulator, object, list[Change]]:
    sim = ScriptSimulator(runner(), steps=2)
    reference = sim.reference()
    return sim, reference, changes_for(read_facts(reference.profile))


def test_reference_stops_after_its_steps(measured: tuple) -> None:
    sim, reference, _ = measured
    assert len(reference.profile.steps_stats) == 2
    # stopped inside the second optimizer step: its print never ran
    assert "step 0 loss" in sim.output_log and "step 1 loss" not in sim.output_log
    # parameters + gradients + AdamW's two states are all live at the optimizer step
    params = sum(p.numel() * 4 for p in tiny_workload().model.parameters())
    assert reference.peak_bytes >= 4 * params
    assert reference.final_loss is not None and reference.outputs is not None


@pytest.mark.parametrize(
    ("technique", "options"),
    [
        ("optimizer", {"to": "SGD"}),
        ("quantization", {"weights": "int8"}),
        ("pruning", {"method": "structured (hidden units of Linear pairs)"}),
        ("mixed_precision", {"mode": "autocast"}),
        ("mixed_precision", {"master_weights": True}),
    ],
)
def test_a_change_measures_as_on_a_copy_of_the_same_model(
    measured: tuple, technique: str, options: dict[str, object]
) -> None:
    sim, reference, changes = measured
    change = pick(changes, technique, **options)
    in_script = sim.measure([change], reference)
    assert not isinstance(in_script, str), in_script
    copies = WorkloadSimulator(tiny_workload())
    on_copy = copies.measure([change], copies.reference())
    assert not isinstance(on_copy, str), on_copy
    # the same model, batch and steps: the same peak, give or take the script's own loss module
    assert in_script.peak_bytes == pytest.approx(on_copy.peak_bytes, rel=0.01)
    assert in_script.loss_drift is not None


def test_optimizer_change_replaces_the_scripts_optimizer(measured: tuple) -> None:
    sim, reference, changes = measured
    result = sim.measure([pick(changes, "optimizer", to="SGD")], reference)
    assert not isinstance(result, str)
    assert [o["class"] for o in result.profile.optimizers] == ["SGD"]
    assert result.profile.peak().by_category["optimizer_state"] == 0
    assert reference.profile.peak().by_category["optimizer_state"] > 0


def test_pure_bf16_halves_parameters_in_the_script(measured: tuple) -> None:
    sim, reference, changes = measured
    result = sim.measure([pick(changes, "mixed_precision", mode="pure")], reference)
    assert not isinstance(result, str)
    before = reference.profile.peak().by_category["parameter"]
    assert result.profile.peak().by_category["parameter"] * 2 == before


def test_no_hook_or_patch_is_left_behind(measured: tuple) -> None:
    sim, reference, changes = measured
    counts = (
        len(nn.modules.module._global_forward_pre_hooks),
        len(nn.modules.module._global_forward_hooks),
        len(_global_optimizer_pre_hooks),
        len(_global_optimizer_post_hooks),
    )
    backward = torch.Tensor.backward
    sim.measure([pick(changes, "checkpointing")], reference)
    failing = ScriptSimulator(runner("--raise-at", "1"), steps=3)
    failed = failing.measure([pick(changes, "optimizer", to="SGD")], reference)
    assert isinstance(failed, str) and "boom at step 1" in failed
    assert counts == (
        len(nn.modules.module._global_forward_pre_hooks),
        len(nn.modules.module._global_forward_hooks),
        len(_global_optimizer_pre_hooks),
        len(_global_optimizer_post_hooks),
    )
    assert torch.Tensor.backward is backward


def test_a_script_that_fails_unchanged_is_an_error() -> None:
    with pytest.raises(ScriptFailed, match="boom at step 0"):
        ScriptSimulator(runner("--raise-at", "0"), steps=2).reference()


def test_advise_fills_measured_columns_from_the_script(measured: tuple) -> None:
    sim, reference, _ = measured
    advice = advise(reference.profile, simulator=sim, reference=reference, budget=10**9)
    table = advice.table()
    simulated = table[table["measured_peak_bytes"].notna()]
    assert len(simulated) >= 8
    assert set(simulated["technique"]) >= {"mixed_precision", "optimizer", "quantization"}
    assert advice.plan is not None and advice.plan["fits"]
    assert advice.simulated


@pytest.mark.parametrize("target", ["SGD", "SGD_momentum"])
def test_sgd_prediction_counts_the_weight_decay_scratch(measured: tuple, target: str) -> None:
    # AdamW's default weight decay carries over; on CPU, SGD's per-tensor step allocates
    # grad + wd * param one tensor at a time, at the optimizer-phase peak of this MLP
    sim, reference, changes = measured
    change = pick(changes, "optimizer", to=target)
    result = sim.measure([change], reference)
    assert not isinstance(result, str)
    assert result.profile.peak().phase == "optimizer"
    assert change.predicted_peak == pytest.approx(result.peak_bytes, rel=0.01)



CNN = Path(__file__).parents[1] / "examples" / "train_cnn.py"
CNN_ARGS = ("--batch", "8", "--size", "16", "--width", "8", "--steps", "3")


@pytest.fixture(scope="module")
def cnn_measured() -> tuple[ScriptSimulator, object, ScriptCapture]:
    def run() -> None:
        saved = sys.argv[:]
        sys.argv = [str(CNN), *CNN_ARGS]
        try:
            runpy.run_path(str(CNN), run_name="__main__")
        finally:
            sys.argv = saved

    sim = ScriptSimulator(run, steps=2)
    capture = ScriptCapture()
    reference = sim.reference(capture=capture)
    return sim, reference, capture


@pytest.mark.parametrize("options", [{"dtype": "bf16"}, {"dtype": "fp16", "grad_scaler": True}])
def test_a_script_measures_the_cpu_kernels_scratch(cnn_measured: tuple,
                                                    options: dict[str, object]) -> None:
    """A 16-bit convolution's CPU kernel takes scratch from the allocator (oneDNN's, or the
    slow path's columns) that no operator returns: the script's measurement sees it, as the
    fake run of the script's model charges it (counting operator outputs only, the
    measurement was 1.5% and 7.3% under the fake run on examples/train_cnn.py's defaults)."""
    sim, reference, capture = cnn_measured
    change = pick(changes_for(read_facts(reference.profile)), "mixed_precision",
                  mode="autocast", **options)
    in_script = sim.measure([change], reference)
    assert not isinstance(in_script, str), in_script
    advice = advise(reference.profile, fake_model=capture.workload(), simulate=False)
    (row,) = [r for r in advice.rows if r["technique"] == "mixed_precision"
              and r["options"] == change.options]
    assert row["predicted_by"] == "fake run"
    assert in_script.peak_bytes == pytest.approx(row["predicted_peak_bytes"], rel=0.003)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_drift_copy_is_exact_and_not_torchs(dtype: torch.dtype) -> None:
    from memprof.tracking.events import default_source
    from memprof.tracking.kernel_corrections import allocation_peak

    values = torch.randn(6, 5).to(dtype).t()  # strided, as a logits slice may be
    source = default_source()
    source.start()
    try:
        copy = untracked_copy(values)
    finally:
        events = source.stop()
    assert copy.dtype == torch.float32 and torch.equal(copy, values.float())
    assert copy.untyped_storage().data_ptr() != values.untyped_storage().data_ptr()
    # numpy's memory: the allocator events the simulation is measured by see none of it
    assert allocation_peak(events) == 0
