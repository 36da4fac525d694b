"""Kernel memory that fake tensors cannot see, measured on this machine and charged by the ledger.

A fake (or meta) kernel returns outputs of the right shapes and allocates nothing else; the real
CPU kernel may allocate more: oneDNN's RNN layer returns a workspace the fake one makes 0 bytes
(and autograd saves it, so it stays live until the backward), a convolution and its backward
take im2col/reorder scratch, batch norm's backward and 16-bit matmuls take oneDNN scratchpads.

:class:`KernelCorrections` keeps, per *key* (aten op, each tensor argument's shape, strides and
dtype, and the other arguments), what the real op does: the most bytes it holds beyond its
outputs while it runs (a transient) and the storage size of each output. A key is measured the
first time it is met, by running the real op once on zero-filled real tensors of those shapes
under memprof's allocation recorder (cached for the process). The dispatch ledger then charges,
under fake tensors, each output at its real size and the transient as a moment inside the op.

Ops whose inputs exceed :data:`MEASURE_LIMIT_BYTES` are not run: their transient is extrapolated
from the largest measured key of the same op met earlier in the same profile (bytes of scratch
per input byte) and reported as modelled. A measurement depends on its key alone, and an
extrapolation on its own profile's ops, so a run's bytes do not depend on which runs came
before it in the process (or in another process: :mod:`memprof.tracking.kernel_cache` keeps
the measurements per machine).

A matmul (mm, addmm, bmm, baddbmm) is measured on as many rows of its first operand
(entries of a bmm's batch) as :data:`MEASURE_FLOPS` allows, at least one, and that stands for
the whole op (reported as extrapolated), unless oneDNN runs it in 16 bits: fp32 goes to MKL's
sgemm, which takes nothing from PyTorch's allocator at any size, and a 16-bit matmul this CPU
has no oneDNN kernel for runs a reference loop (about 0.35 GFLOP/s here: 126 s for GPT-2's 512 x
768 x 50257 head in fp16) that allocates nothing beyond its output either (measured at 16 to 512
rows). oneDNN's 16-bit kernels are measured whole: their scratchpad grows with the rows up to a
block (bf16 addmm with 768 x 2304 weights: 140,928 B at 16 rows, 198,272 B at 128, 263,808 B
at 512).
Only the CPU is measured; CUDA kernel workspaces (cuBLAS, cuDNN) are not, and a profile
modelling CUDA names them as modelled instead (see :func:`modelled_notes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from memprof.errors import KernelNotMeasured

aten = torch.ops.aten

#: The ops whose real CPU kernels were found to allocate beyond their outputs (found by running
#: models op by op against their fake kernels: RNN layers, convolutions and their backward, batch
#: norm's backward, matmuls (16-bit scratchpads), attention and softmax, normalisation backward,
#: the embedding backward's sort, reductions to fp32).
_CORRECTED_NAMES = (
    "mkldnn_rnn_layer.default", "mkldnn_rnn_layer_backward.default",
    "convolution.default", "convolution_backward.default",
    "native_batch_norm.default", "native_batch_norm_backward.default",
    "_native_batch_norm_legit.default", "_native_batch_norm_legit_functional.default",
    "mm.default", "addmm.default", "bmm.default", "baddbmm.default",
    "_scaled_dot_product_flash_attention_for_cpu.default",
    "_scaled_dot_product_flash_attention_for_cpu_backward.default",
    "_safe_softmax.default", "_softmax.default", "_softmax_backward_data.default",
    "native_layer_norm_backward.default", "embedding_dense_backward.default",
    "mean.dim", "sum.dim_IntList",
)


def _ops(names: tuple[str, ...]) -> frozenset[Any]:
    found = set()
    for name in names:
        packet, overload = name.split(".")
        op = getattr(getattr(aten, packet, None), overload, None)
        if op is not None:  # an op this torch lacks is simply not corrected
            found.add(op)
    return frozenset(found)


#: Ops that copy a tensor whole: a copy of a storage the ledger charges at another size than
#: its fake one (an RNN workspace, 0 bytes under fake tensors) is charged at that size too
#: (``save_on_cpu`` copies what autograd saves, the workspace included, with empty + copy_).
_CARRIED_NAMES = ("copy_.default", "clone.default", "_to_copy.default")
CARRIED_OPS = _ops(_CARRIED_NAMES)

#: Ops corrected only when their tensor arguments are of more than one dtype (autocast's
#: 16-bit activations meeting fp32 parameters, buffers or residuals): on the CPU, TensorIterator
#: first copies each input of another dtype than the common one to that dtype (CUDA casts
#: inside the kernel), and layer norm copies a 16-bit input beside its fp32 weight. Measured on
#: ConvNeXt with fp16 autocast: a 32 KiB fp32 copy in a block's backward, 3.5% of its peak.
_MIXED_NAMES = (
    "add.Tensor", "sub.Tensor", "mul.Tensor", "div.Tensor",
    "add_.Tensor", "sub_.Tensor", "mul_.Tensor", "div_.Tensor",
    "native_layer_norm.default",
)
MIXED_OPS = _ops(_MIXED_NAMES)

#: Every op the dispatch ledger hands to :func:`apply`.
CORRECTED_OPS = _ops(_CORRECTED_NAMES) | CARRIED_OPS | MIXED_OPS

#: Keys whose inputs hold more than this are extrapolated, not run.
MEASURE_LIMIT_BYTES = 256 * 2**20
#: A matmul (but oneDNN's 16-bit ones) is measured on rows costing at most this many flops.
MEASURE_FLOPS = 50_000_000
#: Which operand's leading dimension the row cut narrows, per matmul op (for the batched ones,
#: every operand with that leading size).
ROW_OPS = {aten.mm.default: 0, aten.addmm.default: 1, aten.bmm.default: 0,
           aten.baddbmm.default: 1}
_BATCHED = frozenset({aten.bmm.default, aten.baddbmm.default})


@dataclass(frozen=True)
class OpMemory:
    """What the real op allocates: bytes beyond its outputs at its busiest, and each output's
    storage bytes (None for an output that is no new storage: a view or an input)."""

    transient: int
    outputs: tuple[int | None, ...]
    measured: bool = True
    #: The op's input bytes (the extrapolation ratio's denominator).
    input_bytes: int = 0


@dataclass
class KernelCorrections:
    """The measured table, and what was charged with it (for the profile's ``modelled``)."""

    cache: dict[Any, OpMemory] = field(default_factory=dict)
    #: Per op name: (measured keys, extrapolated keys).
    used: dict[str, list[int]] = field(default_factory=dict)
    #: Per op: (scratch bytes per input byte, input bytes) of the largest measured key met so
    #: far by this profile (one per profile: a run's extrapolations depend on its own ops only,
    #: not on which runs came before it in this process).
    ratio: dict[Any, tuple[float, int]] = field(default_factory=dict)

    def memory(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
               real_size: Callable[[torch.Tensor], int | None] = lambda t: None,
               ) -> OpMemory | None:
        """The real op's memory for these (fake) arguments; None when it cannot be had.
        ``real_size`` gives an argument's real storage bytes where they are not its fake ones
        (an RNN workspace, which the backward reads)."""
        key = _key(func, args, kwargs)
        if key is None:
            return None
        found = self.cache.get(key)
        if found is None:
            size = _input_bytes(args, kwargs)
            if size > MEASURE_LIMIT_BYTES:  # this run's ratio: not kept for other runs
                per_byte, _ = self.ratio.get(func, (0.0, 0))
                return OpMemory(round(per_byte * size), (), measured=False, input_bytes=size)
            measured = _measured(key, func, args, kwargs, real_size, size)
            if measured is None:
                return None
            found = self.cache[key] = measured
        best = self.ratio.get(func)
        size = found.input_bytes
        if found.measured and size and (best is None or size >= best[1]):
            self.ratio[func] = (found.transient / size, size)
        return found

    def count(self, func: Any, memory: OpMemory) -> None:
        """Note that ``func``'s call was charged more than its fake kernel's outputs."""
        counts = self.used.setdefault(str(func.overloadpacket.__name__), [0, 0])
        counts[0 if memory.measured else 1] += 1

    def notes(self) -> list[str]:
        """One line per op corrected, for ``profile.device.modelled``."""
        out = []
        for name, (measured, guessed) in sorted(self.used.items()):
            if measured:
                out.append(f"kernel scratch of aten.{name} measured on this CPU "
                           f"({measured} calls)")
            if guessed:
                out.append(f"kernel scratch of aten.{name} extrapolated from smaller measured "
                           f"shapes ({guessed} calls above {MEASURE_LIMIT_BYTES >> 20} MiB, or "
                           f"matmuls run on fewer rows)")
        return out


def modelled_notes(device: str) -> list[str]:
    """What stays modelled about kernels for a fake run modelling ``device``."""
    if device == "cuda":
        return ["CUDA kernel workspaces (cuBLAS, cuDNN, attention) are not measured here: "
                "modelled as the CPU kernels' outputs only"]
    return []


#: One table per process: the same shapes are measured once for every estimate and prediction.
TABLE = KernelCorrections()


_enabled = [True]


def for_profile() -> KernelCorrections | None:
    """A view of :data:`TABLE` that counts its own uses (one per profile); None inside
    :func:`disabled`."""
    return KernelCorrections(cache=TABLE.cache) if _enabled[-1] else None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Fake runs inside charge the fake kernels' outputs only (as the dispatch ledger sees a
    real run: operator outputs, no kernel scratch)."""
    _enabled.append(False)
    try:
        yield
    finally:
        _enabled.pop()


def measured(keys: list[str]) -> bool:
    """Whether every key (a ``repr`` from :func:`measuring_nothing`) is in the table now."""
    known = {repr(key) for key in TABLE.cache}
    return all(key in known for key in keys)


#: Inside :func:`measuring_nothing`: the keys met there that the table lacks (their ``repr``).
_unmeasured: list[list[str] | None] = [None]


@contextlib.contextmanager
def measuring_nothing() -> Iterator[list[str]]:
    """Inside, no kernel is run: a key neither the table nor the machine's file of measurements
    (:mod:`memprof.tracking.kernel_cache`) holds raises
    :class:`~memprof.errors.KernelNotMeasured`, and the key's ``repr`` is added to the list
    yielded (a caller that swallows the error still sees it; :func:`measured` tells when it
    has been measured since). A fake run in a worker process runs so: what it measured would
    stay in the worker, and a one-thread process would measure other scratch."""
    missed: list[str] = []
    _unmeasured.append(missed)
    try:
        yield missed
    finally:
        _unmeasured.pop()


def _key(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    flat, _ = tree_flatten((args, kwargs))
    parts: list[Any] = [func]
    for value in flat:
        if isinstance(value, torch.Tensor):
            if value.device.type != "cpu":
                return None
            parts.append((tuple(value.shape), tuple(value.stride()), value.dtype))
        elif isinstance(value, int | float | bool | str | torch.dtype | torch.device | None):
            parts.append(value)
        elif isinstance(value, torch.memory_format | torch.layout):
            parts.append(str(value))
        else:  # a generator, a symbolic size: not measurable
            return None
    if func is aten.mkldnn_rnn_layer.default:  # it fills its workspace only with grad mode on
        parts.append(("grad mode", torch.is_grad_enabled()))
    return tuple(parts)


def _input_bytes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    flat, _ = tree_flatten((args, kwargs))
    return sum(t.untyped_storage().nbytes() for t in flat if isinstance(t, torch.Tensor))


def _narrowed(func: Any, args: tuple[Any, ...], rows: int) -> tuple[Any, ...] | None:
    """``args`` with the matmul's rows (a bmm's batch) cut to ``rows``: views of the same fake
    storages (the measurement makes real tensors of those layouts). None where an operand
    broadcasts in a way a cut would break."""
    index = ROW_OPS[func]
    full = args[index].shape[0]
    out = list(args)
    if func in _BATCHED:
        for i, a in enumerate(args[:3]):
            if isinstance(a, torch.Tensor) and a.dim() == 3 and a.shape[0] == full:
                out[i] = a.narrow(0, 0, rows)
            elif isinstance(a, torch.Tensor) and a.dim() == 3 and a.shape[0] != 1:
                return None
        return tuple(out)
    out[index] = args[index].narrow(0, 0, rows)
    if func is aten.addmm.default and isinstance(args[0], torch.Tensor) and args[0].dim() == 2:
        if args[0].shape[0] == full:
            out[0] = args[0].narrow(0, 0, rows)
        elif args[0].shape[0] != 1:
            return None
    return tuple(out)


def _onednn_16_bit(dtype: torch.dtype) -> bool:
    """Whether this CPU's PyTorch runs ``dtype`` matmuls through oneDNN's 16-bit kernels."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    name = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    probe = getattr(torch.ops.mkldnn, name, None)
    return bool(probe()) if probe is not None else False


def _flops_per_row(func: Any, args: tuple[Any, ...]) -> int:
    """Floating-point ops per row of the cut operand (per batch entry of a bmm)."""
    index = ROW_OPS[func]
    a, b = args[index], args[index + 1]
    if func in _BATCHED:
        return 2 * int(a.shape[1]) * int(a.shape[2]) * int(b.shape[2])
    return 2 * int(a.shape[1]) * int(b.shape[1])


def _measured(key: Any, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
              real_size: Callable[[torch.Tensor], int | None], size: int) -> OpMemory | None:
    """:func:`_measure_rows` (``size``: the input bytes), or its result stored on disk by an
    earlier process on this machine (:mod:`memprof.tracking.kernel_cache`). Inside
    :func:`measuring_nothing` only the disk is read, and a key it lacks raises
    :class:`~memprof.errors.KernelNotMeasured`."""
    from memprof.tracking import kernel_cache

    disk_key = None
    if kernel_cache.enabled():
        # the table's key, and for an RNN backward the real size of the workspace it reads
        disk_key = repr(key)
        if func is aten.mkldnn_rnn_layer_backward.default:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            disk_key = repr((key, tuple(real_size(t) for t in tensors)))
        record = kernel_cache.lookup(disk_key)
        if record is not None:
            transient, outputs, measured = record
            return OpMemory(int(transient), tuple(outputs), bool(measured), size)
    if _unmeasured[-1] is not None:
        _unmeasured[-1].append(repr(key))
        raise KernelNotMeasured(f"{func} is not measured yet for these shapes")
    memory = _measure_rows(func, args, kwargs, real_size)
    if memory is None:  # one that could not run (out of memory?) is tried again next time
        return None
    memory = dataclasses.replace(memory, input_bytes=size)
    if disk_key is not None:
        kernel_cache.store(disk_key, [memory.transient, list(memory.outputs), memory.measured])
    return memory


def _measure_rows(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                  real_size: Callable[[torch.Tensor], int | None]) -> OpMemory | None:
    """:func:`_measure`, on fewer rows for a matmul but oneDNN's 16-bit ones (see the module
    docstring)."""
    index = ROW_OPS.get(func)
    operands = args[index:index + 2] if index is not None else ()
    if (index is None or len(operands) != 2
            or not all(isinstance(t, torch.Tensor) for t in operands)
            or operands[0].dim() != operands[1].dim() or operands[0].dim() not in (2, 3)
            or _onednn_16_bit(operands[0].dtype)):
        return _measure(func, args, kwargs, real_size)
    full = int(operands[0].shape[0])
    rows = max(1, MEASURE_FLOPS // max(1, _flops_per_row(func, args)))
    if rows >= full:
        return _measure(func, args, kwargs, real_size)
    cut = _narrowed(func, args, rows)
    if cut is None:
        return _measure(func, args, kwargs, real_size)
    measured = _measure(func, cut, kwargs, real_size)
    return None if measured is None else OpMemory(measured.transient, (), measured=False)


def _measure(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             real_size: Callable[[torch.Tensor], int | None]) -> OpMemory | None:
    """Run ``func`` once on real zero-filled tensors of the arguments' layouts and record it."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from memprof.tracking.events import default_source

    def real(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        size = real_size(value)
        if size is not None:  # a storage the fake kernel made another size: the real one
            return torch.zeros(size // value.element_size(), dtype=value.dtype)
        return torch.zeros(value.untyped_storage().nbytes() // value.element_size() or 1,
                           dtype=value.dtype).as_strided(
            value.shape, value.stride(), value.storage_offset())

    if func is aten.mkldnn_rnn_layer_backward.default and _unknown_workspace(args, real_size):
        return None  # oneDNN would read a workspace it never wrote, past its end
    try:
        # grad mode stays as the run has it: the RNN kernel fills its workspace only with it on
        with unset_fake_temporarily(), _no_autocast():
            real_args, real_kwargs = tree_map(real, (args, kwargs))
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten(
                (real_args, real_kwargs))[0] if isinstance(t, torch.Tensor)}
            source = default_source()
            source.start()
            try:
                out = func(*real_args, **real_kwargs)
            finally:
                events = source.stop()
            outs = [o for o in (out if isinstance(out, tuple | list) else [out])]
            sizes: list[int | None] = []
            total = 0
            for o in outs:
                if not isinstance(o, torch.Tensor):
                    sizes.append(None)
                    continue
                storage = o.untyped_storage()
                if storage.data_ptr() in inputs:
                    sizes.append(None)
                    continue
                sizes.append(storage.nbytes())
                total += storage.nbytes()
            del out, outs, real_args, real_kwargs
    except Exception:  # an op that cannot run on zeros here: leave it uncorrected
        return None
    return OpMemory(max(0, allocation_peak(events) - total), tuple(sizes))


def _unknown_workspace(args: tuple[Any, ...],
                       real_size: Callable[[torch.Tensor], int | None]) -> bool:
    """Whether an RNN backward's workspace (its last tensor argument) has no known real size:
    its fake storage is empty and the ledger knows no real one."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors:
        return True
    workspace = tensors[-1]
    return workspace.untyped_storage().nbytes() == 0 and real_size(workspace) is None


@contextlib.contextmanager
def _no_autocast() -> Iterator[None]:
    with torch.autocast("cpu", enabled=False):
        yield


def allocation_peak(events: list[tuple[Any, int, int]]) -> int:
    """The most bytes live at once in a recorder's ``(time, ptr, ±bytes)`` events."""
    live: dict[int, int] = {}
    now = peak = 0
    for _when, ptr, size in events:
        if ptr < 0:  # a marker
            continue
        if size > 0:
            live[ptr] = size
            now += size
            peak = max(peak, now)
        else:
            now -= live.pop(ptr, 0)
    return peak


def apply(ledger: Any, table: KernelCorrections, func: Any, args: tuple[Any, ...],
          kwargs: dict[str, Any], out: Any) -> None:
    """Charge ``out`` (already seen by the ledger) at the real sizes, then the op's transient."""
    if func in CARRIED_OPS:
        _carry(ledger, func, args, out)
        return
    if not corrects(func, args):
        return

    def real_size(tensor: torch.Tensor) -> int | None:
        entry = ledger.lookup(tensor)
        if entry is None or entry.nbytes == entry.raw_nbytes or tensor.dim() != 1:
            return None
        return int(entry.nbytes)

    memory = table.memory(func, args, kwargs, real_size)
    if memory is None:
        return
    outs = out if isinstance(out, tuple | list) else [out]
    changed = memory.transient > 0
    for o, real in itertools.zip_longest(outs, memory.outputs):
        if real is None or not isinstance(o, torch.Tensor):
            continue
        entry = ledger.lookup(o)
        if entry is not None and entry.nbytes != real:
            ledger.recharge(entry, real)
            changed = True
    if memory.transient > 0:
        ledger.spike(memory.transient)
    if changed:
        table.count(func, memory)


def corrects(func: Any, args: tuple[Any, ...]) -> bool:
    """Whether :func:`apply` may charge this call otherwise than its fake outputs (an op of
    :data:`MIXED_OPS` only when its tensors are of several dtypes)."""
    if func not in CORRECTED_OPS:
        return False
    return func not in MIXED_OPS or _mixed_dtypes(args)


def _mixed_dtypes(args: tuple[Any, ...]) -> bool:
    """Whether the tensors among ``args`` (0-dim ones aside: TensorIterator reads a CPU scalar
    as it is) are of more than one dtype."""
    dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.dim() > 0}
    return len(dtypes) > 1


def _carry(ledger: Any, func: Any, args: tuple[Any, ...], out: Any) -> None:
    """A whole copy of a storage charged at its real size (see :data:`CARRIED_OPS`) is charged
    at that size too, scaled by the two dtypes' element sizes."""
    source = args[1] if func is aten.copy_.default else args[0]
    if not (isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor)):
        return
    if out.shape != source.shape or source.element_size() == 0:
        return
    source_entry = ledger.lookup(source)
    if source_entry is None or source_entry.nbytes == source_entry.raw_nbytes:
        return
    entry = ledger.lookup(out)
    if entry is None or entry is source_entry:
        return
    if entry.raw_nbytes != out.numel() * out.element_size():  # a part of a larger storage
        return
    real = source_entry.nbytes * out.element_size() // source.element_size()
    if entry.nbytes != real:
        ledger.recharge(entry, real)
