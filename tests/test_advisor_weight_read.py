"""Rows that swap or hook a layer, on a model that reads a layer's ``.weight`` directly and never
runs its forward (Mamba's mixer does ``dt_proj.weight @ ...``), issue #25: the torch prune row
failed ("backward through the graph a second time") and int8/int4 quantization failed (the
quantized layer's weight is no float tensor)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memprof.advisor import changes_for, read_facts
from memprof.advisor.workload import Workload, baseline, seeded, simulate


class _ReadsAWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 16)
        self.direct = nn.Linear(16, 16)  # its forward never runs
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.relu(self.a(x)))
        return self.head(h @ self.direct.weight.t())


def _rows() -> tuple[Workload, list, object]:
    torch.manual_seed(0)
    model = _ReadsAWeight()
    workload = Workload(model, torch.optim.AdamW(model.parameters()), torch.randn(8, 16),
                        step_fn=lambda net, x: net(x).pow(2).mean(), steps=2)
    with seeded():
        reference = baseline(workload)
    return workload, changes_for(read_facts(reference.profile)), reference


def test_prune_leaves_out_a_layer_whose_forward_never_runs() -> None:
    workload, changes, reference = _rows()
    row = next(c for c in changes if c.options.get("state") == "before prune.remove")
    assert row.applicable
    assert any("left out: 1 layer" in c and "direct" in c for c in row.caveats)
    assert row.apply is not None
    with seeded():
        measured = simulate(workload, [row.apply], reference)  # runs
    assert measured.peak_bytes > reference.peak_bytes  # masks and recomputed weights


def test_quantization_leaves_out_a_layer_whose_forward_never_runs() -> None:
    workload, changes, reference = _rows()
    rows = [c for c in changes
            if c.technique == "quantization" and c.applicable and "weights" in c.options]
    assert [c.options["layers"] for c in rows] == ["2 Linear", "2 Linear"]  # a and b
    for row in rows:
        assert row.apply is not None
        with seeded():
            simulate(workload, [row.apply], reference)  # runs


def test_lora_on_a_mamba_model_leaves_out_what_peft_refuses() -> None:
    """GIVEN a tiny Mamba (transformers) WHEN the LoRA rows pick their layers THEN out_proj and
    conv1d, which peft refuses on Mamba models (every LoRA and QLoRA row of the pattern zoo's
    Mamba failed with peft's ValueError), are left out with that reason, and the row runs."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from memprof.advisor import lora

    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=64, hidden_size=32, state_size=4,
                                      num_hidden_layers=1, expand=2, conv_kernel=4)
    model = transformers.MambaForCausalLM(config)
    ids = torch.randint(0, 64, (1, 8))
    workload = Workload(model, torch.optim.AdamW(model.parameters()),
                        {"input_ids": ids, "labels": ids}, steps=2)
    with seeded():
        reference = baseline(workload)
    facts = read_facts(reference.profile)
    _, names = lora.targets(facts)
    assert names and not any(n.endswith(("out_proj", "conv1d")) for n in names)
    row = next(c for c in lora.predict(facts) if c.applicable)
    assert any("peft refuses" in c for c in row.caveats)
    assert row.apply is not None
    with seeded():
        simulate(workload, [row.apply], reference)  # peft raised for out_proj before


def test_a_compiled_models_uncalled_modules_are_not_read_directly() -> None:
    """A layer counts as read directly when its forward never ran but its parent's did; a
    compiled model's modules show no call at all (no hook sees them) and keep every row."""
    from memprof.advisor.core import weight_read_directly

    def row(module: str, parent: str | None, calls: int, kind: str = "Linear"
            ) -> dict[str, object]:
        return {"module": module, "parent": parent, "forward_calls": calls, "type": kind}

    compiled = [row("", None, 2, "OptimizedModule"), row("_orig_mod", "", 0),
                row("_orig_mod.0", "_orig_mod", 0)]
    assert weight_read_directly(compiled) == set()
    mixer = [row("", None, 2), row("mixer", "", 2), row("mixer.in_proj", "mixer", 2),
             row("mixer.dt_proj", "mixer", 0)]
    assert weight_read_directly(mixer) == {"mixer.dt_proj"}
