"""GIVEN models whose memory can be worked out by hand, THEN memprof's numbers are exact."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.utils.checkpoint
from models import make_cnn, make_gpt2, make_mlp, storage_bytes, train_step
from torch import nn

import memprof

F32 = 4


@pytest.fixture(autouse=True, params=["dispatch", "events"])
def auto_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs twice: with ``backend="auto"`` meaning each backend in turn."""
    from memprof.tracking import session

    monkeypatch.setattr(session, "AUTO_BACKEND", request.param)
    return str(request.param)


def profile_steps(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                  steps: int = 2) -> memprof.Profile:
    with memprof.profile(model, optimizer) as prof:
        for _ in range(steps):
            train_step(model, optimizer, x)
            prof.step()
    return prof.profile


def row(frame, name: str):  # type: ignore[no-untyped-def]
    return frame.set_index("module").loc[name]


def test_mlp_every_category_is_exact() -> None:
    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(32, 64)
    frame = profile_steps(model, optimizer, x).modules()

    for name, module in model.named_modules():
        if name == "":
            continue
        params = list(module.parameters(recurse=False))
        r = row(frame, name)
        assert r["parameter"] == storage_bytes(params)
        assert r["gradient"] == storage_bytes(params)  # grads have the parameters' shapes
        # AdamW: exp_avg + exp_avg_sq (each the parameter's size) + a 4-byte float32 step.
        assert r["optimizer_state"] == 2 * storage_bytes(params) + F32 * len(params)

    # What autograd saves, worked out by hand (batch 32):
    assert row(frame, "0")["activation"] == 0  # saves x, which is the batch: an input
    assert row(frame, "1")["activation"] == 32 * 128 * F32  # GELU saves its input
    assert row(frame, "2")["activation"] == 32 * 128 * F32 + 2 * 32 * F32  # input, mean, rstd
    assert row(frame, "3")["activation"] == 32 * 128 * F32  # Linear saves its input
    root = row(frame, "")
    assert root["activation_total"] == 3 * 32 * 128 * F32 + 2 * 32 * F32
    assert root["parameter_total"] == storage_bytes(list(model.parameters()))


def test_an_identity_module_does_not_take_over_the_backward_of_the_layer_before() -> None:
    # Dropout(p=0) returns its input: its output's grad_fn is the Linear's. The Linear's
    # backward (the gradient of its input, 32 x 128 fp32) stays the Linear's.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 256), nn.Dropout(0.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    frame = profile_steps(model, optimizer, torch.randn(32, 64)).modules()

    assert row(frame, "3")["peak_backward"] == 0
    assert row(frame, "3")["temporary_peak"] == 0
    assert row(frame, "2")["temporary_peak"] >= 32 * 128 * F32
    assert row(frame, "2")["peak_backward"] > 0


def test_peak_is_the_sum_of_what_was_alive() -> None:
    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(32, 64)
    profile = profile_steps(model, optimizer, x)
    peak = profile.peak()
    params = storage_bytes(list(model.parameters()))
    assert peak.by_category["parameter"] == params
    assert peak.by_category["optimizer_state"] == 2 * params + F32 * 6
    assert peak.by_category["input"] == x.untyped_storage().nbytes()
    assert sum(peak.by_category.values()) == peak.total_bytes
    assert sum(sum(r.values()) for r in peak.by_module.values()) == peak.total_bytes
    # The timeline keeps the peak.
    assert profile.timeline()["total"].max() == peak.total_bytes
    assert {s.peak_bytes for s in profile.steps_stats} == {peak.total_bytes}


def test_cnn_buffers_are_the_batchnorm_statistics() -> None:
    model = make_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 3, 16, 16)
    frame = profile_steps(model, optimizer, x).modules()
    for name in ("1", "4"):
        bn = model.get_submodule(name)
        expected = 2 * bn.num_features * F32 + 8  # running mean, var, int64 num_batches_tracked
        assert row(frame, name)["buffer"] == expected
        assert row(frame, name)["buffer"] == storage_bytes(list(bn.buffers()))
    # SGD with momentum keeps one buffer per parameter.
    conv = model.get_submodule("0")
    assert row(frame, "0")["optimizer_state"] == storage_bytes(list(conv.parameters()))
    assert row(frame, "")["buffer_total"] == storage_bytes(list(model.buffers()))


def test_gpt2_tied_embedding_counted_once() -> None:
    model = make_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 128, (2, 16))

    with memprof.profile(model, optimizer) as prof:
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            prof.step()
    frame = prof.modules()
    unique = storage_bytes(list(model.parameters()))
    assert row(frame, "")["parameter_total"] == unique
    assert prof.peak().by_category["parameter"] == unique
    # The tie is charged to the embedding that owns it first, not to lm_head again.
    assert row(frame, "lm_head")["parameter"] == 0
    assert row(frame, "transformer.wte")["parameter"] == 128 * 64 * F32
    assert row(frame, "")["gradient_total"] == unique
    n_tensors = len(list(model.parameters()))
    assert row(frame, "")["optimizer_state_total"] == 2 * unique + F32 * n_tensors
    # Every block saved activations for backward.
    for block in ("transformer.h.0", "transformer.h.1"):
        assert row(frame, block)["activation_total"] > 0


class _ViewsAndInplace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()  # 1 new storage
        y.add_(1)  # in place: no new storage
        z = y.view(-1)  # a view: no new storage
        w = z[: z.numel() // 2]  # a view
        w.mul_(2)
        return y


@pytest.mark.parametrize("backend", ["dispatch", "events"])
def test_views_and_inplace_cost_nothing(backend: str) -> None:
    model = _ViewsAndInplace()
    x = torch.randn(64, 64)
    with memprof.profile(model, backend=backend) as prof:  # type: ignore[arg-type]
        with torch.no_grad():
            model(x)
        prof.step()
    # The events backend sees every allocation: add_(1) and mul_(2) each wrap their Python
    # scalar as an 8-byte int64 tensor and cast it to a 4-byte float32 one, which no operator
    # returns (the dispatch ledger cannot see them). At most one of each is alive at a time.
    scalars = 8 + 4 if backend == "events" else 0
    assert row(prof.modules(), "")["temporary_peak"] == 64 * 64 * F32 + scalars
    assert prof.peak().total_bytes == 2 * 64 * 64 * F32 + scalars  # the input and one clone


class _Blocks(nn.Module):
    def __init__(self, checkpoint: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)) for _ in range(4)
        )
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.checkpoint:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


@pytest.mark.parametrize("backend", ["dispatch", "events"])
def test_checkpointing_lowers_activations_and_recomputes_in_backward(backend: str) -> None:
    results = {}
    for ckpt in (False, True):
        model = _Blocks(ckpt)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with memprof.profile(model, optimizer, backend=backend) as prof:  # type: ignore[arg-type]
            for _ in range(2):
                train_step(model, optimizer, torch.randn(32, 64))
                prof.step()
        results[ckpt] = prof.profile
    plain = row(results[False].modules(), "")
    ckpt = row(results[True].modules(), "")
    assert ckpt["activation_total"] < plain["activation_total"] / 4
    frame = results[True].modules()
    blocks = frame[frame["module"].str.fullmatch(r"blocks\.\d")]
    assert (blocks["recompute_calls"] == 2).all()  # once per step, 2 steps
    assert (results[False].modules()["recompute_calls"] == 0).all()
    # The recomputation allocates in backward.
    tl = results[True].timeline()
    assert tl[tl["phase"] == "backward"]["module"].str.startswith("blocks.").any()
    # Non-reentrant checkpointing keeps a copy of the CPU RNG state per block (a 5056-byte
    # tensor no operator returns): only the events backend sees it, and on this toy model it
    # is larger than the activations checkpointing saves at the peak. Compare without it.
    rng = torch.get_rng_state().untyped_storage().nbytes() if backend == "events" else 0
    assert results[True].peak().total_bytes - rng < results[False].peak().total_bytes


def test_phases_and_steps() -> None:
    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(32, 64)
    profile = profile_steps(model, optimizer, x, steps=3)
    assert [s.step for s in profile.steps_stats] == [0, 1, 2]
    phases = set(profile.timeline()["phase"])
    assert {"forward", "backward", "optimizer"} <= phases
    # AdamW's scratch: the peak is in the optimizer step, with state and scratch both alive.
    assert profile.peak().phase == "optimizer"
    steady = profile.steady_state_bytes()
    params = storage_bytes(list(model.parameters()))
    # Between steps: parameters, optimizer state and the input (grads were set to None).
    assert steady == params + 2 * params + F32 * 6 + x.untyped_storage().nbytes()
    assert not profile.warnings


def test_leak_warning_for_a_loss_kept_with_its_graph() -> None:
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(256, 64)
    kept = []
    with pytest.warns(memprof.MemoryLeakWarning) as caught, memprof.profile(
        model, optimizer
    ) as prof:
        for _ in range(6):
            loss = model(x).pow(2).mean()
            loss.backward(retain_graph=True)
            kept.append(loss)  # keeps every step's graph (and its activations) alive
            optimizer.step()
            optimizer.zero_grad()
            prof.step()
    assert any("leak" in w for w in prof.profile.warnings)
    # The warning points at the user's `with` block, not at memprof's code.
    leaks = [w for w in caught if issubclass(w.category, memprof.MemoryLeakWarning)]
    assert [w.filename for w in leaks] == [__file__]
    ends = [s.end_bytes for s in prof.profile.steps_stats]
    assert len(ends) == 6  # pairwise of fewer than two steps would compare nothing
    assert all(b > a for a, b in itertools.pairwise(ends))


def test_schedule_reports_only_active_steps() -> None:
    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(32, 64)
    with memprof.profile(model, optimizer,
                         schedule=memprof.schedule(wait=1, warmup=1, active=2)) as prof:
        for _ in range(5):
            train_step(model, optimizer, x)
            prof.step()
    assert [s.step for s in prof.profile.steps_stats] == [2, 3]
    assert set(prof.timeline()["step"]) == {2, 3}


def test_without_model_every_module_that_runs_is_tracked() -> None:
    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(32, 64)
    with memprof.profile() as prof:
        for _ in range(2):
            train_step(model, optimizer, x)
            prof.step()
    frame = prof.modules()
    assert list(frame["module"]) == ["", "0", "1", "2", "3"]
    assert row(frame, "")["parameter_total"] == storage_bytes(list(model.parameters()))
    assert row(frame, "")["optimizer_state_total"] > 0


def test_optimizer_steps_mark_steps_without_a_trailing_empty_step() -> None:
    from memprof.tracking.session import Profiler

    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(32, 64)
    with Profiler(step_on_optimizer=True) as prof:
        for _ in range(3):
            model(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()  # runs after the last step mark: not a step of its own
    assert [s.step for s in prof.profile.steps_stats] == [0, 1, 2]
    assert prof.profile.optimizers[0]["class"] == "AdamW"
    assert prof.profile.optimizers[0]["state_bytes"] == 2 * storage_bytes(
        list(model.parameters())
    ) + F32 * 6


def test_profiler_writes_the_html_report(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.profile(model, optimizer) as prof:
        train_step(model, optimizer, torch.randn(4, 64))
        prof.step()
    path = prof.report(tmp_path / "r.html")
    assert path.read_text().count("<html") == 1
    with pytest.raises(memprof.OutputExistsError):
        memprof.report(prof.profile, path)
