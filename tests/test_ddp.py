"""memprof on DDP in one process (gloo, one rank): what its collectives capture, and its buckets.

GIVEN a DistributedDataParallel model over a one-rank gloo group, WHEN it is profiled, THEN (1)
the all-reduce DDP's reducer launches in backward captures none of memprof's Python objects in
its thread state (a gloo work released on its worker thread with one of them needed the GIL: a
hang at teardown in CI, #25), and memprof's hooks are back for every later node and forward;
(2) each step's peak above its start equals the allocator's own events, also in the step where
the reducer frees the buckets its constructor made, before the profile, and makes new ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import memprof
from memprof.tracking.events import default_source
from memprof.tracking.ledger_mode import LedgerMode
from memprof.tracking.session import Profiler

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

BACKENDS = ["events", "dispatch"]


def _ddp(**options: Any) -> nn.parallel.DistributedDataParallel:
    torch.manual_seed(0)
    return nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8)), **options)


def _memprof_in_state(prof: Profiler) -> list[str]:
    """memprof's objects in this thread's state now: its pack hook as the innermost one, its
    dispatch mode anywhere on the stack."""
    found = []
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if top is not None and getattr(top[0], "__self__", None) is prof:
        found.append("saved_tensors_hooks")
    for i in range(torch._C._len_torch_dispatch_stack()):
        if isinstance(torch._C._get_dispatch_stack_at(i), LedgerMode):
            found.append("LedgerMode")
    return found


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_all_reduce_captures_no_memprof_object(one_rank: None, backend: str) -> None:
    # GIVEN DDP whose comm hook notes the thread state its all-reduce is launched with (what
    # the gloo work copies), and a forward pre-hook noting the state each forward runs with
    model = _ddp()
    holder: list[Profiler] = []
    at_all_reduce: list[list[str]] = []
    at_forward: list[list[str]] = []

    def comm_hook(state, bucket):  # type: ignore[no-untyped-def]  # (DDP reads annotations)
        at_all_reduce.append(_memprof_in_state(holder[0]))
        work = dist.all_reduce(bucket.buffer(), async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    model.register_comm_hook(None, comm_hook)
    model.module[0].register_forward_pre_hook(
        lambda module, args: at_forward.append(_memprof_in_state(holder[0])))
    opt = torch.optim.AdamW(model.parameters())
    # WHEN two steps are profiled
    with memprof.profile(model, opt, backend=backend) as prof:  # type: ignore[arg-type]
        holder.append(prof)
        for _ in range(2):
            model(torch.randn(4, 64)).sum().backward()
            opt.step()
            opt.zero_grad()
            prof.step()
    # THEN each step's one bucket was all-reduced with none of memprof's objects in the state
    assert at_all_reduce == [[], []]
    # AND every forward ran with them (taken off only inside AccumulateGrad: not for good)
    expected = ["saved_tensors_hooks"] + (["LedgerMode"] if backend == "dispatch" else [])
    assert at_forward == [expected, expected]
    # AND the gradients were still seen as gradients
    frame = prof.modules().set_index("module")
    assert frame.loc["module.0", "gradient"] == 4 * (64 * 128 + 128)


def test_a_gradient_hook_called_outside_autograd_leaves_the_state_alone(one_rank: None) -> None:
    """FSDP2 calls its sharded parameters' post-accumulate-grad hooks itself, outside any
    autograd node, where no engine guard would put memprof's hooks back."""
    layer = nn.Linear(8, 8)
    with memprof.profile(layer) as prof:
        layer(torch.randn(2, 8)).sum().backward()  # a gradient, as FSDP2 has made one
        # WHEN the parameter's hooks are called by hand, with a process group running
        for hook in layer.weight._post_accumulate_grad_hooks.values():  # type: ignore[union-attr]
            hook(layer.weight)
        # THEN memprof's saved-tensor hooks are still the innermost
        assert _memprof_in_state(prof) == ["saved_tensors_hooks"]


def _step_of(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[int], None]:
    def step(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(32, 64, generator=g), torch.randint(0, 8, (32,), generator=g)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _allocator_steps(build: Callable[[], tuple[nn.Module, torch.optim.Optimizer]],
                     steps: int) -> list[int]:
    """Per step, the most bytes above the step's start in the allocator's own events,
    recorded from before the model is built (no memprof hook installed)."""
    source = default_source()
    source.start()
    step = _step_of(*build())
    source.mark(-1)
    for i in range(steps):
        step(i)
        source.mark(i)
    live, start, most, sizes, peaks = 0, 0, 0, {}, []
    for _when, ptr, value in source.stop():
        if ptr == -1:
            peaks.append(most - start)
            start = most = live
        elif ptr > 0 and value > 0:
            sizes[ptr] = value
            live += value
            most = max(most, live)
        elif ptr > 0:
            live -= sizes.pop(ptr, 0)
    return peaks[1:]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("built", ["before", "inside"])
def test_ddp_step_peaks_equal_the_allocator_at_every_step(one_rank: None, backend: str,
                                                           built: str) -> None:
    """GIVEN DDP built before the profile (its constructor made the first bucket, which the
    reducer frees in step 1 when it rebuilds its buckets) or inside it, WHEN three steps are
    profiled, THEN each step's peak above its start is the allocator's, to 0.1% (step 1 read
    the whole bucket high on the events backend: +14.3%), and no bucket is counted twice."""
    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = _ddp()
        return model, torch.optim.AdamW(model.parameters())

    truth = _allocator_steps(build, 3)
    if built == "before":
        model, opt = build()
        prof = memprof.profile(model, opt, backend=backend)  # type: ignore[arg-type]
        with prof:
            step = _step_of(model, opt)
            for i in range(3):
                step(i)
                prof.step()
    else:
        prof = memprof.profile(backend=backend)  # type: ignore[arg-type]
        with prof:
            model, opt = build()
            step = _step_of(model, opt)
            for i in range(3):
                step(i)
                prof.step()
    stats = prof.profile.steps_stats
    ours = [s.peak_bytes - s.start_bytes for s in stats]
    first = 0 if built == "before" else 1  # (step 0 built the model: its start is before it)
    for i in range(first, 3):
        assert abs(ours[i] - truth[i]) <= 0.001 * stats[i].peak_bytes, (i, ours, truth)
    # AND at the end: the parameters, AdamW's two states and four 4-byte steps, and the one
    # bucket (a flat copy of every gradient), once
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert stats[-1].end_bytes == params + 2 * params + 4 * 4 + params
