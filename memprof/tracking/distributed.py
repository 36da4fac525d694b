"""Multi-rank runs: which rank this process is, its own output files, and the memory that
belongs to the distributed engine (DDP's gradient buckets, FSDP2's gathered parameters).

Launchers such as ``torchrun`` set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; memprof reads
them (never a collective call: a rank that ends early must not wait on the others) and, with
more than one rank, writes ``NAME.rank{R}.json`` instead of ``NAME.json``.

The engine's memory is described from the engine's own bookkeeping, read once when the
profile is built: DDP's ``_get_ddp_logging_data()`` (its bucket sizes, in bytes, and whether
the gradients are views of the buckets) and, for each FSDP2 unit (a module ``fully_shard``
wrapped), its ``FSDPParam``'s sharded, padded and unsharded sizes. Nothing is allocated.
The same report gives the ledger the DDP buckets made before the profile, which no allocation
event shows (:class:`BucketsBefore`).
"""

from __future__ import annotations

import os
import re
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from memprof.units import round_up

if TYPE_CHECKING:
    from memprof.tracking.modules import ModuleRegistry

#: The rank tag memprof puts before a file's suffix: ``train.rank0.json``.
RANK_TAG = re.compile(r"\.rank(\d+)$")


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a multi-process run, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def multi(self) -> bool:
        """Whether other ranks run too (then each writes its own files)."""
        return self.world_size > 1


def rank_from_env(environ: dict[str, str] | None = None) -> RankInfo | None:
    """The rank from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; None when no launcher set them
    (or they are not integers)."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        return None
    if world < 1 or not 0 <= rank < world:
        return None
    return RankInfo(rank=rank, world_size=world, local_rank=local)


def rank_path(path: str | os.PathLike[str], rank: RankInfo | None) -> Path:
    """``reports/x.json`` as rank 1 of several: ``reports/x.rank1.json``. Unchanged for a
    single process, or when the name already carries this rank's tag."""
    target = Path(path)
    if rank is None or not rank.multi:
        return target
    stem = target.stem
    found = RANK_TAG.search(stem)
    if found is not None and int(found.group(1)) == rank.rank:
        return target
    return target.with_name(f"{stem}.rank{rank.rank}{target.suffix}")


def rank_of_name(path: str | os.PathLike[str]) -> int | None:
    """The rank a file's name carries (``x.rank3.json`` -> 3), or None."""
    found = RANK_TAG.search(Path(path).stem)
    return None if found is None else int(found.group(1))


# ------------------------------------------------------------------ engine memory
@dataclass(frozen=True)
class EngineMemory:
    """One piece of memory the distributed engine owns, named.

    ``kind``: ``ddp_buckets`` (DDP's flat gradient buckets; when the gradients are views of
    them, the ``gradient`` category already holds these bytes, ``extra`` is False),
    ``fsdp_sharded`` (a unit's parameters as this rank keeps them), ``fsdp_unsharded`` (the
    same parameters gathered, alive while the unit runs), ``fsdp_all_gather`` (the all-gather
    output buffer of the unit: world size x the padded shards) and ``fsdp_reduce_scatter`` (the
    reduce-scatter input of its gradients).
    """

    kind: str
    module: str
    nbytes: int
    extra: bool
    detail: str


class EngineWatch:
    """Finds the DDP and FSDP2 modules among those the profiler registered and keeps their
    engine memory, read again at each :meth:`update` (DDP rebuilds its buckets after the first
    step). The modules are held weakly: a script's model is gone when its profile is built."""

    def __init__(self) -> None:
        self._scanned = 0
        self._engines: list[tuple[weakref.ref[nn.Module], str]] = []
        self._facts: dict[str, list[EngineMemory]] = {}
        self.backend: str | None = None

    def update(self, registry: ModuleRegistry) -> None:
        """Look at the modules registered since the last call (a scan only when there are new
        ones), and re-read the engines' sizes."""
        index = registry.index
        if len(index) != self._scanned:
            self._scanned = len(index)
            known = {name for _, name in self._engines}
            for module, idx in list(index.items()):
                name = registry.infos[idx].name
                if name not in known and _is_engine(module):
                    self._engines.append((weakref.ref(module), name))
        for ref, name in self._engines:
            engine = ref()
            if engine is not None:
                self._facts[name] = engine_memory(engine, name)
        self.backend = _process_group_backend() or self.backend

    def memory(self) -> list[EngineMemory]:
        """The engine memory last read, all modules."""
        return [e for rows in self._facts.values() for e in rows]

    def warnings(self) -> list[str]:
        """What the profile cannot show right about these engines."""
        viewed = [e.module or "(root)" for e in self.memory()
                  if e.kind == "ddp_buckets" and not e.extra]
        if not viewed:
            return []
        return [
            f"DDP with gradient_as_bucket_view=True ({', '.join(viewed)}): every gradient is a "
            "view of one bucket storage, which memprof counts once and charges to a single "
            "module, so the gradient column per module (and the gradient total, when the "
            "buckets predate the profile) is not reliable; profile with the default "
            "gradient_as_bucket_view=False for per-layer gradients"
        ]


def _is_engine(module: nn.Module) -> bool:
    return isinstance(module, nn.parallel.DistributedDataParallel) or hasattr(
        module, "_get_fsdp_state")


def engine_memory(module: nn.Module, name: str) -> list[EngineMemory]:
    """The engine memory of one DDP or FSDP2 module ([] for any other)."""
    try:
        return _ddp_memory(module, name) + _fsdp_memory(module, name)
    except Exception:  # private engine internals: a change there must not lose the profile
        return []


def describe(watch: EngineWatch, rank: RankInfo | None, peak: Any = None) -> dict[str, Any]:
    """The profile's ``meta["distributed"]``: the rank, the process group's backend, the
    engine memory the watch found and (``at_peak``) which storages alive at ``peak`` are
    engine buffers; empty when there is neither a rank nor an engine."""
    info: dict[str, Any] = {}
    if rank is not None:
        info.update(rank=rank.rank, world_size=rank.world_size, local_rank=rank.local_rank)
    backend = _process_group_backend() or watch.backend
    if backend is not None and info:
        info["backend"] = backend
    engine = watch.memory()
    if engine:
        info["engine"] = [asdict(e) for e in sorted(engine, key=lambda e: (e.kind, e.module))]
        at_peak = engine_at_peak(peak, engine)
        if at_peak:
            info["at_peak"] = at_peak
        info["engine_bytes"] = {
            kind: sum(e.nbytes for e in engine if e.kind == kind)
            for kind in sorted({e.kind for e in engine})
        }
    return info


#: Which engine buffers can be alive in each phase (an all-gather runs again in backward).
_PHASE_KINDS = {
    "forward": ("fsdp_all_gather", "fsdp_unsharded"),
    "backward": ("fsdp_all_gather", "fsdp_unsharded", "fsdp_reduce_scatter"),
}


def engine_at_peak(peak: Any, engine: list[EngineMemory]) -> list[dict[str, Any]]:
    """The storages alive at ``peak`` (a :class:`~memprof.profile.Peak`) that are engine
    buffers, matched by size: a flat temporary or other storage exactly the size of one of
    ``engine``'s extra buffers, of a kind that can be alive in that tensor's phase (DDP's
    buckets in any). Sizes can coincide (a unit's all-gather output, its unsharded parameters
    and its reduce-scatter input are equal in fp32), so each match lists every candidate."""
    if peak is None:
        return []
    extra = [e for e in engine if e.extra]
    found: list[dict[str, Any]] = []
    for t in peak.top_tensors:
        if t.category not in ("temporary", "other") or len(t.shape) != 1:
            continue
        allowed = _PHASE_KINDS.get(t.phase, ())
        names = sorted({f"{e.kind} of {e.module or '(root)'}" for e in extra
                        if e.nbytes == t.nbytes
                        and (e.kind == "ddp_buckets" or e.kind in allowed)})
        if names:
            found.append({"nbytes": t.nbytes, "category": t.category, "phase": t.phase,
                          "module": t.module, "candidates": names})
    return found


def _process_group_backend() -> str | None:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return str(dist.get_backend())
    except (RuntimeError, ValueError):
        return None


def _ddp_buckets(module: nn.parallel.DistributedDataParallel) -> tuple[list[int], bool]:
    """The bytes of each of DDP's gradient buckets (as its reducer last reported them) and
    whether the gradients are views of them."""
    data = module._get_ddp_logging_data()
    sizes = [int(s) for s in str(data.get("bucket_sizes", "")).split(",") if s.strip()]
    return sizes, bool(data.get("gradient_as_bucket_view", 0))


def _ddp_memory(module: nn.Module, name: str) -> list[EngineMemory]:
    if not isinstance(module, nn.parallel.DistributedDataParallel):
        return []
    sizes, as_view = _ddp_buckets(module)
    if not sizes:
        return []
    how = ("the gradients are views of these buckets (gradient_as_bucket_view=True): counted "
           "as gradient" if as_view else
           "a flat copy of the gradients for all-reduce, on top of the .grad tensors")
    return [EngineMemory(
        kind="ddp_buckets", module=name, nbytes=sum(sizes), extra=not as_view,
        detail=f"{len(sizes)} bucket(s) of {', '.join(str(s) for s in sizes)} bytes; {how}",
    )]


def _fsdp_memory(module: nn.Module, name: str) -> list[EngineMemory]:
    get_state = getattr(module, "_get_fsdp_state", None)
    if get_state is None:
        return []
    group = getattr(get_state(), "_fsdp_param_group", None)
    if group is None:
        return []
    params = list(group.fsdp_params)
    if not params:
        return []
    world = int(group.mesh_info.shard_mesh_size)
    sharded = unsharded = gathered = reduce_in = 0
    for p in params:
        local = p.sharded_param._local_tensor if hasattr(p.sharded_param, "_local_tensor") \
            else p.sharded_param
        sharded += local.numel() * local.element_size()
        dtype = p.param_dtype or p.orig_dtype
        item = dtype.itemsize  # no tensor is made: this runs inside profiled steps
        unsharded += _numel(p._orig_size) * item
        gathered += world * _numel(p.padded_sharded_param_size) * item
        if p.sharded_param.requires_grad:
            rdtype = p.reduce_dtype or dtype
            reduce_in += world * _numel(p.padded_sharded_param_size) * \
                rdtype.itemsize
    unit = name or "(root)"
    rows = [
        EngineMemory("fsdp_sharded", name, sharded, False,
                     f"{len(params)} parameter(s) of {unit}: this rank's shard "
                     f"(1/{world}), counted as parameter"),
        EngineMemory("fsdp_unsharded", name, unsharded, True,
                     f"{unit}'s parameters gathered whole while it runs forward or backward"),
        EngineMemory("fsdp_all_gather", name, gathered, True,
                     f"all-gather output of {unit}: {world} rank(s) x the padded shards"),
    ]
    if reduce_in:
        rows.append(EngineMemory("fsdp_reduce_scatter", name, reduce_in, True,
                                 f"reduce-scatter input of {unit}'s gradients "
                                 f"({world} x the padded shards)"))
    return rows


class BucketsBefore:
    """DDP's gradient buckets made before the profile, which no allocation event shows.

    DDP's constructor makes its first buckets (flat copies of the gradients for all-reduce,
    with ``gradient_as_bucket_view=False``); its reducer frees them in the first forward after
    the first backward, when it rebuilds them in the order the gradients came
    (``reducer._rebuild_buckets()`` in ``_pre_forward``). Made before the profile, they were
    never seen allocated: live memory missing from the totals, and the CPU allocator reports
    no free of a block it did not see allocated, while it reports the new buckets' allocation:
    a step with the rebuild read one bucket set high above its start (+14.3% on the DDP
    pattern, #25). Each such bucket gets a ledger entry of its own (its size from the reducer's
    own report, no address: see :meth:`found`), ended when the reducer has rebuilt them (DDP's
    ``_has_rebuilt_buckets``, read at the next module's forward, the first hook after
    ``_pre_forward``) or when the module dies.

    A DDP module built inside the profile (a script ``memprof run`` runs) is left out: its
    buckets' allocation was seen (:meth:`note_built`, a global module registration hook, sees
    DDP set its ``module`` attribute in its constructor). Gradients that are views of the
    buckets are counted as gradients already (the ``gradient`` category holds the buckets).
    """

    def __init__(self) -> None:
        self._built_inside: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._seen: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        #: (the module, its buckets' keys, whether it will rebuild them), until the buckets
        #: are rebuilt or the module dies
        self._entered: list[tuple[weakref.ref[nn.Module], list[int], bool]] = []
        #: Whether an entered module will still rebuild its buckets (then read :meth:`gone`
        #: at each module's forward, until it has)
        self.rebuild_ahead = False

    def note_built(self, module: nn.Module, name: str, submodule: Any) -> None:
        """A global module registration hook: remember the DDP modules built from now on."""
        if isinstance(module, nn.parallel.DistributedDataParallel):
            self._built_inside.add(module)

    def found(self, module: nn.Module) -> list[int]:
        """The sizes of the buckets of ``module``, just registered, that the profile must enter
        ([] for a module that is no DDP, was found before or built inside the profile, or
        whose gradients are views of its buckets). Call :meth:`entered` with their keys."""
        if (not isinstance(module, nn.parallel.DistributedDataParallel)
                or module in self._seen or module in self._built_inside):
            return []
        self._seen.add(module)
        try:
            sizes, as_view = _ddp_buckets(module)
            cuda = any(p.is_cuda for p in module.parameters())
        except Exception:  # private engine internals: a change there must not lose the profile
            return []
        if as_view:
            return []
        return [round_up(size, 512) for size in sizes] if cuda else sizes  # CUDA's blocks

    def entered(self, module: nn.Module, keys: list[int]) -> None:
        """Watch ``module``, whose buckets were entered under ``keys``."""
        # The reducer rebuilds once, where it will: not where it finds unused parameters
        # each step (unless the graph is static), nor where it did before the profile.
        rebuilds = (not getattr(module, "_has_rebuilt_buckets", True)
                    and (bool(getattr(module, "static_graph", False))
                         or not getattr(module, "find_unused_parameters", False)))
        self._entered.append((weakref.ref(module), keys, rebuilds))
        self.rebuild_ahead = self.rebuild_ahead or rebuilds

    def gone(self) -> list[int]:
        """The keys of the entered buckets freed since the last call: their module rebuilt its
        buckets or died."""
        ended: list[int] = []
        keep = []
        for ref, keys, rebuilds in self._entered:
            module = ref()
            if module is None or (rebuilds and getattr(module, "_has_rebuilt_buckets", False)):
                ended += keys
            else:
                keep.append((ref, keys, rebuilds))
        self._entered = keep
        self.rebuild_ahead = any(rebuilds for _, _, rebuilds in keep)
        return ended


def sharded_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The sharded parameters of the FSDP2 unit ``module`` is ([] for any other module): the
    storage this rank keeps for them, alive even while the module's attributes hold the
    gathered (unsharded) parameters, as after a forward that no backward followed."""
    get_state = getattr(module, "_get_fsdp_state", None)
    if get_state is None:
        return []
    try:
        group = getattr(get_state(), "_fsdp_param_group", None)
        return [] if group is None else [p.sharded_param for p in group.fsdp_params]
    except Exception:  # private engine internals: a change there must not lose the profile
        return []


def _numel(size: Any) -> int:
    count = 1
    for d in size:
        count *= int(d)
    return count


__all__ = [
    "BucketsBefore",
    "EngineMemory",
    "EngineWatch",
    "RankInfo",
    "describe",
    "engine_at_peak",
    "engine_memory",
    "rank_from_env",
    "rank_of_name",
    "rank_path",
    "sharded_parameters",
]
