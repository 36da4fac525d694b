"""memprof.estimate: a step under fake tensors equals the real run; CUDA modelling; the CLI."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from models import make_gpt2, make_mlp
from torch import nn
from workloads import estimate_shaped_run

import memprof
from memprof.estimate import (
    CUDA_CONTEXT_BYTES,
    KNOWN_MODELS,
    EstimateError,
    build_spec,
    estimate,
)
from memprof.tracking import kernel_corrections

pytestmark = pytest.mark.slow  # fake runs of transformers models, and the CLI in subprocesses

COMPARED = ["module", "type", "parameter", "buffer", "gradient", "optimizer_state", "activation",
            "temporary_peak", "peak_forward", "peak_backward", "forward_calls"]


def _mlp_loss(output: torch.Tensor) -> torch.Tensor:
    return output.float().pow(2).mean()


def _ids(batch: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (batch, seq))
    return {"input_ids": ids, "labels": ids.clone()}


#: Where backward sums a tensor's gradients (a residual stream), the estimate sums them in place
#: as the unobserved run does (memprof/estimate/grad_accumulation.py); a real run on the dispatch
#: backend sums them out of place, one buffer more inside the module whose input is summed.
SUMMED = ["temporary_peak", "peak_backward"]


def _assert_same(estimated: memprof.Profile, real: memprof.Profile, *,
                 sums_in_place: bool = False) -> None:
    assert estimated.peak().total_bytes == real.peak().total_bytes
    assert estimated.peak().by_category == real.peak().by_category
    assert estimated.peak().by_module == real.peak().by_module
    exact = [c for c in COMPARED if not (sums_in_place and c in SUMMED)]
    assert estimated.modules()[exact].equals(real.modules()[exact])
    if sums_in_place:
        ours, theirs = estimated.modules()[SUMMED], real.modules()[SUMMED]
        assert (ours <= theirs).all().all() and (ours < theirs).any().any()
    steps = ["peak_bytes", "start_bytes", "end_bytes", "peak_phase", "peak_module"]
    assert estimated.steps()[steps].equals(real.steps()[steps])


# ------------------------------------------------------------------ equal to a real run
def test_mlp_estimate_equals_the_real_cpu_run() -> None:
    # GIVEN an MLP and a real batch; WHEN estimated on fake tensors (fp32, exact bytes) without
    # the measured kernel scratch, which the dispatch ledger of a real run does not see either
    x = torch.randn(32, 64)
    with kernel_corrections.disabled():
        estimated = estimate(make_mlp, batch=x, dtype="fp32", device="cpu", loss_fn=_mlp_loss)
    real = estimate_shaped_run(make_mlp(), lambda m: m(x), loss_fn=_mlp_loss)
    # THEN every per-category, per-module and per-step figure is the real run's
    _assert_same(estimated, real)
    assert estimated.device.kind == "fake" and real.device.kind == "cpu"
    assert estimated.peak().by_category["optimizer_state"] > 0  # the 2nd step has Adam state


def test_tiny_gpt2_estimate_equals_the_real_cpu_run() -> None:
    batch = _ids()
    with kernel_corrections.disabled():
        estimated = estimate(make_gpt2, batch=lambda: _ids(), dtype="fp32", device="cpu")
    real = estimate_shaped_run(make_gpt2(), lambda m: m(**batch))
    _assert_same(estimated, real, sums_in_place=True)
    info = estimated.meta["estimate"]
    params = sum(p.numel() for p in make_gpt2().parameters())
    assert info["num_parameters"] == params  # lm_head stays tied to the embedding
    assert info["parameter_bytes"] == 4 * params
    assert info["cuda_context_bytes"] == 0
    assert info["device_total_bytes"] == estimated.peak().total_bytes


@pytest.mark.parametrize(
    "make",
    [
        make_mlp,
        make_gpt2,
    ],
)
def test_estimate_agrees_with_the_real_allocators_events(make: Any) -> None:
    # GIVEN a real run measured from the allocator's own events (not the dispatch ledger)
    if make is make_mlp:
        x = torch.randn(32, 64)
        estimated = estimate(make, batch=x, dtype="fp32", device="cpu", loss_fn=_mlp_loss)
        real = estimate_shaped_run(make(), lambda m: m(x), loss_fn=_mlp_loss, backend="events")
    else:
        batch = _ids()
        estimated = estimate(make, batch=batch, dtype="fp32", device="cpu")
        real = estimate_shaped_run(make(), lambda m: m(**batch), backend="events")
    est_cat, real_cat = estimated.peak().by_category, real.peak().by_category
    # THEN what the model and optimizer hold is exact, and the peak (with the kernels' scratch
    # measured) is within 1%: the allocator also sees a few scalars no operator returns
    for category in ("parameter", "gradient", "optimizer_state"):
        assert est_cat[category] == real_cat[category]
    difference = real.peak().total_bytes - estimated.peak().total_bytes
    assert abs(difference) <= 0.01 * real.peak().total_bytes


def test_cuda_model_rounds_to_512_byte_blocks_and_adds_the_context() -> None:
    # GIVEN a model with many storages that are not multiples of 512 bytes (LayerNorm: 256 B)
    plain = estimate(make_gpt2, batch=_ids, dtype="fp32", device="cpu")
    cuda = estimate(make_gpt2, batch=_ids, dtype="fp32", device="cuda")
    frame = cuda.modules()
    cols = ["parameter", "gradient", "optimizer_state", "activation", "temporary_peak"]
    assert (frame[cols] % 512 == 0).all().all()
    assert all(v % 512 == 0 for v in cuda.peak().by_category.values())
    assert cuda.peak().total_bytes > plain.peak().total_bytes
    info = cuda.meta["estimate"]
    assert info["cuda_context_bytes"] == CUDA_CONTEXT_BYTES
    # device total: the allocator replay's reserved memory (at least the tensors) + the context
    assert info["device_total_bytes"] == info["reserved_bytes"] + CUDA_CONTEXT_BYTES
    assert info["reserved_bytes"] >= cuda.peak().total_bytes
    assert cuda.device.allocation_rounding == 512
    assert any("512" in m for m in cuda.device.modelled)
    assert any("CUDA context" in m for m in cuda.device.modelled)
    # the context is a documented figure, not a fake allocation
    assert sum(cuda.peak().by_category.values()) == cuda.peak().total_bytes


def test_bf16_halves_weights_and_sgd_keeps_one_buffer_per_parameter() -> None:
    bf16 = estimate(make_gpt2, batch=_ids, dtype="bf16", optimizer="sgd", device="cpu")
    fp32 = estimate(make_gpt2, batch=_ids, dtype="fp32", optimizer="sgd", device="cpu")
    params = bf16.meta["estimate"]["num_parameters"]
    assert bf16.peak().by_category["parameter"] == 2 * params
    assert fp32.peak().by_category["parameter"] == 4 * params
    # SGD with momentum: one buffer per parameter, in the parameter's dtype
    assert fp32.optimizers[0]["state_bytes"] == 4 * params
    assert bf16.optimizers[0]["state_bytes"] == 2 * params


def test_adafactor_state_equals_a_real_step() -> None:
    # Adafactor reads param.norm().item(); fake tensors get a stand-in value for it
    est = estimate(make_gpt2, batch=_ids, dtype="fp32", optimizer="adafactor", device="cpu")
    model = make_gpt2()
    optimizer = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    model(**_ids()).loss.backward()
    optimizer.step()
    real = sum(v.untyped_storage().nbytes() for state in optimizer.state.values()
               for v in state.values() if isinstance(v, torch.Tensor))
    assert est.optimizers[0]["class"] == "Adafactor"
    assert est.optimizers[0]["state_bytes"] == real
    # factored: far less than AdamW's two full-size buffers
    assert real < 0.5 * 4 * est.meta["estimate"]["num_parameters"]


def test_no_optimizer_keeps_only_gradients() -> None:
    est = estimate(make_gpt2, batch=_ids, dtype="fp32", optimizer="none", device="cpu")
    assert est.peak().by_category["optimizer_state"] == 0
    assert est.modules()["gradient"].sum() == 4 * est.meta["estimate"]["num_parameters"]


def test_mixed_precision_keeps_fp32_weights_and_shrinks_activations() -> None:
    # (a batch large enough that activations outweigh autocast's cached bf16 weight copies)
    def batch() -> dict[str, torch.Tensor]:
        return _ids(16, 32)

    mixed = estimate(make_gpt2, batch=batch, dtype="fp32", mixed_precision="bf16", device="cpu")
    full = estimate(make_gpt2, batch=batch, dtype="fp32", device="cpu")
    params = full.meta["estimate"]["num_parameters"]
    assert mixed.meta["estimate"]["parameter_bytes"] == 4 * params
    act = "activation_total"
    assert mixed.modules()[act].iloc[0] < full.modules()[act].iloc[0]
    with pytest.raises(EstimateError, match="fp32 weights"):
        estimate(make_gpt2, batch=_ids, dtype="fp16", mixed_precision="bf16")


def test_inference_keeps_a_kv_cache_of_the_context_length() -> None:
    # GIVEN the tiny GPT-2 (2 layers, 2 heads of 32), a prompt of 16 tokens, a 32-token cache
    est = estimate(make_gpt2, batch=lambda: {"input_ids": torch.zeros(2, 16, dtype=torch.long)},
                   dtype="fp32", device="cpu", inference=True, context_len=32, steps=1)
    info = est.meta["estimate"]
    # THEN the cache is layers x (k, v) x batch x heads x context x head_dim x 4 bytes
    assert info["kv_cache_bytes"] == 2 * 2 * 2 * 2 * 32 * 32 * 4
    assert info["mode"] == "inference" and info["optimizer"] == "none"
    by_cat = est.peak().by_category
    assert by_cat["gradient"] == by_cat["optimizer_state"] == by_cat["activation"] == 0
    assert est.peak().total_bytes >= info["parameter_bytes"] + info["kv_cache_bytes"]
    assert set(est.timeline()["phase"]) <= {"forward", "other"}
    with pytest.raises(EstimateError, match="must exceed"):
        estimate(make_gpt2, batch={"input_ids": torch.zeros(2, 16, dtype=torch.long)},
                 inference=True, context_len=16)


@pytest.mark.parametrize(("name", "parameters"), [
    ("gpt2", 124_439_808),
    ("gpt2-xl", 1_557_611_200),
    ("llama-2-7b", 6_738_415_616),
    ("llama-3-8b", 8_030_261_248),
    ("mistral-7b", 7_241_732_096),
    ("bert-base", 109_514_298),
    ("vit-base", 86_567_656),
])
def test_catalog_shapes_have_the_published_parameter_counts(name: str, parameters: int) -> None:
    spec = build_spec(name)
    est = estimate(spec, batch=lambda: spec.make_batch(1, 8), inference=True, steps=1)
    assert est.meta["estimate"]["num_parameters"] == parameters
    assert est.meta["estimate"]["parameter_bytes"] == 2 * parameters  # bf16


def test_every_known_model_builds_a_spec() -> None:
    for name in KNOWN_MODELS:
        assert build_spec(name).name == name


def test_misspelt_model_name_suggests_the_close_ones() -> None:
    with pytest.raises(EstimateError, match=r"'lama-2-7b': did you mean 'llama-2-7b'"):
        build_spec("lama-2-7b")
    with pytest.raises(EstimateError) as far:  # nothing close: no guess
        build_spec("resnet")
    assert "did you mean" not in str(far.value)


def test_api_errors_are_estimate_errors(tmp_path: Path) -> None:
    with pytest.raises(EstimateError, match=r"unknown model 'gpt5'.*llama-2-7b"):
        build_spec("gpt5")

    def broken() -> nn.Module:
        raise RuntimeError("boom")

    with pytest.raises(EstimateError, match="factory failed: RuntimeError: boom"):
        estimate(broken, batch={})
    with pytest.raises(EstimateError, match="unknown optimizer"):
        estimate(make_mlp, batch=torch.zeros(1, 64), optimizer="lion")
    with pytest.raises(EstimateError, match="branches on tensor values"):
        estimate(_ValueDependent, batch=torch.zeros(1, 64))


class _ValueDependent(nn.Module):
    """A forward that looks at values: fake tensors have none."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if bool(out.sum() > 0) else -out


# ------------------------------------------------------------------ CLI
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memprof.cli", "estimate", *args], capture_output=True,
        text=True, cwd=cwd, timeout=300, check=False,
    )


TINY_MODELS = textwrap.dedent("""
    import transformers

    def tiny_gpt2():
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32,
            bos_token_id=0, eos_token_id=0))

    def broken():
        raise RuntimeError("no weights here")
""")


def test_cli_estimates_a_factory_and_writes_a_loadable_profile(tmp_path: Path) -> None:
    (tmp_path / "tinymodels.py").write_text(TINY_MODELS)
    out = tmp_path / "reports" / "tiny.json"
    result = _cli("tinymodels:tiny_gpt2", "--batch-size", "2", "--seq-len", "16",
                  "--dtype", "fp32", "--device", "cpu", "--json", "-o", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    # the same numbers as the API on the same model and batch
    api = estimate(make_gpt2, batch=_ids, dtype="fp32", device="cpu")
    assert data["peak"]["total_bytes"] == api.peak().total_bytes
    assert data["peak"]["by_category"] == api.peak().by_category
    assert [row["module"] for row in data["layers"]] == ["transformer.h.0", "transformer.h.1"]
    assert data["mode"] == "training" and data["fit"] is None
    loaded = memprof.load(out)
    assert loaded.device.kind == "fake"
    assert loaded.meta["estimate"]["peak_bytes"] == api.peak().total_bytes
    # refuses to overwrite without --force
    again = _cli("tinymodels:tiny_gpt2", "--device", "cpu", "-o", str(out), cwd=tmp_path)
    assert again.returncode != 0 and "--force" in again.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["gpt5"], "unknown model 'gpt5'"),
    (["cfg/config.json"], "transformers cannot build a config of model_type 'not-a-model'"),
    (["bad/config.json"], "transformers cannot build GPT2LMHeadModel from this config"),
    (["tinymodels:broken"], "the model factory failed: RuntimeError: no weights here"),
    (["tinymodels:missing"], "has no callable 'missing'"),
])
def test_cli_bad_input_is_one_line_and_a_nonzero_exit(
    tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "tinymodels.py").write_text(TINY_MODELS)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    (tmp_path / "bad").mkdir()  # a config transformers accepts but cannot build a model from
    (tmp_path / "bad" / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_embd": 10, "n_head": 3, "n_layer": 1}))
    result = _cli(*args, "--seq-len", "8", cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    lines = [line for line in result.stderr.splitlines()
             if line.startswith("memprof") or "Traceback" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    if args == ["gpt5"]:
        assert "llama-2-7b" in result.stderr and "vit-base" in result.stderr


# ------------------------------------------------------------------ fit verdict (--gpu)
def test_gpu_gives_a_fit_verdict_including_the_cuda_context() -> None:
    gpus = pytest.importorskip("memprof.gpus")
    spec = gpus.lookup("T4")
    est = estimate(make_gpt2, batch=_ids, gpu="T4")
    fit = est.meta["estimate"]["fit"]
    assert fit["budget_bytes"] == spec.driver_bytes
    replay = est.allocator["replay"]
    cached = replay["reserved_peak_bytes"] - replay["allocated_peak_bytes"]
    # less the context and what the allocator replay caches beyond the tensors
    assert fit["usable_bytes"] == spec.driver_bytes - CUDA_CONTEXT_BYTES - cached
    assert fit["needed_bytes"] == est.peak().total_bytes + cached + CUDA_CONTEXT_BYTES
    assert fit["fits"] is True
    assert fit["headroom_bytes"] == fit["usable_bytes"] - est.peak().total_bytes
    # GIVEN a budget smaller than the CUDA context: nothing fits
    tight = estimate(make_gpt2, batch=_ids, gpu="512MiB")
    assert tight.meta["estimate"]["fit"]["fits"] is False


def test_cli_unknown_gpu_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("memprof.gpus")
    result = _cli("gpt2", "--gpu", "Voodoo 3dfx", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown GPU 'Voodoo 3dfx'" in result.stderr and "H100 80GB" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_cli_gpu_verdict_and_plan_note(tmp_path: Path) -> None:
    pytest.importorskip("memprof.gpus")
    # --analytic: the fake-run advice of a 124M model is test_plans' subject, at a tiny size
    result = _cli("gpt2", "--seq-len", "64", "--gpu", "H100 80GB", "--analytic", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "H100 80GB" in result.stdout and "fits" in result.stdout
    if importlib.util.find_spec("memprof.advisor") is None:
        assert "no plan" in result.stderr


# ------------------------------------------------------------------ later stages read it
def test_the_html_report_and_the_advisor_take_an_estimate(tmp_path: Path) -> None:
    report = pytest.importorskip("memprof.report")
    est = estimate(make_gpt2, batch=_ids)
    path = report.write_report(est, tmp_path / "estimate.html")
    assert path.stat().st_size > 0
    advisor = pytest.importorskip("memprof.advisor")
    advice = advisor.advise(est, budget=est.peak().total_bytes // 2)
    assert advice is not None
