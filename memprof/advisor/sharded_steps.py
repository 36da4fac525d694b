"""Sharding run in one process: rank 0 of a world of N, over a fake process group.

A sharded change sets :attr:`SimState.shard` and ``ranks``. :func:`one_rank` makes this
process rank 0 of ``ranks`` with PyTorch's ``FakeProcessGroup`` (every collective is a no-op
whose outputs have the right shapes: nothing waits on another rank) and builds the device
mesh; :func:`shard` then shards the state's copy; the step runs as an unsharded one does.
The same code serves the simulation (real tensors, :func:`run_sharded`) and the fake-run
prediction (fake tensors, :mod:`memprof.advisor.fake_prediction`), at any world size.

- ZeRO-1: :class:`torch.distributed.optim.ZeroRedundancyOptimizer` around each optimizer, in
  its own class (:func:`zero_redundancy`).
- ZeRO-2: FSDP2's ``fully_shard(reshard_after_forward=False)`` (SHARD_GRAD_OP: parameters
  stay gathered from forward to backward; gradients and states are sharded).
- ZeRO-3 / FSDP: FSDP2's ``fully_shard`` on each unit of :func:`fsdp_units` and then the root.

Why one process and not N real ones: forked gloo ranks measured another peak on each run (FSDP
on 2 ranks: 10,276,008 to 10,475,688 B), because when a buffer was freed depended on when the
other rank reached the collective. A fake process group waits for nobody. One more cause, in
one process too: FSDP2 frees an unsharded parameter by resizing its storage to 0 (the tensor
stays) and the events backend applies what hooks learned (keyed by address) at the next
marker, by which time the address may hold another allocation: five runs of one FSDP step
measured 15,713,976 to 15,976,120 B. And a storage made before profiling has no free event
(the CPU allocator reports the frees of what it saw allocated while profiling): ZeRO-2's
parameters, left gathered by the no-grad forward before profiling, stayed counted after FSDP2
freed them, until malloc reused their address (gpt2: 16,403,160 to 16,797,400 B).
:func:`_storage_notes` puts a marker before each of FSDP2's resizes, which ends the ledger's
entry at the address being freed (the events backend then measures the same bytes every time:
15,860,920 B for ZeRO-3 and 16,396,504 B for ZeRO-2 on gpt2), and tells the dispatch ledger
(fake runs), which keys storages by object, of the new size. Every stage is simulated with the
events backend (all allocations, CPU kernel scratch too).

The collectives compute nothing, so the sharded step's values are garbage: a sharded row's
quality is not measured (sharding changes where bytes live, not the maths). The peak is rank
0's: FSDP gives rank 0 the largest shards (``torch.chunk``), ZeRO-1 its largest tensor first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from memprof.advisor.core import model_tree

if TYPE_CHECKING:  # workload.run imports this module when a state is sharded
    from memprof.advisor.workload import Measurement, OptimizerMaker, SimState, Workload

#: Sharding stages this module runs, as :attr:`SimState.shard` names them.
STAGES = ("zero1", "zero2", "zero3")


def unavailable_reason() -> str | None:
    """Why sharded steps cannot be run here, or None. Looks for FSDP2 and the fake process
    group without importing them: importing ``torch.distributed.fsdp`` takes most of a second,
    which ``memprof advise FILE`` would pay for rows it never runs."""
    import torch.distributed as dist

    if not dist.is_available():
        return "this torch has no torch.distributed"
    if not (_has_module(("distributed", "fsdp"), "_fully_shard")
            and _has_module(("testing", "_internal", "distributed"), "fake_pg")):
        return "this torch has no FSDP2 or no fake process group"
    return None


def _has_module(package: tuple[str, ...], name: str) -> bool:
    """Whether torch's subpackage ``package`` holds module ``name``, found on disk without
    running the subpackage's ``__init__``."""
    from importlib.machinery import PathFinder
    from pathlib import Path

    where = [str(Path(root, *package)) for root in torch.__path__]
    return PathFinder.find_spec(name, where) is not None


def fsdp_units(
    tree: dict[str, list[str]],
    type_of: Callable[[str], str],
    owns_parameters: Callable[[str], bool],
) -> list[str]:
    """The modules ``fully_shard`` wraps before the root, innermost first: the items of every
    ``ModuleList`` (transformer blocks), else the root's children that hold parameters.
    ``tree`` maps each module name to its children's names ("" is the root)."""
    lists = [name for name in tree if type_of(name) == "ModuleList"]
    units = [k for name in lists for k in tree[name]] if lists else tree.get("", [])
    return sorted((k for k in units if owns_parameters(k)), key=lambda k: -k.count("."))


def shard_model(
    model: nn.Module, mesh: Any = None, *, reshard_after_forward: bool = True
) -> list[str]:
    """FSDP2 on ``model``: each unit, then the root; the units' names. A 0-dim parameter
    (CLIP's ``logit_scale``), which FSDP2 cannot shard, is left whole on every rank, as users
    do with ``ignored_params``."""
    from torch.distributed.fsdp import fully_shard

    modules = dict(model.named_modules())
    whole = scalar_parameters(model)
    units = fsdp_units(
        model_tree(model),
        lambda n: type(modules[n]).__name__,
        lambda n: any(p not in whole for p in modules[n].parameters()),
    )
    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if whole:
        options["ignored_params"] = whole
    for name in units:
        fully_shard(modules[name], **options)
    fully_shard(model, **options)
    return units


def scalar_parameters(model: nn.Module) -> set[nn.Parameter]:
    """``model``'s 0-dim parameters: FSDP2 shards along a dimension, and these have none."""
    return {p for p in model.parameters() if p.dim() == 0}


@contextlib.contextmanager
def one_rank(world_size: int) -> Iterator[Any]:
    """This process as rank 0 of ``world_size`` over a fake process group; yields the mesh.
    The group is destroyed, and FSDP2's functions and ``sys.excepthook`` restored, on exit."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError(
            "a process group is already initialized in this process: sharded steps run on a "
            "fake one of their own (run the advisor outside torch.distributed)"
        )
    excepthook = sys.excepthook  # init_process_group prefixes it with "[rank0]" for good
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        with unset_fake_temporarily():  # the mesh reads its rank map's values
            mesh = init_device_mesh("cpu", (world_size,))
        with _storage_notes(), warnings.catch_warnings():
            # memprof reads the data pointer of every parameter's storage: FSDP2's fake ones warn
            warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
            # a model's forward that returns a view (a language model's logits, say): FSDP2's
            # advice to the user's own code, not about memprof's copy
            warnings.filterwarnings("ignore", r"FSDP2-wrapped module .* returned a view tensor")
            yield mesh
    finally:
        dist.destroy_process_group()
        sys.excepthook = excepthook


@contextlib.contextmanager
def _storage_notes() -> Iterator[None]:
    """Around each storage FSDP2 resizes in place (it frees an unsharded parameter with
    ``resize_(0)``, which no operator reports): a marker first, so the events backend applies
    what hooks learned while the storage is alive (and, before a free, ends the entry at that
    address, whose free event is missing when the storage predates profiling), then the new
    size to the dispatch ledger."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    from memprof.tracking.session import Profiler

    alloc, free = _fsdp_param.alloc_storage, _fsdp_param.free_storage

    def note(tensor: torch.Tensor) -> None:
        profiler = Profiler._active
        if profiler is not None and profiler.backend == "dispatch":
            profiler.ledger.see(tensor)

    def mark(freeing: torch.Tensor | None = None) -> None:
        profiler = Profiler._active
        if profiler is None or profiler._events is None or not profiler._events.running:
            return
        # what hooks learned so far, while the storages are alive; before a free, the end of
        # the entry at its address too (the CPU allocator reports no free of a storage it saw
        # allocated before profiling started)
        ptr = 0 if freeing is None else _address(freeing)
        if ptr:
            profiler._events.point(profiler.ledger.free, ptr)
        else:
            profiler._events.point(_nothing)

    def noted_alloc(tensor: torch.Tensor) -> None:
        mark()
        alloc(tensor)
        note(tensor)

    def noted_free(tensor: torch.Tensor) -> None:
        mark(freeing=tensor)
        free(tensor)
        note(tensor)

    _fsdp_param.alloc_storage = _fsdp_param_group.alloc_storage = noted_alloc
    _fsdp_param.free_storage = noted_free
    try:
        yield
    finally:
        _fsdp_param.alloc_storage = _fsdp_param_group.alloc_storage = alloc
        _fsdp_param.free_storage = free


def _address(tensor: torch.Tensor) -> int:
    """The address of ``tensor``'s storage (0: none, as for a fake or empty one)."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(tensor, FakeTensor) or tensor.is_meta:
        return 0
    return int(tensor.untyped_storage().data_ptr())


def _nothing() -> None:
    """A marker's call that does nothing (the marker carries the facts buffered before it)."""


def shard(state: SimState, mesh: Any) -> None:
    """Shard ``state``'s copy as ``state.shard`` says (inside :func:`one_rank`), then clear
    ``state.shard``: the step runs as an unsharded one."""
    stage = state.shard
    if stage not in STAGES:
        raise ValueError(f"unknown sharding stage {stage!r}: one of {', '.join(STAGES)}")
    state.shard = None
    if stage == "zero1":
        state.wrap_optimizer = zero_redundancy
        return
    names = {id(p): n for n, p in state.model.named_parameters()}
    shard_model(state.model, mesh, reshard_after_forward=stage == "zero3")
    sharded = dict(state.model.named_parameters())  # fully_shard makes new (DTensor) ones
    for group in state.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]


def zero_redundancy(make: OptimizerMaker) -> OptimizerMaker:
    """``make`` as ZeRO-1: a :class:`ZeroRedundancyOptimizer` whose local optimizer, over this
    rank's share of the groups, ``make`` builds (each optimizer of a workload in its own class:
    SparseAdam beside Adam, a GAN's two)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    def local(params: list[dict[str, Any]], **defaults: Any) -> torch.optim.Optimizer:
        return make(params)  # the groups carry their hyperparameters; ZeRO is given none

    def build(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        zero = ZeroRedundancyOptimizer(groups, optimizer_class=local)  # type: ignore[arg-type]
        # its own ``state`` stays empty: point it at the local shard's, which the profiler
        # reads (a state made before profiling, as by a fake run's warm-up, counts then)
        zero.state = zero.optim.state
        return zero

    return build


def run_sharded(workload: Workload, state: SimState) -> Measurement:
    """Measure ``state`` (sharded as ``state.shard`` says) as rank 0 of ``state.ranks``, on
    real tensors; no quality (the fake collectives compute nothing)."""
    from memprof.advisor.workload import run

    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    with one_rank(state.ranks) as mesh:
        shard(state, mesh)
        m = run(workload, state)
    return dataclasses.replace(m, output_drift=None, loss_drift=None, outputs=None)
