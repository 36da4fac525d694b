"""The checkpointing prediction's terms, checked against the baseline profile's own numbers.

GIVEN a baseline profile, WHEN the checkpointing plan is read from it, THEN what each block
frees is its ``activation_total`` less what stays live: its input when the profile charged
that input to the block (its first layer saved it), and its output when the next block's
first layer saved nothing, i.e. the next block's input was charged to this one. The
predicted peak is the baseline's sample inside the recomputed block's backward (its
recomputed activations and its backward temporaries together) less what the blocks before it
free. And the simulation drops a transformers key/value cache for checkpointed blocks, as
transformers' own gradient checkpointing does.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from workloads import cnn_workload, measured, wide_mlp_workload

from memprof.advisor import changes_for, read_facts
from memprof.advisor.checkpointing import plan_blocks, wrap
from memprof.advisor.workload import Workload, baseline, seeded, simulate

pytestmark = pytest.mark.slow  # simulations of checkpointed real models


def _measured(name: str) -> Any:
    return measured(name, {"cnn": cnn_workload, "wide": wide_mlp_workload}[name])


def _row(facts: Any, module: str) -> dict[str, Any]:
    return next(r for r in facts.module_rows() if r["module"] == module)


def test_conv_blocks_keep_the_previous_blocks_output() -> None:
    """Conv -> BN -> ReLU blocks: the ReLU saved its output, which the next block's convolution
    needs (its first layer's own activation is 0: the input was charged to the ReLU)."""
    _w, ref = _measured("cnn")
    facts = read_facts(ref.profile)
    _names, _dropped, _kept, _recompute, order = plan_blocks(facts, 1.0)
    freed = dict(order)
    assert _row(facts, "1.0")["activation"] == 0 and _row(facts, "2.0")["activation"] == 0
    for block, output in (("0", "0.2"), ("1", "1.2")):
        expected = _row(facts, block)["activation_total"] - _row(facts, output)["activation"]
        assert freed[block] == expected > 0
    # the last block's output goes to the pool, which saves nothing: all of it is freed
    assert freed["2"] == _row(facts, "2")["activation_total"]


def test_cnn_peak_is_the_last_blocks_recompute_over_the_earlier_blocks_leftovers() -> None:
    w, ref = _measured("cnn")
    facts = read_facts(ref.profile)
    change = next(c for c in changes_for(facts) if c.technique == "checkpointing" and c.applicable)
    _names, _dropped, _kept, _recompute, order = plan_blocks(facts, 1.0)
    freed = dict(order)
    peak = ref.profile.peak()
    assert peak.phase == "backward" and peak.module.startswith("2.")
    # the baseline's peak sits in block 2's backward; blocks 0 and 1 only free what they leave
    assert change.predicted_peak == peak.total_bytes - freed["0"] - freed["1"]
    with seeded():
        m = simulate(w, [change.apply], ref)
    assert abs(change.predicted_peak - m.peak_bytes) / m.peak_bytes <= 0.01
    # measured: block 2's recomputed activations are temporaries, the kept inputs activations
    at_peak = m.profile.peak()
    assert at_peak.module.startswith("2.")
    kept = _row(facts, "0.2")["activation"] + _row(facts, "1.2")["activation"]
    assert at_peak.by_category["activation"] == pytest.approx(kept, abs=2048)


def test_linear_blocks_own_their_input() -> None:
    """Linear -> GELU blocks: each Linear saved its input (charged to its block), so a block
    frees ``activation_total`` less that input and nothing of the previous block stays."""
    _w, ref = _measured("wide")
    facts = read_facts(ref.profile)
    _names, _dropped, _kept, _recompute, order = plan_blocks(facts, 1.0)
    freed = dict(order)
    assert freed["0"] == _row(facts, "0")["activation_total"]  # its input is the batch
    for block in ("1", "2", "3"):
        own = _row(facts, f"{block}.0")["activation"]
        assert own > 0
        assert freed[block] == _row(facts, block)["activation_total"] - own


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.seen: list[Any] = []

    def forward(self, x: torch.Tensor, cache: Any = None, *, past: Any = None) -> torch.Tensor:
        self.seen.append((cache, past))
        return self.linear(x).relu()


def test_wrap_drops_a_transformers_cache_only_when_recomputation_would_run() -> None:
    cache_utils = pytest.importorskip("transformers.cache_utils")
    cache = cache_utils.DynamicCache()
    module = _Recorder()
    wrap(module)
    x = torch.randn(2, 4, requires_grad=True)
    module(x, cache, past=cache).sum().backward()
    assert module.seen and all(seen == (None, None) for seen in module.seen)
    module.seen.clear()
    with torch.no_grad():  # no checkpoint, no recompute: the cache is passed on
        module(x, cache, past=cache)
    assert module.seen == [(cache, cache)]


def test_wrap_keeps_the_cache_of_layers_that_only_read_it() -> None:
    cache_utils = pytest.importorskip("transformers.cache_utils")
    cache = cache_utils.DynamicCache()
    module = _Recorder()
    module._can_checkpoint_with_cache = True  # type: ignore[assignment]
    wrap(module)
    module(torch.randn(2, 4, requires_grad=True), cache).sum().backward()
    assert module.seen[0] == (cache, None)


def test_wrap_leaves_other_arguments_alone() -> None:
    module = _Recorder()
    wrap(module)
    marker = {"not": "a cache"}
    module(torch.randn(2, 4, requires_grad=True), marker).sum().backward()
    assert module.seen[0] == (marker, None)


def test_gpt2_recompute_leaves_no_second_cache_copy_behind() -> None:
    """GPT-2 with ``use_cache`` on (its config's default): with the cache passed to the
    checkpointed blocks, the recompute appended each block's keys and values to it again and the
    cache, held by the checkpoints' saved arguments, kept those copies and every block's kept
    input alive to the end of backward (+1 MiB, 13% above the prediction). Without it, at the
    peak in the first block's backward only that block's kept input is an activation, and the
    prediction is within the 5% of the issue."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    assert model.config.use_cache
    ids = torch.randint(0, 128, (8, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    w = Workload(model, opt, {"input_ids": ids, "labels": ids}, steps=2)
    with seeded():
        ref = baseline(w)
    facts = read_facts(ref.profile)
    change = next(c for c in changes_for(facts) if c.technique == "checkpointing" and c.applicable)
    assert change.options["modules"] and len(change.options["modules"]) == 2
    with seeded():
        m = simulate(w, [change.apply], ref)
    peak = m.profile.peak()
    assert peak.phase == "backward" and peak.module.startswith("transformer.h.0.")
    assert not any(k.startswith("transformer.h.1") and "activation" in v
                   for k, v in peak.by_module.items())  # fmt: skip
    assert not any(k.startswith("transformer.h.1") and "temporary" in v
                   for k, v in peak.by_module.items())  # fmt: skip
    assert change.predicted_peak is not None
    assert abs(change.predicted_peak - m.peak_bytes) / m.peak_bytes <= 0.05


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class _ResNet(nn.Module):
    """A stem (conv, BatchNorm, ReLU: a Sequential of three lone layers) then residual blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 8, 1))
        self.layers = nn.Sequential(*[_Residual(8) for _ in range(3)])
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))


def _resnet_workload() -> Workload:
    torch.manual_seed(0)
    model = _ResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Workload(model, opt, (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))), steps=2)


def test_resnet_checkpoints_residual_blocks_never_a_lone_norm_and_no_duplicate_rows() -> None:
    """On main the stem's Sequential (it saves more than the residual blocks, at full
    resolution) was taken as the blocks and the rows checkpointed its lone layers, the
    BatchNorm ``stem.1`` among them."""
    w = _resnet_workload()
    with seeded():
        ref = baseline(w)
    facts = read_facts(ref.profile)
    rows = [c for c in changes_for(facts) if c.technique == "checkpointing" and c.applicable]
    chosen = [tuple(c.options["modules"]) for c in rows]
    assert len(chosen) == len(set(chosen)) >= 1
    assert {m for c in chosen for m in c} <= {"layers.0", "layers.1", "layers.2"}
    full = next(c for c in rows if len(c.options["modules"]) == 3)
    assert any("BatchNorm" in caveat for caveat in full.caveats)
    assert full.apply is not None and full.predicted_peak is not None
    with seeded():
        m = simulate(w, [full.apply], ref)
    assert m.peak_bytes < ref.peak_bytes and full.predicted_peak < ref.peak_bytes


def test_recomputed_batchnorm_updates_its_running_statistics_once() -> None:
    """Recomputing a training-mode BatchNorm in backward must not update its statistics a
    second time: the checkpointed step leaves exactly the buffers of the plain step."""
    torch.manual_seed(0)
    plain = _Residual(4)
    checkpointed = _Residual(4)
    checkpointed.load_state_dict(plain.state_dict())
    wrap(checkpointed)
    x = torch.randn(2, 4, 8, 8)
    for model in (plain, checkpointed):
        model(x.clone().requires_grad_()).sum().backward()
    for name, buffer in plain.named_buffers():
        assert torch.equal(buffer, dict(checkpointed.named_buffers())[name]), name
    assert int(checkpointed.bn1.num_batches_tracked) == 1
    for p, q in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


class _Rows:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def module_rows(self) -> list[dict[str, Any]]:
        return self.rows


def _r(module: str, type_: str, parent: str, total: int) -> dict[str, Any]:
    return {"module": module, "type": type_, "parent": parent, "activation": total,
            "activation_total": total, "forward_time_s": 1e-3}


def test_blocks_are_subtrees_before_a_container_of_lone_layers() -> None:
    """GIVEN a stem of lone layers that saves more than the residual blocks, THEN the blocks
    are the residual blocks (on main: the stem's conv, BatchNorm and ReLU)."""
    from memprof.advisor.checkpointing import find_blocks

    rows = [
        _r("stem", "Sequential", "", 2100), _r("stem.0", "Conv2d", "stem", 100),
        _r("stem.1", "BatchNorm2d", "stem", 1000), _r("stem.2", "ReLU", "stem", 1000),
        _r("layers", "Sequential", "", 600),
        _r("layers.0", "Block", "layers", 300), _r("layers.0.conv", "Conv2d", "layers.0", 300),
        _r("layers.1", "Block", "layers", 300), _r("layers.1.conv", "Conv2d", "layers.1", 300),
    ]
    assert [r["module"] for r in find_blocks(_Rows(rows))] == ["layers.0", "layers.1"]  # type: ignore[arg-type]
    # a container of lone layers only: never the norm
    mlp = [_r("net", "Sequential", "", 30), _r("net.0", "Linear", "net", 10),
           _r("net.1", "LayerNorm", "net", 10), _r("net.2", "Linear", "net", 10)]
    facts = _Rows(mlp)
    names, *_ = plan_blocks(facts, 1.0)  # type: ignore[arg-type]
    assert "net.1" not in names and set(names) <= {"net.0", "net.2"}


def test_fake_run_charges_the_cpu_rng_states_a_checkpoint_keeps() -> None:
    """GIVEN small MLP blocks on the CPU, WHEN every checkpointing row runs on fake tensors
    and for real, THEN the peaks are equal to the byte: the fake run charges the CPU RNG state
    each checkpoint stashes (and the recompute's fork), which are made outside the dispatcher
    (on main the fake run missed one 5,056 B state per checkpointed block)."""
    from memprof.advisor.fake_prediction import fake_peak

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
                            for _ in range(3)])
    w = Workload(model, torch.optim.SGD(model.parameters(), lr=0.1),
                 (torch.randn(8, 16), torch.randint(0, 16, (8,))), steps=2)
    with seeded():
        ref = baseline(w)
    rows = [c for c in changes_for(read_facts(ref.profile))
            if c.technique == "checkpointing" and c.apply is not None]
    assert rows
    state_bytes = torch.get_rng_state().numel()
    for change in rows:
        with seeded():
            predicted = fake_peak(w, [change.apply])
            measured = simulate(w, [change.apply], ref).peak_bytes
        assert predicted == measured
        assert measured - ref.peak_bytes >= state_bytes  # a state kept per checkpointed block
    from memprof.advisor.checkpointing import _fake_cpu_run

    assert not _fake_cpu_run()  # outside a fake profile nothing is stood in
