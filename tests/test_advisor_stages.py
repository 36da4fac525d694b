"""Workloads of several optimizers and backward passes per step (issue #25): a GAN's D step
then G step, SparseAdam beside Adam."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import script_runs
import torch
from torch import nn

import memprof
from memprof.advisor import advise
from memprof.advisor.fake_prediction import fake_peak
from memprof.advisor.optimizer import _make
from memprof.advisor.workload import Stage, Workload, baseline, seeded, simulate

_BCE = nn.BCEWithLogitsLoss()


class _GAN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gen = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32))
        self.disc = nn.Sequential(nn.Linear(32, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.gen(z)


def _d_loss(net: nn.Module, batch: Any, carry: dict[str, Any]) -> torch.Tensor:
    real, z = batch
    carry["fake"] = fake = net(z)
    on_real, on_fake = net.disc(real), net.disc(fake.detach())
    return _BCE(on_real, torch.ones_like(on_real)) + _BCE(on_fake, torch.zeros_like(on_fake))


def _g_loss(net: nn.Module, batch: Any, carry: dict[str, Any]) -> torch.Tensor:
    on_fake = net.disc(carry["fake"])
    return _BCE(on_fake, torch.ones_like(on_fake))


def _gan() -> tuple[_GAN, torch.optim.Optimizer, torch.optim.Optimizer, list[torch.Tensor]]:
    torch.manual_seed(0)
    gan = _GAN()
    opt_d = torch.optim.Adam(gan.disc.parameters(), lr=2e-4)
    opt_g = torch.optim.Adam(gan.gen.parameters(), lr=2e-4)
    return gan, opt_d, opt_g, [torch.randn(8, 32), torch.randn(8, 16)]


def _gan_workload(gan: _GAN, opt_d: Any, opt_g: Any, batch: Any) -> Workload:
    return Workload(gan, None, batch, steps=3,
                    stages=[Stage([opt_d], _d_loss, zero_grad="before"),
                            Stage([opt_g], _g_loss, zero_grad="before")])


def test_a_gan_workload_runs_both_stages_as_the_loop_does() -> None:
    """GIVEN a GAN loop (D's zero_grad, backward and Adam step, then G's) profiled as the user
    runs it WHEN the same step is a Workload of two stages THEN its simulation peaks where the
    loop did (D's gradients from G's backward alive into the next step, G's freed by G's
    zero_grad), and a fake run of it and of a change (both Adams to SGD) match their
    simulations: a Workload was one optimizer and one loss, and could not express it."""
    gan, opt_d, opt_g, batch = _gan()
    with memprof.profile(gan) as prof:
        for _ in range(3):
            carry: dict[str, Any] = {}
            opt_d.zero_grad()
            d_loss = _d_loss(gan, batch, carry)
            d_loss.backward()
            opt_d.step()
            del d_loss
            opt_g.zero_grad()
            loss = _g_loss(gan, batch, carry)
            loss.backward()
            opt_g.step()
            del carry, loss
            prof.step()
    profiled = prof.profile.peak().total_bytes
    gan, opt_d, opt_g, batch = _gan()
    workload = _gan_workload(gan, opt_d, opt_g, batch)
    with seeded():
        reference = baseline(workload)
    assert reference.peak_bytes == profiled
    params = sum(p.numel() * 4 for p in gan.parameters())
    # parameters, their gradients (each optimizer zeroes its own at its stage's start: both
    # live between steps), Adam's two moments and 4-byte step count per tensor, the batch
    end = reference.profile.steps_stats[-1].end_bytes
    steps = 4 * len(list(gan.parameters()))
    assert end == 4 * params + steps + sum(t.numel() * 4 for t in batch)
    # the fake run (dispatch ledger) to a scalar the events backend counts
    assert abs(fake_peak(workload) - reference.peak_bytes) <= 16
    to_sgd = _make("SGD", {"lr": 1e-3})
    with seeded():
        measured = simulate(workload, [to_sgd], reference).peak_bytes
    assert measured < reference.peak_bytes
    assert abs(fake_peak(workload, [to_sgd]) - measured) <= 16
    assert all(p.grad is None for p in gan.parameters())  # the user's model is untouched


def test_every_stage_steps_its_own_optimizers_in_order() -> None:
    """GIVEN one backward followed by two optimizers over parts of one model WHEN a simulation
    runs it THEN both optimizers step (each part's parameters change) and both keep state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    first = torch.optim.Adam(model[0].parameters())
    second = torch.optim.SGD(model[1].parameters(), lr=0.1, momentum=0.9)
    workload = Workload(model, None, torch.randn(4, 8), steps=2,
                        stages=[Stage([first, second],
                                      lambda net, x, carry: net(x).pow(2).mean())])
    assert workload.optimizer is first
    with seeded():
        run = baseline(workload)
    # Adam's two moments and step counts over layer 0, SGD's momentum over layer 1, the batch
    sizes = [sum(p.numel() * 4 for p in layer.parameters()) for layer in model]
    end = run.profile.steps_stats[-1].end_bytes
    assert end == sum(sizes) + 2 * sizes[0] + 2 * 4 + sizes[1] + 4 * 8 * 4


def test_a_stage_rejects_an_unknown_zero_grad_place() -> None:
    with pytest.raises(ValueError, match="zero_grad"):
        Stage([torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1)], _g_loss, zero_grad="mid")


def test_gan_advice_rows_are_fake_runs_within_three_percent() -> None:
    """GIVEN the GAN's profile and its two-stage Workload WHEN advised THEN the rows predicted
    by fake runs are within 3% of their simulations."""
    gan, opt_d, opt_g, batch = _gan()
    workload = _gan_workload(gan, opt_d, opt_g, batch)
    with seeded():
        reference = baseline(workload)
    advice = advise(reference.profile, workload=workload)
    compared = [r for r in advice.rows if r.get("error_pct") is not None
                and r.get("predicted_by") == "fake run"]
    assert len(compared) >= 10
    assert all(r["error_pct"] <= 3.0 for r in compared), [
        (r["technique"], r["options"], r["error_pct"]) for r in compared if r["error_pct"] > 3]


_TWO = Path(__file__).parent / "data" / "train_two_optimizers.py"


def _script(*argv: str) -> Callable[[], None]:
    return script_runs.runner(*argv, script=_TWO)


def test_a_script_stepping_two_optimizers_is_captured_with_both() -> None:
    """GIVEN a script whose one backward is followed by Adam's step over the body and SGD's
    (momentum) over a large head WHEN ``memprof advise SCRIPT.py`` captures it THEN its
    Workload steps both (the capture kept the first only: the fake run had no momentum) and
    the fake run peaks where the script did."""
    from memprof.advisor.capture import ScriptCapture
    from memprof.advisor.script import ScriptSimulator

    capture = ScriptCapture()
    measured = ScriptSimulator(_script(), steps=4).reference(capture=capture).peak_bytes
    workload = capture.workload()
    assert [type(o).__name__ for o in workload.optimizer_list()] == ["Adam", "SGD"]
    assert workload.batch_in_step  # the script makes its batch in the step
    assert abs(fake_peak(workload) - measured) / measured < 0.01


def test_a_gan_script_is_refused_with_the_reason() -> None:
    """GIVEN a GAN script (the discriminator is a second model with its own optimizer) WHEN
    captured THEN the reason names the optimizer outside the model (it said "the optimizer
    steps none of the model's parameters")."""
    from memprof.advisor.capture import CaptureError, ScriptCapture
    from memprof.advisor.script import ScriptSimulator

    capture = ScriptCapture()
    ScriptSimulator(_script("--gan"), steps=4).reference(capture=capture)
    with pytest.raises(CaptureError, match="outside the first module called"):
        capture.workload()


def test_a_fake_sparse_gradient_has_an_entry_per_looked_up_index() -> None:
    """GIVEN an ``nn.EmbeddingBag(sparse=True)`` stepped by SparseAdam on fake tensors (a fake
    run) WHEN its backward and step run THEN the gradient holds one entry per index, as the
    CPU kernel's does, and coalesce and the step's masks keep them (PyTorch's fake kernels
    made none: the pattern zoo's recommender's fake run was 9.5% below its simulation)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memprof import fake_kernels

    indices = torch.randint(0, 500, (64,), generator=torch.Generator().manual_seed(0))
    offsets = torch.arange(0, 64, 8)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_kernels.active(), mode:
        bag = nn.EmbeddingBag(500, 16, mode="sum", sparse=True)
        optimizer = torch.optim.SparseAdam(list(bag.parameters()))
        bag(mode.from_tensor(indices), mode.from_tensor(offsets)).sum().backward()
        grad = bag.weight.grad
        assert grad is not None and grad.is_sparse and grad._nnz() == 64
        assert grad.coalesce()._nnz() == 64  # at most as many: repeated indices merge
        optimizer.step()
    # outside memprof's fake runs, PyTorch's own kernels
    with FakeTensorMode(allow_non_fake_inputs=True) as other:
        bag = nn.EmbeddingBag(500, 16, mode="sum", sparse=True)
        bag(other.from_tensor(indices), other.from_tensor(offsets)).sum().backward()
        assert bag.weight.grad is not None and bag.weight.grad._nnz() == 0


class _Recommender(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(2000, 32, mode="sum", sparse=True)
        self.head = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(indices, offsets))


def test_sparse_adam_beside_adam_is_predicted_by_its_fake_run() -> None:
    """GIVEN a recommender whose sparse embedding SparseAdam steps and whose dense head Adam
    steps, after one backward, as a one-stage Workload WHEN its step is run on fake tensors
    THEN the peak is the simulation's within 1% (the sparse gradient and the step's sparse
    temporaries were not counted: 9.5% below on the pattern zoo's recommender)."""
    torch.manual_seed(0)
    model = _Recommender()
    sparse = torch.optim.SparseAdam(list(model.emb.parameters()))
    dense = torch.optim.Adam(list(model.head.parameters()))
    batch = [torch.randperm(2000)[:256].clone(), torch.arange(0, 256, 8)]  # distinct indices
    workload = Workload(model, None, batch, steps=2, stages=[
        Stage([sparse, dense], lambda net, value, carry: net(*value).pow(2).mean())])
    with seeded():
        measured = baseline(workload).peak_bytes
    assert abs(fake_peak(workload) - measured) / measured < 0.01


def test_lora_adapters_go_to_the_optimizer_of_the_layers_they_adapt() -> None:
    """GIVEN SparseAdam over a sparse embedding and Adam over the head WHEN LoRA adapts a head
    layer THEN Adam trains the adapters (they went to the first group's optimizer, SparseAdam,
    which refuses dense gradients: every LoRA and QLoRA row of the pattern failed) and the fake
    run predicts the simulation."""
    pytest.importorskip("peft")
    from memprof.advisor.lora import lora_apply

    torch.manual_seed(0)
    model = _Recommender()
    sparse = torch.optim.SparseAdam(list(model.emb.parameters()))
    dense = torch.optim.Adam(list(model.head.parameters()))
    batch = [torch.randperm(2000)[:256].clone(), torch.arange(0, 256, 8)]
    workload = Workload(model, None, batch, steps=2, stages=[
        Stage([sparse, dense], lambda net, value, carry: net(*value).pow(2).mean())])
    adapt = lora_apply(8, ["head.0"])
    with seeded():
        reference = baseline(workload)
        measured = simulate(workload, [adapt], reference)
    assert [s["class"] for s in measured.profile.optimizers] == ["Adam"]
    assert abs(fake_peak(workload, [adapt]) - measured.peak_bytes) <= 64


def _recommender_workload() -> tuple[_Recommender, Workload]:
    torch.manual_seed(0)
    model = _Recommender()
    sparse = torch.optim.SparseAdam(list(model.emb.parameters()))
    dense = torch.optim.Adam(list(model.head.parameters()))
    batch = [torch.randperm(2000)[:256].clone(), torch.arange(0, 256, 8)]
    return model, Workload(model, None, batch, steps=2, stages=[
        Stage([sparse, dense], lambda net, value, carry: net(*value).pow(2).mean())])


def test_zero1_shards_each_optimizer_in_its_own_class() -> None:
    """GIVEN SparseAdam over a sparse embedding and Adam over the head WHEN ZeRO-1 on 2 ranks is
    simulated THEN each optimizer is its own ZeroRedundancyOptimizer (both were SparseAdam's,
    which refused the head's dense gradients: every ZeRO-1 row of the pattern failed), rank 0
    keeps the state of its share (the embedding, the largest head weight) and the fake run
    predicts the simulation within 3%."""
    from memprof.advisor import sharded_steps
    from memprof.advisor.sharding import _apply_shard

    if sharded_steps.unavailable_reason():
        pytest.skip(sharded_steps.unavailable_reason())
    model, workload = _recommender_workload()
    zero1 = _apply_shard("zero1", 2)
    with seeded():
        reference = baseline(workload)
        measured = simulate(workload, [zero1], reference)
    # rank 0's shares: SparseAdam's one tensor, and Adam's largest (ZeRO gives each rank the
    # largest tensor left): two moments each, plus Adam's 4-byte step (SparseAdam's is an int)
    emb, head = model.emb.weight.numel() * 4, model.head[0].weight.numel() * 4
    # each listed once, as the optimizer it wraps (each was listed twice, wrapper and inner)
    states = sorted((s["class"], s["state_bytes"], s["wrapped_by"])
                    for s in measured.profile.optimizers)
    assert states == [("Adam", 2 * head + 4, "ZeroRedundancyOptimizer"),
                      ("SparseAdam", 2 * emb, "ZeroRedundancyOptimizer")]
    predicted = fake_peak(workload, [zero1])
    assert abs(predicted - measured.peak_bytes) / measured.peak_bytes < 0.03


def test_zero1_of_a_gan_shards_each_optimizer_in_its_own_class() -> None:
    """GIVEN a GAN whose discriminator SGD (momentum) steps and whose generator Adam steps WHEN
    ZeRO-1 on 2 ranks is simulated THEN each is a ZeroRedundancyOptimizer of its own class over
    its own parameters (G's was SGD too: no Adam moments), rank 0 keeps the state of its
    shares, and the fake run predicts the simulation within 3%."""
    from memprof.advisor import sharded_steps
    from memprof.advisor.sharding import _apply_shard

    if sharded_steps.unavailable_reason():
        pytest.skip(sharded_steps.unavailable_reason())
    gan, _, _, batch = _gan()
    opt_d = torch.optim.SGD(gan.disc.parameters(), lr=1e-3, momentum=0.9)
    opt_g = torch.optim.Adam(gan.gen.parameters(), lr=2e-4)
    workload = _gan_workload(gan, opt_d, opt_g, batch)
    zero1 = _apply_shard("zero1", 2)
    with seeded():
        reference = baseline(workload)
        measured = simulate(workload, [zero1], reference)
    # rank 0's shares, the largest tensor of each (ZeRO gives each rank the largest left):
    # D's first weight (one momentum buffer), G's last weight (two moments and a step)
    d_share, g_share = gan.disc[0].weight.numel() * 4, gan.gen[2].weight.numel() * 4
    states = sorted((s["class"], s["state_bytes"], s["wrapped_by"])
                    for s in measured.profile.optimizers)
    assert states == [("Adam", 2 * g_share + 4, "ZeroRedundancyOptimizer"),
                      ("SGD", d_share, "ZeroRedundancyOptimizer")]
    assert measured.peak_bytes < reference.peak_bytes
    predicted = fake_peak(workload, [zero1])
    assert abs(predicted - measured.peak_bytes) / measured.peak_bytes < 0.03


@pytest.mark.parametrize("argv, backward_passes", [(("--gan",), 2), ((), 1)])
def test_a_script_of_two_optimizers_is_simulated_in_whole_steps(
        argv: tuple[str, ...], backward_passes: int) -> None:
    """GIVEN a script stepping two optimizers per training step (a GAN: D's backward and step,
    then G's; or one backward, then Adam and SGD) WHEN the script simulator measures it THEN
    each profiled step is one training step, with both optimizer steps (every optimizer step
    ended one: 3 steps were 1.5 GAN steps, and the advisor read D's gradients alive across
    steps as zeroed in place), and the run stops after 3 training steps."""
    from memprof.advisor.core import read_facts
    from memprof.advisor.script import ScriptSimulator
    from memprof.advisor.zero_grad import gradient_use

    simulator = ScriptSimulator(_script(*argv, "--steps", "6"), steps=3)
    profile = simulator.reference().profile
    use = gradient_use(read_facts(profile))
    assert (use.optimizer_steps, use.backward_passes) == (2, backward_passes)
    assert not use.zeroed_in_place
    assert len(profile.steps_stats) == 3
    assert simulator.cycle == 2


def test_a_wgan_script_is_simulated_in_whole_steps() -> None:
    """GIVEN a WGAN-style script (D stepped 5 times per G step) WHEN the script simulator
    measures 3 steps THEN each profiled step is one training step of 6 optimizer steps (the
    first run stopped at D's third step, before G ever stepped, and measured D steps alone as
    training steps)."""
    from memprof.advisor.core import read_facts
    from memprof.advisor.script import ScriptSimulator
    from memprof.advisor.zero_grad import gradient_use

    simulator = ScriptSimulator(_script("--gan", "--critic", "5", "--steps", "4"), steps=3)
    profile = simulator.reference().profile
    assert simulator.cycle == 6
    assert len(profile.steps_stats) == 3
    use = gradient_use(read_facts(profile))
    assert (use.optimizer_steps, use.backward_passes) == (6, 6)


def test_a_zero1_script_is_simulated_in_whole_steps() -> None:
    """GIVEN a script stepping ZeRO-1's ZeroRedundancyOptimizer (which steps its AdamW inside
    its own step) WHEN the script simulator measures 3 steps THEN a training step is one
    optimizer step (the inner and outer steps were counted as two optimizers stepping)."""
    from memprof.advisor.script import ScriptSimulator

    script = Path(__file__).parent / "data" / "train_zero1.py"
    simulator = ScriptSimulator(script_runs.runner("--steps", "5", script=script), steps=3)
    profile = simulator.reference().profile
    assert simulator.cycle == 1
    assert len(profile.steps_stats) == 3
    assert [o["class"] for o in profile.optimizers] == ["AdamW"]


def test_a_gan_scripts_rows_on_its_second_model_say_why_they_are_not_measured() -> None:
    """GIVEN a GAN script WHEN a LoRA row naming D's layers is simulated on the script THEN it
    fails with the reason (a script's simulation edits the first model it calls, G), not a
    bare ``KeyError: 'Sequential.0'``."""
    from memprof.advisor import changes_for
    from memprof.advisor.core import read_facts
    from memprof.advisor.script import ScriptSimulator

    simulator = ScriptSimulator(_script("--gan", "--steps", "4"), steps=2)
    reference = simulator.reference()
    rows = [c for c in changes_for(read_facts(reference.profile))
            if c.technique == "lora" and c.applicable and c.apply is not None]
    assert rows
    measured = simulator.measure([rows[0]], reference)
    assert isinstance(measured, str)
    assert "another model than the first one the script calls" in measured
