"""The operator trace a profile carries, and its replay under autocast from the file alone."""

from __future__ import annotations

import contextlib
import gc
import json
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

import memprof
from memprof.advisor.mixed_precision import _apply_autocast
from memprof.advisor.trace_replay import replay_autocast
from memprof.advisor.workload import Workload, baseline, copy_state, seeded, simulate
from memprof.tracking.op_trace import BACKWARD, FORWARD, MADE, PARAMETER

AUTOCAST_BF16 = {"mode": "autocast", "dtype": "bf16"}


def _mlp_step(record_ops: bool = True) -> tuple[memprof.Profile, weakref.ref]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(32, 64)
    kept = None
    with memprof.profile(model, opt, record_ops=record_ops) as prof:
        for _ in range(3):
            hidden = model(x)
            kept = weakref.ref(hidden)
            hidden.sum().backward()
            opt.step()
            opt.zero_grad()
            del hidden
            prof.step()
    assert kept is not None
    return prof.profile, kept


def test_trace_is_recorded_and_keeps_nothing_alive():
    profile, kept = _mlp_step()
    gc.collect()
    assert kept() is None  # the trace holds storages weakly
    assert _get_current_dispatch_mode() is None  # its dispatch mode is gone
    trace = profile.op_trace
    assert trace is not None and trace["step"] in (0, 1)  # one of the first two steps
    names = [trace["names"][i] for i in trace["ops"]["name"]]
    assert names.count("addmm") == 2 and "threshold_backward" in names
    st = trace["storages"]
    # the two weights and biases were there before the step: parameters
    params = [n for n, k in zip(st["nbytes"], st["kind"], strict=True) if k == PARAMETER]
    assert sorted(params) == sorted([64 * 256 * 4, 256 * 4, 256 * 8 * 4, 8 * 4])
    # autograd saved the first layer's output's ReLU result (read by threshold_backward)
    assert trace["saves"] and all(0 <= s < len(st["nbytes"]) for s, _, _ in trace["saves"])
    assert sum(st["grad"]) == 4  # four .grad tensors
    # replayed unchanged, the trace gives its step's measured peak (the optimizer's in-place
    # updates of its state are no new storages)
    step_peak = {s.step: s.peak_bytes for s in profile.steps_stats}[trace["step"]]
    assert replay_autocast(trace).baseline_peak == pytest.approx(step_peak, rel=0.001)


def test_no_trace_when_turned_off_and_old_files_load(tmp_path):
    profile, _ = _mlp_step(record_ops=False)
    assert profile.op_trace is None
    path = tmp_path / "p.json"
    profile.save(path)
    data = json.loads(path.read_text())
    del data["op_trace"]  # a file written before the trace existed
    path.write_text(json.dumps(data))
    loaded = memprof.load(path)
    assert loaded.op_trace is None
    rows = [r for r in memprof.advise(loaded).rows if r["options"] == AUTOCAST_BF16]
    assert rows[0]["predicted_by"] == "analytic"


def _trace(
    ops: list[tuple[str, int, list[int], list[int]]],
    storages: list[tuple],
    saves: list[tuple[int, int, int]],
) -> dict:
    """A hand-made trace: ops (name, phase, inputs, outputs); storages (nbytes, dtype, kind,
    made, freed, shape, grad)."""
    names = sorted({o[0] for o in ops})
    return {
        "version": 1,
        "step": 0,
        "start_bytes": 1000,
        "device": "cpu",
        "names": names,
        "modules": [""],
        "dtypes": ["float32", "int64"],
        "ops": {
            "name": [names.index(o[0]) for o in ops],
            "phase": [o[1] for o in ops],
            "module": [0] * len(ops),
            "inputs": [o[2] for o in ops],
            "outputs": [o[3] for o in ops],
        },
        "storages": {
            k: [s[i] for s in storages]
            for i, k in enumerate(("nbytes", "dtype", "kind", "made", "freed", "shape", "grad"))
        },
        "saves": [list(p) for p in saves],
    }


def test_replay_of_a_matmul_by_hand():
    # x (400 B, made by op 0) -> mm(x, W) saves x and W; backward reads them; W's grad.
    ops = [
        ("mul", FORWARD, [], [1]),  # 0: x = 400 B fp32
        ("mm", FORWARD, [1, 0], [2]),  # 1: y = 200 B, saves x and W
        ("sum", FORWARD, [2], [3]),  # 2: loss, a 0-dim scalar
        ("ones_like", BACKWARD, [3], [4]),  # 3: grad of the loss
        ("expand_copy", BACKWARD, [4], [5]),  # 4: grad of y, 200 B
        ("mm", BACKWARD, [5, 1], [6]),  # 5: grad of W (800 B), reads x
    ]
    storages = [  # nbytes, dtype, kind, made, freed, shape, grad
        (800, 0, PARAMETER, -1, -1, [20, 10], 0),
        (400, 0, MADE, 0, 6, [10, 10], 0),
        (200, 0, MADE, 1, 3, [10, 5], 0),
        (4, 0, MADE, 2, 6, [], 0),
        (4, 0, MADE, 3, 5, [], 0),
        (200, 0, MADE, 4, 6, [10, 5], 0),
        (800, 0, MADE, 5, -1, [20, 10], 1),
    ]
    trace = _trace(ops, storages, saves=[(1, 1, 0), (0, 1, 0)])
    replay = replay_autocast(trace)
    # unchanged: the most is after op 5: x, loss, grad of y and W's grad live (1000 start)
    assert replay.baseline_peak == 1000 + 400 + 4 + 200 + 800
    # autocast: x's bf16 copy (200) is saved in x's place, x is freed after the mm; W's bf16
    # copy (400) lives to the end of the forward (no backward reads it); y and the loss are
    # bf16 (2 B); the grad of y, made from a 0-dim scalar, stays fp32 (200) and is cast down
    # for the mm (100); W's grad stays fp32 (800), its bf16 value (400) held while cast.
    assert replay.changed_peak == 1000 + 200 + 2 + 200 + 100 + 800 + 400


def _small_gpt2() -> Workload:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=128,
        n_head=4,
        vocab_size=2048,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 2048, (2, 128))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Workload(model, opt, {"input_ids": ids, "labels": ids}, steps=2)


def traced_run(workload: Workload, dtype: torch.dtype | None = None) -> memprof.Profile:
    """The workload's steps on a copy (under ``torch.autocast`` to ``dtype`` if given),
    profiled with the operator trace, as ``memprof run`` profiles a script."""
    state = copy_state(workload)
    model, optimizer = state.model, state.build_optimizer()
    with seeded(), memprof.profile(model, optimizer, record_ops=True) as prof:
        for _ in range(workload.steps):
            cast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
            with cast:
                loss = workload.loss(model, state.batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=workload.set_to_none)
            del loss
            prof.step()
    return prof.profile


def test_file_only_autocast_prediction_within_5_points(tmp_path):
    workload = _small_gpt2()
    with seeded():
        ref = baseline(workload)
    path = tmp_path / "p.json"
    traced = traced_run(workload)
    traced.save(path)
    advice = memprof.advise(memprof.load(path))  # the file alone: no model
    row = next(r for r in advice.rows if r["options"] == AUTOCAST_BF16)
    assert row["predicted_by"] == "trace replay"
    with seeded():
        measured = simulate(workload, [_apply_autocast(torch.bfloat16)], ref)
    base, file_base = ref.peak_bytes, traced.peak().total_bytes
    predicted = 100.0 * (file_base - row["predicted_peak_bytes"]) / file_base
    actual = 100.0 * (base - measured.peak_bytes) / base
    analytic = 100.0 * (file_base - row["analytic_peak_bytes"]) / file_base
    assert abs(predicted - actual) <= 5.0, (predicted, actual, analytic)


def test_a_storage_at_a_freed_ones_address_is_a_new_storage():
    # CPython reuses a freed object's address at once: the trace must not take the new storage
    # for the old one (it would record no output, and the step's bytes would be missed)
    x = torch.randn(64, 64)
    with memprof.profile(record_ops=True) as prof:
        for i in range(40):
            y = x * float(i)
            del y
        prof.step()
    trace = prof.profile.op_trace
    assert trace is not None
    made = [
        len(out)
        for name, out in zip(trace["ops"]["name"], trace["ops"]["outputs"], strict=True)
        if trace["names"][name] == "mul"
    ]
    assert made == [1] * 40


def _cnn() -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = (torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
    return Workload(model, opt, batch, steps=2)


@pytest.mark.parametrize("factory", [_cnn, _small_gpt2], ids=["cnn-batchnorm", "gpt2-dropout"])
def test_replay_matches_the_trace_of_the_autocast_run(factory):
    """The rules, without kernel scratch: the fp32 trace replayed under autocast gives the
    live operator outputs that the autocast run's own trace shows."""
    workload = factory()
    fp32 = traced_run(workload).op_trace
    bf16 = traced_run(workload, torch.bfloat16).op_trace
    assert fp32 is not None and bf16 is not None and fp32["step"] == bf16["step"]
    predicted = replay_autocast(fp32).changed_peak
    actual = replay_autocast(bf16).baseline_peak  # the autocast run as it ran
    assert predicted == pytest.approx(actual, rel=0.01)
    assert replay_autocast(fp32).saving > 0


def test_a_trace_that_misses_the_peak_leaves_the_row_analytic():
    profile, _ = _mlp_step()
    assert profile.op_trace is not None
    rows = [r for r in memprof.advise(profile).rows if r["options"] == AUTOCAST_BF16]
    assert rows[0]["predicted_by"] == "trace replay"
    profile.op_trace["start_bytes"] -= profile.peak().total_bytes // 10  # 10% unexplained
    rows = [r for r in memprof.advise(profile).rows if r["options"] == AUTOCAST_BF16]
    assert rows[0]["predicted_by"] == "analytic"
    assert "not replayed from the operator trace" in rows[0]["caveats"]
