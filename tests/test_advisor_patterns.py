"""The advisor on training patterns outside the model zoo (issue #25)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import memprof
from memprof.advisor import Workload, advise, changes_for, read_facts
from memprof.advisor.workload import baseline, seeded
from memprof.advisor.zero_grad import OPTIONS, gradient_use

pytestmark = pytest.mark.slow  # the pattern zoo's models through the advisor


class _BagRecommender(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(500, 16, mode="mean")
        self.head = nn.Linear(16, 1)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.emb(indices, offsets))
        return {"logits": logits, "loss": logits.pow(2).mean()}


def test_a_failing_batch_simulation_fails_its_rows_alone() -> None:
    """GIVEN a recommender whose ``indices`` (64 lookups) and ``offsets`` (8 bags) do not lead
    with the batch dimension, so that halving the "batch" cuts the indices under the offsets
    WHEN advised THEN the batch rows say why they failed and every other row is still there
    (the simulation's error used to raise out of ``advise``)."""
    torch.manual_seed(0)
    model = _BagRecommender()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    indices = torch.randint(0, 500, (64,))
    offsets = torch.arange(0, 64, 8)
    workload = Workload(model, optimizer, {"indices": indices, "offsets": offsets}, steps=2)
    with seeded():
        ref = baseline(workload)
    advice = advise(ref.profile, workload=workload, prediction="analytic")
    batch_rows = [r for r in advice.rows if r["technique"] == "batch"]
    assert batch_rows and all(not r["applicable"] for r in batch_rows)
    assert all("simulation failed" in r["reason"] for r in batch_rows)
    others = [r for r in advice.rows if r["technique"] != "batch" and r["applicable"]]
    assert sum(r["measured_peak_bytes"] is not None for r in others) >= 3


def _gan_profile(*, set_to_none: bool) -> memprof.Profile:
    """A GAN step: the discriminator's backward and Adam step, then the generator's."""
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32))
    disc = nn.Sequential(nn.Linear(32, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4)
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4)
    bce = nn.BCEWithLogitsLoss()
    real, ones, zeros = torch.randn(8, 32), torch.ones(8, 1), torch.zeros(8, 1)
    gan = nn.ModuleDict({"gen": gen, "disc": disc})
    with memprof.profile(gan) as prof:
        for _ in range(3):
            opt_d.zero_grad(set_to_none=set_to_none)
            fake = gen(torch.randn(8, 16))
            (bce(disc(real), ones) + bce(disc(fake.detach()), zeros)).backward()
            opt_d.step()
            opt_g.zero_grad(set_to_none=set_to_none)
            bce(disc(fake), ones).backward()
            opt_g.step()
            prof.step()
    return prof.profile


def test_several_optimizers_are_a_known_pattern_not_gradient_accumulation() -> None:
    """GIVEN a GAN whose generator's gradients live, by the loop's order, from its backward to
    its zero_grad in the next step WHEN advised THEN the loop is read as two optimizers (two
    steps after two backward passes), whose gradients are freed: simulations keep
    ``zero_grad(set_to_none=True)`` (they were forced to False, adding the generator's
    gradients to every simulated step) and the row names the pattern, not accumulation."""
    use = gradient_use(read_facts(_gan_profile(set_to_none=True)))
    assert (use.optimizer_steps, use.backward_passes, use.passes_per_update) == (2, 2, 1)
    assert use.kept and use.freed and not use.zeroed_in_place
    row = next(c for c in changes_for(read_facts(_gan_profile(set_to_none=True)))
               if c.options == OPTIONS)
    assert not row.applicable
    assert "2 optimizer steps after 2 backward passes" in row.reason
    assert "accumulate" not in row.reason
    # the same GAN zeroing in place never frees a gradient: simulations must do the same
    assert gradient_use(read_facts(_gan_profile(set_to_none=False))).zeroed_in_place


def test_gradient_accumulation_over_four_micro_batches_stays_accumulation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(32, 32), torch.randint(0, 4, (32,))
    with memprof.profile(model, optimizer) as prof:
        for _ in range(2):
            for part in range(4):
                rows = slice(8 * part, 8 * part + 8)
                (nn.functional.cross_entropy(model(x[rows]), y[rows]) / 4).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            prof.step()
    use = gradient_use(read_facts(prof.profile))
    assert (use.optimizer_steps, use.backward_passes, use.passes_per_update) == (1, 4, 4)
    assert not use.kept and not use.zeroed_in_place


def test_rows_of_a_compiled_models_profile_apply_to_the_plain_model() -> None:
    """GIVEN a profile of a ``torch.compile``d model (its modules named ``_orig_mod.*``) and a
    Workload of the plain model WHEN the rows that name modules (checkpointing, LoRA) are
    applied to a copy THEN they find those modules (they raised ``KeyError: '_orig_mod.0'``,
    and every such row of the torch-compile pattern went unsimulated)."""
    from memprof.advisor import checkpointing, lora
    from memprof.advisor.workload import copy_state

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(),
                          nn.Linear(32, 4))
    compiled = torch.compile(model, backend="eager")
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(4, 8)
    with memprof.profile() as prof:
        for _ in range(2):
            compiled(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            prof.step()
    facts = read_facts(prof.profile)
    rows = [c for c in checkpointing.predict(facts) + lora.predict(facts)
            if c.applicable and c.apply is not None]
    named = [n for c in rows for n in c.options.get("modules", [])]
    assert named and all(n.startswith("_orig_mod.") for n in named)
    for change in rows:
        state = copy_state(Workload(model, optimizer, x))
        assert change.apply is not None
        change.apply(state)
    from memprof.advisor.core import ModuleNames, names_in

    assert ModuleNames(model)["_orig_mod.2"] is model[2]
    assert ModuleNames(compiled)["2"] is model[2]
    assert names_in(model, ["_orig_mod.0", "_orig_mod.4"]) == ["0", "4"]
    assert names_in(compiled, ["4"]) == ["_orig_mod.4"]


class _Experts(nn.Module):
    """Four fp32 experts run by one ``torch._grouped_mm``, as transformers' MoE layers do."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 16, 32))
        self.register_buffer("offsets", torch.tensor([8, 16, 24, 32], dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(x, self.weight, offs=self.offsets)


def test_a_fake_run_of_fp32_grouped_mm_on_the_cpu_is_the_real_run() -> None:
    """GIVEN fp32 experts multiplied by ``torch._grouped_mm`` on the CPU (whose meta kernel
    demands bf16: the fake run raised, and every row of the pattern zoo's Mixtral fell back to
    analytic, 5-43% off) WHEN the step is run on fake tensors THEN its peak is the real one's
    (to a scalar: 12 B of 51 kB here)."""
    from memprof.advisor.fake_prediction import fake_peak

    torch.manual_seed(0)
    model = _Experts()
    workload = Workload(model, torch.optim.AdamW(model.parameters()), torch.randn(32, 16),
                        step_fn=lambda net, x: net(x).pow(2).mean(), steps=2)
    with seeded():
        real = baseline(workload).peak_bytes
    with seeded():
        fake = fake_peak(workload)
    assert abs(fake - real) <= real // 1000
    # only memprof's fake runs (and estimates of a CPU step) get that kernel: other fake-tensor
    # code keeps PyTorch's own, which refuses fp32
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    a, w, offs = (mode.from_tensor(t) for t in (torch.randn(32, 16), model.weight.detach(),
                                                  model.offsets))
    with mode, pytest.raises(RuntimeError, match="BF16"):
        torch._grouped_mm(a, w, offs=offs)


def test_an_estimate_of_fp32_grouped_mm_on_the_cpu_is_the_real_run() -> None:
    """GIVEN the same fp32 experts WHEN ``memprof.estimate`` models the CPU step THEN its peak
    is the real run's within 1% (it refused: the meta kernel demands bf16; the pattern zoo's
    Mixtral is now -0.0005%), and an estimate of a CUDA step still refuses fp32 experts, as
    CUDA's kernel does."""
    from memprof.errors import EstimateError
    from memprof.estimate import estimate

    def step_peak() -> int:
        torch.manual_seed(0)
        model = _Experts()
        optimizer = torch.optim.AdamW(model.parameters())
        x = torch.randn(32, 16)
        with memprof.profile(model, optimizer) as prof:
            for _ in range(2):
                model(x).pow(2).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
                prof.step()
        return int(prof.profile.peak().total_bytes)

    real = step_peak()
    options = {"batch": torch.randn(32, 16), "loss_fn": lambda out: out.pow(2).mean(),
               "dtype": "fp32", "steps": 2}
    estimated = estimate(_Experts, device="cpu", **options).peak().total_bytes
    assert abs(estimated - real) / real < 0.01
    with pytest.raises(EstimateError, match="BF16"):
        estimate(_Experts, device="cuda", **options)


class _Scan(nn.Module):
    """A layer whose output is read slice by slice (Mamba's scan): in backward its gradient
    sums 16 slices' gradients, in place unless a dispatch mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x).view(x.shape[0], 16, 16)
        total = h[:, 0].sum()
        for i in range(1, 16):
            total = total + (h[:, i] * 2).sum()
        return total


def test_a_scans_fake_run_sums_its_gradients_in_place_as_the_real_run_does() -> None:
    """GIVEN a step whose gradients are summed (a scan: every fake-run row of the pattern zoo's
    Mamba was 5-8% above its simulation, as autograd never sums a fake tensor's gradients in
    place) WHEN advised with the model at hand THEN the unchanged fake run is the profiled
    peak and no row carries the gap's caveat."""
    from memprof.advisor import FAKE_BASELINE_GAP

    torch.manual_seed(0)
    model = _Scan()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(256, 8)
    profile = _two_profiled_steps(model, optimizer, lambda: model(x))
    advice = advise(profile, fake_model=Workload(model, optimizer, x,
                                                 step_fn=lambda net, b: net(b)))
    fake = advice.extra["fake_baseline_peak_bytes"]
    assert abs(fake - advice.baseline_peak_bytes) <= 0.001 * advice.baseline_peak_bytes
    assert not any(FAKE_BASELINE_GAP in (r["caveats"] or "") for r in advice.rows)


def test_fake_run_rows_say_when_the_unchanged_fake_run_differs_from_the_profile(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """GIVEN an unchanged fake run 6% above the profiled peak WHEN advised with the model at
    hand THEN each fake-run row says so, and no other row does."""
    import memprof.advisor as advisor
    from memprof.advisor import FAKE_BASELINE_GAP, fake_baseline_gap

    assert fake_baseline_gap(1005, 1000) is None  # within 1%: nothing to say
    torch.manual_seed(0)
    model = _Scan()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(256, 8)
    profile = _two_profiled_steps(model, optimizer, lambda: model(x))
    real_predict = advisor.fake_predict

    def above(*args: object, **kwargs: object) -> int | None:
        reference = real_predict(*args, **kwargs)  # type: ignore[arg-type]
        return None if reference is None else int(reference * 1.06)

    monkeypatch.setattr(advisor, "fake_predict", above)
    advice = advise(profile, fake_model=Workload(model, optimizer, x,
                                                 step_fn=lambda net, b: net(b)))
    faked = [r for r in advice.rows if r["predicted_by"] == "fake run"]
    assert faked and all(FAKE_BASELINE_GAP in (r["caveats"] or "") for r in faked)
    assert all("(+6.0%)" in r["caveats"] for r in faked)
    others = [r for r in advice.rows if r["predicted_by"] != "fake run"]
    assert not any(FAKE_BASELINE_GAP in (r["caveats"] or "") for r in others)


class _DeadBranchBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.randn(64, 64))
        self.lin = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A = -torch.exp(self.A_log)  # noqa: F841 - never used: A_log gets no gradient
        return torch.relu(self.lin(x)) + x


def test_a_zero2_simulation_counts_the_shards_no_op_touches() -> None:
    """GIVEN blocks with a parameter that gets no gradient (the dead-branch pattern; a frozen
    base under LoRA is another) WHEN ZeRO-2 is simulated (FSDP2 without resharding after
    forward: the simulation's first, no-grad forward leaves the modules holding their gathered
    parameters when profiling starts) THEN the shards FSDP2 keeps are counted too, and the
    simulation equals the fake run (it missed those shards: 9.8% below on 2 ranks)."""
    from memprof.advisor.fake_prediction import fake_peak
    from memprof.advisor.workload import simulate

    torch.manual_seed(0)
    model = nn.Sequential(*[_DeadBranchBlock() for _ in range(4)])
    workload = Workload(model, torch.optim.AdamW(model.parameters()), torch.randn(16, 64),
                        step_fn=lambda net, x: net(x).pow(2).mean())

    def zero2(state: object) -> None:
        state.shard, state.ranks = "zero2", 2  # type: ignore[attr-defined]

    with seeded():
        reference = baseline(workload)
        measured = simulate(workload, [zero2], reference).peak_bytes
    with seeded():
        assert measured == fake_peak(workload, [zero2])


class _ValueBranch(nn.Module):
    """A forward that branches on a tensor's value (wav2vec2's CTC loss checks
    ``labels.max()``): fake tensors have no values, so no fake run can run it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.max() > 100:
            raise ValueError("out of range")
        return self.lin(x).pow(2).mean()


def test_rows_say_why_when_no_fake_run_of_the_step_can_run() -> None:
    """GIVEN a step no fake run can run WHEN advised with the model at hand THEN every row that
    could have been a fake run says why it is analytic (the CTC pattern's rows fell back to
    analytic predictions 3-45% off without a word)."""
    torch.manual_seed(0)
    model = _ValueBranch()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(8, 16)
    profile = _two_profiled_steps(model, optimizer, lambda: model(x))
    advice = advise(profile, fake_model=Workload(model, optimizer, x,
                                                 step_fn=lambda net, b: net(b)))
    assert advice.extra["fake_baseline_peak_bytes"] is None
    could = [r for r in advice.rows if r["applicable"] and r["technique"] != "batch"
             and r["predicted_by"] is not None and not r["not_simulated"]]
    assert could and all(r["predicted_by"] == "analytic" for r in could)
    assert all("no fake run of this step" in (r["caveats"] or "") for r in could)
    assert all("DataDependentOutputException" in r["caveats"] for r in could)


def test_the_base_of_a_peft_lora_model_is_quantized_under_its_adapters() -> None:
    """GIVEN a model that already trains peft LoRA adapters (the peft-lora pattern) WHEN advised
    THEN the QLoRA and int8/int4 rows quantize the base layers under the adapters (peft's
    ``base_layer``), not the peft layers, and a simulation of each runs: replacing the peft
    layers had made every simulation and fake run raise (peft's wrapped Conv1D met memprof's
    quantized layer, ``mat1 and mat2 shapes cannot be multiplied``), and the rows were then
    marked not applicable. The int8 row keeps the adapters' gradients and optimizer state."""
    peft = pytest.importorskip("peft")
    from memprof.advisor import lora, qlora, quantization
    from memprof.advisor.workload import Workload, baseline, seeded, simulate

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(),
                         nn.Linear(32, 4))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["0", "2"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    x = torch.randn(8, 16)
    workload = Workload(model, optimizer, x, steps=2)
    with seeded():
        ref = baseline(workload)
    facts = read_facts(ref.profile)
    bases = ["base_model.model.0.base_layer", "base_model.model.2.base_layer"]
    (nf4,) = qlora.predict(facts)
    int8, int4 = quantization.predict(facts)
    assert nf4.applicable and nf4.options["modules"] == bases
    assert int8.applicable and int4.applicable
    assert quantization.layers_to_quantize(facts) == bases
    (adapters,) = lora.predict(facts)  # it read the adapters' own as base weight: "145%"
    assert not adapters.applicable and adapters.reason == lora.ADAPTED_REASON
    with seeded():
        measured = simulate(workload, [int8.apply], ref)
    before, after = ref.profile.peak().by_category, measured.profile.peak().by_category
    assert measured.profile.optimizers[0]["parameter_bytes"] == \
        ref.profile.optimizers[0]["parameter_bytes"]  # the adapters, still all trained
    assert after["optimizer_state"] == before["optimizer_state"]
    assert after["parameter"] == before["parameter"] - 4 * (16 * 32 + 32 * 32)


def _two_profiled_steps(model: nn.Module, optimizer: torch.optim.Optimizer,
                        loss: Callable[[], torch.Tensor]) -> memprof.Profile:
    """The profile of two steps: ``loss()`` backward, the optimizer's step, ``zero_grad``."""
    with memprof.profile(model, optimizer) as prof:
        for _ in range(2):
            loss().backward()
            optimizer.step()
            optimizer.zero_grad()
            prof.step()
    return prof.profile
