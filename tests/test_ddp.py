"""memprof on DDP in one process (gloo, one rank): what its collectives capture.

GIVEN a DistributedDataParallel model over a one-rank gloo group, WHEN it is profiled, THEN the
all-reduce DDP's reducer launches in backward captures none of memprof's Python objects in its
thread state (a gloo work released on its worker thread with one of them needed the GIL: a hang
at teardown in CI, #25), and memprof's hooks are back for every later node and forward.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import memprof
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
