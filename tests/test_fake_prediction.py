"""Predictions by fake runs: each change run on fake copies equals its simulation."""

from __future__ import annotations

import statistics
from typing import Any

import pytest
import torch
from torch import nn
from workloads import cnn_workload, gpt2_workload, mlp_workload

import memprof
from memprof.advisor import advise, changes_for, fake_prediction, read_facts
from memprof.advisor.fake_prediction import fake_peak
from memprof.advisor.workload import baseline
from memprof.tracking.events import default_source

pytestmark = pytest.mark.slow  # fake runs of every change, checked against simulations


def _fake_rows(workload_factory: object) -> tuple[list[dict[str, object]], nn.Module]:
    w = workload_factory()  # type: ignore[operator]
    before = {k: v.clone() for k, v in w.model.state_dict().items()}
    profile = baseline(w).profile
    advice = advise(profile, workload=w)
    # the user's model and optimizer are untouched: same values, no optimizer state
    after = w.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not w.optimizer.state
    return advice.rows, w.model


def test_fake_predictions_equal_the_simulated_peaks() -> None:
    errors = []
    techniques = set()
    for factory in (mlp_workload, cnn_workload):
        rows, _ = _fake_rows(factory)
        for row in rows:
            if row.get("predicted_by") != "fake run" or row.get("measured_peak_bytes") is None:
                continue
            predicted, measured = row["predicted_peak_bytes"], row["measured_peak_bytes"]
            errors.append(abs(predicted - measured) / measured)
            techniques.add(row["technique"])
            if row["technique"] != "batch":  # batch rows have no analytic model beside them
                assert row["analytic_peak_bytes"] is not None  # the analytic number stays visible
    assert {"mixed_precision", "quantization", "optimizer", "checkpointing"} <= techniques
    assert len(errors) >= 15
    assert max(errors) < 0.03
    assert statistics.median(errors) < 0.01


def test_rows_say_what_predicted_them() -> None:
    w = mlp_workload()
    profile = baseline(w).profile
    analytic = advise(profile, prediction="analytic")
    assert {r["predicted_by"] for r in analytic.rows if r["applicable"]} == {"analytic"}
    assert all(r["predicted_peak_bytes"] == r["analytic_peak_bytes"] for r in analytic.rows)
    fake = advise(profile, workload=w, simulate=False)
    by = {r["predicted_by"] for r in fake.rows if r["applicable"]}
    assert "fake run" in by
    # the ZeRO rows run as rank 0 of a fake process group; the CPU offload stays analytic
    sharded = [r for r in fake.rows if r["technique"] == "sharding" and r["applicable"]]
    assert {r["predicted_by"] for r in sharded if r["options"]["ranks"] > 1} == {"fake run"}
    assert {r["predicted_by"] for r in sharded if r["options"]["ranks"] == 1} == {"analytic"}
    assert all(r["measured_peak_bytes"] is None for r in fake.rows)  # simulate=False


def test_a_fake_run_allocates_nothing_of_the_models_size() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512))  # 16 MiB
    w = memprof.advisor.Workload(model, torch.optim.AdamW(model.parameters()),
                                 (torch.randn(64, 512), torch.randn(64, 512)))
    fake_peak(w)  # measures the kernels' scratch on real tensors once per shape (cached) ...
    source = default_source()
    source.start()
    try:
        peak = fake_peak(w)
    finally:
        events = source.stop()
    largest = max((size for _, ptr, size in events if ptr >= 0 and size > 0), default=0)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert peak > 3 * params  # weights, gradients, two Adam states: all counted ...
    assert largest < params // 8  # ... none allocated (a weight matrix alone is 4 MiB)


def _two_step_peak(monkeypatch: pytest.MonkeyPatch, w: Any, applies: list[Any]) -> int:
    """The old way: two profiled steps, the first making the optimizer state."""
    with monkeypatch.context() as m:
        m.setattr(fake_prediction, "_warm_optimizer", lambda workload, state: None)
        return fake_peak(w, applies)


def _counted_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets the step count of every profiled fake run from now on."""
    steps: list[int] = []
    real_steps = fake_prediction._steps

    def counting(*args: Any, **kwargs: Any) -> bool:
        steps.append(kwargs["steps"])
        return bool(real_steps(*args, **kwargs))

    monkeypatch.setattr(fake_prediction, "_steps", counting)
    return steps


def test_one_profiled_step_after_a_warm_up_equals_two_profiled_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a small GPT-2 and the changes that act on the optimizer and its state
    w = gpt2_workload()
    changes = changes_for(read_facts(baseline(w).profile))
    picked = [c for c in changes if c.applicable and c.apply is not None and (
        c.options.get("to") in ("SGD", "AdamW8bit", "Adafactor")
        or c.options.get("grad_scaler"))]
    assert len(picked) == 4
    steps = _counted_steps(monkeypatch)
    # WHEN each is predicted by one profiled step (state made by the warm-up) and by two
    for applies in ([], *([c.apply] for c in picked)):
        one = fake_peak(w, applies)
        assert steps[-1] == 1
        # THEN the peaks are the same bytes
        assert one == _two_step_peak(monkeypatch, w, applies)


def test_master_weights_run_their_two_profiled_steps_once(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    # fp32 master weights get their gradients in a step pre-hook: the one-step run took them
    # for parameters without a gradient and was always made again (three steps, not two)
    w = gpt2_workload()
    change = next(c for c in changes_for(read_facts(baseline(w).profile))
                  if c.options.get("master_weights") and c.apply is not None)
    steps = _counted_steps(monkeypatch)
    peak = fake_peak(w, [change.apply])
    assert steps == [fake_prediction.FAKE_STEPS]
    assert peak == _two_step_peak(monkeypatch, w, [change.apply])


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(64, 64)
        self.unused = nn.Linear(64, 1024)  # never called: a real run gives it no state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_a_parameter_without_gradient_falls_back_to_two_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = _WithUnused()
    w = memprof.advisor.Workload(model, torch.optim.AdamW(model.parameters()),
                                 (torch.randn(8, 64), torch.randn(8, 64)), steps=2)
    real = baseline(w).peak_bytes
    fake = fake_peak(w)
    # the warm-up's state for the unused layer (512 KiB) is not counted: the run is redone
    assert fake == _two_step_peak(monkeypatch, w, [])
    assert abs(fake - real) / real < 0.01


def test_the_warm_up_skips_only_updates_that_keep_their_tensors_shapes() -> None:
    # GIVEN the ops an optimizer's warm-up step may issue
    aten = torch.ops.aten
    # WHEN the warm-up's mode classifies them
    kinds = {op: fake_prediction._skippable(op) for op in (
        aten._foreach_lerp_.Scalar, aten.addcdiv_.default, aten.mul_.Tensor,
        aten._foreach_sqrt.default, aten.zeros_like.default, aten.copy_.default,
        aten.resize_.default, aten.t_.default, aten.add.Tensor)}
    # THEN in-place pointwise and _foreach_*_ updates are skipped (values are never read), and
    # ops that make tensors or may change a tensor's shape run
    assert kinds == {
        aten._foreach_lerp_.Scalar: 1, aten.addcdiv_.default: 2, aten.mul_.Tensor: 2,
        aten._foreach_sqrt.default: 0, aten.zeros_like.default: 0, aten.copy_.default: 0,
        aten.resize_.default: 0, aten.t_.default: 0, aten.add.Tensor: 0}


def test_a_fake_run_warns_nothing_about_memprofs_own_reads() -> None:
    """GIVEN an MLP WHEN its step is fake-run THEN memprof's reads of the fake parameters'
    storages raise no warning (the per-layer geometry read their addresses: PyTorch warned
    "Accessing the data pointer of FakeTensor" into every first ``memprof advise``)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fake_peak(mlp_workload()) > 0
    assert not [w for w in caught if "data pointer of FakeTensor" in str(w.message)]


def test_structured_pruning_runs_fake_and_matches_its_simulation() -> None:
    # Picking heads by score read fake values (.tolist()) and the row fell back to analytic.
    # On fake tensors the first units are kept: the bytes are those of any choice.
    w = gpt2_workload()
    profile = baseline(w).profile
    change = next(c for c in changes_for(read_facts(profile)) if c.technique == "pruning"
                  and "heads" in str(c.options.get("method")))
    assert change.apply is not None
    predicted = fake_peak(w, [change.apply])
    rows = advise(profile, workload=w).rows
    row = next(r for r in rows if r["technique"] == "pruning"
               and "heads" in str(r["options"].get("method")))
    assert row["predicted_by"] == "fake run"
    assert row["predicted_peak_bytes"] == predicted
    assert abs(predicted - row["measured_peak_bytes"]) <= 0.01 * row["measured_peak_bytes"]


@pytest.mark.parametrize("factory", [gpt2_workload, cnn_workload], ids=["gpt2", "cnn"])
def test_structured_pruning_on_fake_tensors_scores_nothing_and_builds_the_same_shapes(
        factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a model with structured pairs (GPT-2's heads and MLP units; a CNN's channels)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memprof.advisor.workload import copy_state

    w = factory()
    change = next(c for c in changes_for(read_facts(baseline(w).profile))
                  if c.technique == "pruning"
                  and str(c.options.get("method")).startswith("structured"))
    assert change.apply is not None
    ops: list[str] = []
    dispatch = FakeTensorMode.__torch_dispatch__

    def recording(self: Any, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        ops.append(func.overloadpacket.__name__)
        return dispatch(self, func, types, args, kwargs)

    # WHEN it is applied to a fake copy (recording the fake ops) and to a real one
    mode = fake_prediction.fake_mode()
    with mode:
        fake = fake_prediction.fake_state(w, mode)
        monkeypatch.setattr(FakeTensorMode, "__torch_dispatch__", recording)
        change.apply(fake)
        monkeypatch.undo()
    real = copy_state(w)
    change.apply(real)
    # THEN no unit was scored on fake tensors (no abs, no sum), and every parameter has the
    # shape the real pruning gives it, in the optimizer's groups too
    assert ops and not {"abs", "sum"} & set(ops)

    def shapes(state: Any) -> list[Any]:
        return ([(n, tuple(p.shape)) for n, p in state.model.named_parameters()],
                [[tuple(p.shape) for p in g["params"]] for g in state.param_groups])

    assert shapes(fake) == shapes(real)


def test_the_8_bit_step_on_fake_tensors_runs_one_update_per_layout_and_the_same_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a small GPT-2's AdamW8bit row (8-bit and fp32-moment parameters)
    from memprof.advisor import optimizer as lowbit

    w = gpt2_workload()
    change = next(c for c in changes_for(read_facts(baseline(w).profile))
                  if c.options.get("to") == "AdamW8bit" and c.apply is not None)
    chunks: list[int] = []
    real_chunk = lowbit.AdamW8bit._chunk

    def counting(*args: Any) -> None:
        chunks.append(1)
        real_chunk(*args)

    monkeypatch.setattr(lowbit.AdamW8bit, "_chunk", staticmethod(counting))
    # WHEN its fake run updates only the largest parameter of each layout, and every one
    one = fake_peak(w, [change.apply])
    ran = len(chunks)
    monkeypatch.setattr(lowbit, "ONE_UPDATE_PER_LAYOUT", False)
    every = fake_peak(w, [change.apply])
    # THEN the peak is the same to the byte; the state is made without a step, and the
    # profiled step updates one 8-bit parameter instead of all
    assert one == every
    eight_bit = sum(lowbit.quantized(p.numel()) for p in w.model.parameters())
    assert eight_bit >= 5
    assert ran == 1
    assert len(chunks) - ran == eight_bit
