"""Keeping memprof's Python objects out of the thread state that collectives capture (#25).

A gloo work object (``ProcessGroupGloo::AsyncWork``) copies its caller's ``at::ThreadLocalState``
when it is made: the saved-tensor default hooks and the Python dispatch mode stack among it,
each Python object held by a ``SafePyObject``, whose copy and release take the GIL. DDP's
reducer launches its all-reduce from a post hook of each parameter's ``AccumulateGrad`` node,
in backward, where the thread state is the one autograd captured when ``backward()`` was
called: memprof's saved-tensor hooks (both backends) and its dispatch mode (dispatch backend)
with it. The work is then released on the process group's worker thread, which waits for the
GIL; when the main thread holds the GIL while it destroys the process group
(``~ProcessGroupGloo`` joins its workers, run when the DDP module is freed), neither moves on:
the hang seen in CI.

The autograd engine sets the graph task's state for each node it runs and restores the
thread's own after it (``thread_main``'s ``ThreadLocalStateGuard``), so what is removed from
the thread's stacks inside a node stays removed only until that node ends. memprof's
``post_accumulate_grad`` hook runs inside ``AccumulateGrad``, before the node's post hooks
(DDP's): :func:`leave_for_collectives` there keeps memprof's objects out of the work DDP
launches, and the next node has them again. Outside a node (a hook called by hand, as FSDP2
calls its sharded parameters' hooks, or under compiled autograd) nothing would restore them,
so nothing is removed there.
"""

from __future__ import annotations

from typing import Any

import torch

_current_node = torch._C._current_autograd_node
_AccumulateGrad = torch._C._functions.AccumulateGrad  # type: ignore[attr-defined]
_top_saved_hooks = torch._C._autograd._top_saved_tensors_default_hooks
_pop_saved_hooks = torch._C._autograd._pop_saved_tensors_default_hooks
_dispatch_depth = torch._C._len_torch_dispatch_stack
_dispatch_mode_at = torch._C._get_dispatch_stack_at
_pop_dispatch_mode = torch._C._pop_torch_dispatch_stack


def process_group_running() -> bool:
    """Whether a default process group exists (collectives can be launched)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def in_accumulate_grad() -> bool:
    """Whether the autograd engine is running an ``AccumulateGrad`` node on this thread (the
    node whose post hooks DDP's reducer uses; the engine restores the thread state after it)."""
    return isinstance(_current_node(), _AccumulateGrad)


def leave_for_collectives(pack_hook: Any, modes: tuple[Any, ...]) -> None:
    """Take memprof's saved-tensor hooks (the pair whose pack hook is ``pack_hook``) and its
    dispatch ``modes`` off the top of this thread's stacks, for the rest of the running
    ``AccumulateGrad`` node (see the module docstring; call it only there). An entry of
    someone else's above them stays, and so do they: its own Python object would be
    captured all the same."""
    top = _top_saved_hooks(False)
    if top is not None and top[0] is pack_hook:
        _pop_saved_hooks()
    while (depth := _dispatch_depth()) and any(_dispatch_mode_at(depth - 1) is m for m in modes):
        _pop_dispatch_mode(None)  # (None: the innermost user mode)

