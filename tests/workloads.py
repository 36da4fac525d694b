"""Small real training workloads the advisor tests (and benchmarks/advisor_accuracy.py) share,
and a cache of their measured baselines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from memprof.advisor import Workload
from memprof.advisor.workload import Measurement, baseline, seeded


def mlp_workload() -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Workload(model, opt, (torch.randn(128, 64), torch.randint(0, 10, (128,))), steps=2)


def wide_mlp_workload() -> Workload:
    """Activation-heavy (large batch): the peak is in backward, where checkpointing acts."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(128, 128), nn.GELU()) for _ in range(4)]
    model = nn.Sequential(*blocks, nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Workload(model, opt, (torch.randn(1024, 128), torch.randint(0, 10, (1024,))), steps=2)


def cnn_workload() -> Workload:
    torch.manual_seed(0)

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    model = nn.Sequential(
        block(3, 16),
        block(16, 16),
        block(16, 16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Workload(model, opt, (torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))), steps=2)


def gpt2_workload(
    *, layers: int = 2, width: int = 64, heads: int = 2, vocab: int = 128, seq: int = 64,
    batch: int = 8, lr: float = 1e-3,
) -> Workload:
    """GPT-2 from a small config (random weights, no dropout), AdamW, labels = inputs."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=heads,
        vocab_size=vocab,
        n_positions=seq,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ids = torch.randint(0, vocab, (batch, seq))
    return Workload(model, opt, {"input_ids": ids, "labels": ids}, steps=2)


def llama_workload() -> Workload:
    """Llama from a small config (grouped-query attention), AdamW, labels = inputs."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 128, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Workload(model, opt, {"input_ids": ids, "labels": ids}, steps=2)


_CACHE: dict[str, tuple[Workload, Measurement]] = {}


def measured(name: str, factory: Callable[[], Workload]) -> tuple[Workload, Measurement]:
    if name not in _CACHE:
        w = factory()
        with seeded():
            ref = baseline(w)
        _CACHE[name] = (w, ref)
    return _CACHE[name]


def estimate_shaped_run(model: nn.Module, call: Callable[[nn.Module], Any], *, steps: int = 2,
                        loss_fn: Any = None, backend: str = "dispatch") -> Any:
    """The step ``memprof.estimate`` runs, for real on the CPU and profiled by memprof: forward
    (``call(model)``), the loss (``output.loss``, or ``loss_fn(output)``), backward, AdamW over
    the trained parameters, ``zero_grad(set_to_none=True)``; the Profile.

    ``dispatch`` is the backend the estimate itself uses (fake tensors allocate nothing, so
    there are no allocator events); ``events`` reads the real allocator's events."""
    import memprof

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with memprof.profile(model, optimizer, backend=backend) as prof:  # type: ignore[arg-type]
        for _ in range(steps):
            output = call(model)
            loss = output.loss if loss_fn is None else loss_fn(output)
            del output
            loss.backward()
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            prof.step()
    return prof.profile


def estimate_shaped_peak(model: nn.Module, batch: Any) -> int:
    """The peak of :func:`estimate_shaped_run`'s two steps on ``batch`` (a tensor, or a dict
    passed as keyword arguments), its loss the output's ``"loss"``."""
    profile = estimate_shaped_run(
        model, lambda m: m(**batch) if isinstance(batch, dict) else m(batch),
        loss_fn=lambda output: output["loss"])
    return int(profile.peak().total_bytes)
