"""The largest tensors at the peak name their real shape and dtype, and the line that made them."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

import memprof
from memprof.tracking.source import SourceSampler


class Wide(nn.Module):
    """A forward whose largest saved tensor is made on a known line."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = x.repeat(1, 64) * 2.0  # MARK: the largest activation
        return self.proj(big.sin().reshape(-1, 16)).sum()


def _mark_line() -> int:
    import inspect

    lines, start = inspect.getsourcelines(Wide.forward)
    return start + next(i for i, line in enumerate(lines) if "MARK" in line)


@pytest.mark.parametrize("backend", ["dispatch", "events"])
def test_largest_activation_has_its_shape_and_source_line(backend: str) -> None:
    model = Wide()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(64, 16)
    with memprof.profile(model, optimizer, backend=backend) as prof:
        for _ in range(2):
            model(x).backward()
            optimizer.step()
            optimizer.zero_grad()
            prof.step()
    tops = prof.peak().top_tensors
    # big.sin() saves `big` (64 x 1024 float32 = 256 KiB): the largest activation
    saved = [t for t in tops if t.category == "activation" and t.nbytes == 64 * 1024 * 4]
    assert saved, tops
    # the tensor's own shape (the storage seen through a view counts), not `uint8 [262144]`
    assert all(t.dtype == "float32" and t.shape in ([64, 1024], [4096, 16]) for t in saved)
    # made on the marked line (`big`, saved by sin) or the next (sin's output, saved by proj)
    lines = {f"{__file__}:{_mark_line() + i} in forward" for i in (0, 1)}
    assert all(t.source in lines for t in saved), saved
    # and the profile file keeps it
    again = memprof.Profile.from_dict(prof.profile.to_dict())
    assert again.peak().top_tensors == tops


def test_sampler_keeps_only_candidates_for_the_largest() -> None:
    sampler = SourceSampler(keep=2)
    taken = []
    for size in [10, 20, 5, 30, 20, 1, 40]:
        if size >= sampler.floor:
            sampler.take(size)
            taken.append(size)
    # the first two fill the heap; after that only sizes reaching the 2nd largest so far
    assert taken == [10, 20, 30, 20, 40]
    assert sampler.floor == 30


def test_sampler_threshold_adds_every_large_allocation() -> None:
    sampler = SourceSampler(keep=1, threshold=8)
    sampler.take(100)
    assert sampler.floor == 8  # the threshold is below the largest seen: it decides
    off = SourceSampler(keep=0)
    assert off.floor > 1 << 60


class SoftmaxHead(nn.Module):
    """A forward whose backward makes large temporaries in known nodes: softmax's backward
    makes the grad of its input, as large as its output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return torch.softmax(h, dim=-1)  # SOFTMAX: its node makes a 1 MiB grad in backward


def _line_of(function: object, mark: str) -> int:
    import inspect

    lines, start = inspect.getsourcelines(function)  # type: ignore[arg-type]
    return start + next(i for i, line in enumerate(lines) if mark in line)


def _train(model: nn.Module, x: torch.Tensor, steps: int,
           prof: memprof.Profiler | None = None) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weights = torch.linspace(-1.0, 1.0, 256 * 1024).reshape(256, 1024)
    losses = []
    for _ in range(steps):
        loss = (model(x) * weights).sum()  # LOSS: its node makes a 1 MiB grad in backward
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        if prof is not None:
            prof.step()
    return losses


@pytest.mark.parametrize("backend", ["dispatch", "events", "events from torch.profiler"])
def test_backward_temporaries_carry_their_forward_line(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GIVEN a model whose backward makes 1 MiB temporaries in softmax's and mul's nodes,
    WHEN it is profiled, THEN those temporaries at the peak name the forward lines that made
    the nodes (where the events backend knows them only as bytes), in the profile, the `memprof
    run` summary and the report's table."""
    from memprof.commands.run import largest_tensors_text
    from memprof.report.sections import top_tensors
    from memprof.tracking import events

    if backend == "events from torch.profiler":
        monkeypatch.setattr(events, "PREFERRED_SOURCE", "torch.profiler")
        backend = "events"
    torch.manual_seed(0)
    model = SoftmaxHead()
    x = torch.randn(256, 64)
    with memprof.profile(model, backend=backend) as prof:
        _train(model, x, 3, prof)
    softmax = f"{__file__}:{_line_of(SoftmaxHead.forward, 'SOFTMAX')} in forward"
    loss = f"{__file__}:{_line_of(_train, 'LOSS')} in _train"
    grads = [t for t in prof.peak().top_tensors
             if t.category == "temporary" and t.phase == "backward" and t.nbytes == 1 << 20]
    assert grads, prof.peak().top_tensors
    assert softmax in {t.source for t in grads}, grads
    assert {t.source for t in grads} <= {softmax, loss}, grads
    summary = largest_tensors_text(prof.profile, top=20)
    assert f"backward of {softmax}" in summary or "backward of tests" in summary, summary
    table = top_tensors(prof.profile)
    assert table is not None
    assert f"backward of {softmax}" in [row[-1] for row in table["rows"]]


@pytest.mark.parametrize("backend", ["dispatch", "events"])
def test_noting_forward_lines_keeps_nothing_alive_and_changes_no_result(backend: str) -> None:
    """GIVEN the same training run with and without the profiler, THEN losses and weights are
    bitwise equal, and a graph the profiler saw is freed by reference counting alone (no
    collection) once the user drops it, backwarded or not."""
    torch.manual_seed(0)
    plain = SoftmaxHead()
    profiled = SoftmaxHead()
    profiled.load_state_dict(plain.state_dict())
    x = torch.randn(256, 64)
    expected = _train(plain, x, 3)
    with memprof.profile(profiled, backend=backend) as prof:
        got = _train(profiled, x, 3, prof)
        # A graph never backwarded, and one backwarded: gone as soon as dropped.
        # (A node takes no weak reference: a probe in its metadata dies with it.)
        out = profiled(x)
        alive = [weakref.ref(out), _probe(out.grad_fn)]
        del out
        total = profiled(x).square().sum()
        square = total.grad_fn.next_functions[0][0]
        alive += [weakref.ref(total), _probe(total.grad_fn), _probe(square)]
        del square
        total.backward()
        del total
        prof.step()
        assert [ref() for ref in alive] == [None] * 5
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    for a, b in zip(plain.parameters(), profiled.parameters(), strict=True):
        assert torch.equal(a, b)


class _Probe:
    pass


def _probe(node: torch.autograd.graph.Node) -> weakref.ref[_Probe]:
    probe = _Probe()
    node.metadata["probe"] = probe
    return weakref.ref(probe)
