"""A catalog of common GPUs and the memory a training step can really use on each.

``lookup("a100 40gb")`` finds a :class:`GpuSpec` (case, spaces, dashes and a leading
``NVIDIA``/``GeForce``/``Tesla`` do not matter; aliases such as ``"3090"`` or ``"h100"`` work);
an unknown name raises :class:`~memprof.errors.UnknownGPUError` naming the closest entries.

Memory figures
--------------
``memory_bytes`` is the memory as sold, in the binary units the label means (an "80GB" A100
has 80 GiB of HBM). ``driver_bytes`` is what ``nvidia-smi`` typically reports as total with ECC
at its default (the driver keeps some for itself), and is what the allocator can ask for.

What a step can use (:func:`usable_bytes`) keeps a reserve for two things tensors never see:

* the CUDA context (driver state, cuBLAS/cuDNN handles and kernels): :data:`CUDA_CONTEXT_BYTES`
  = 768 MiB. PyTorch 2.x with lazy module loading measures 300-800 MiB on A100/H100; without
  lazy loading it reaches 1-2 GiB, so a step that needs the last few hundred MiB should be
  checked on the device.
* allocator fragmentation: the caching allocator rounds blocks and cannot always reuse freed
  segments, so ``max_memory_reserved`` runs above ``max_memory_allocated``:
  :data:`FRAGMENTATION_FRACTION` = 5% of what is left (typical 2-10% on transformer training;
  ``expandable_segments:True`` brings it to the low end).

``usable = (driver_bytes - CUDA_CONTEXT_BYTES) * (1 - FRAGMENTATION_FRACTION)``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from memprof.allocator import AllocatorSummary
from memprof.errors import BudgetError, UnknownGPUError
from memprof.units import format_bytes, parse_size

GiB = 1024**3
MiB = 1024**2

#: Memory the CUDA context takes before any tensor (see the module docstring).
CUDA_CONTEXT_BYTES = 768 * MiB
#: Share of the remaining memory lost to the caching allocator's fragmentation.
FRAGMENTATION_FRACTION = 0.05


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model: its memory as sold and as the driver reports it, and its number formats."""

    name: str
    memory_bytes: int
    driver_bytes: int
    bf16: bool
    fp8: bool
    architecture: str
    aliases: tuple[str, ...] = ()

    @property
    def usable_bytes(self) -> int:
        """What tensors of a training step can use, after the reserve (module docstring)."""
        return usable_bytes(self.driver_bytes)

    def describe(self) -> str:
        return (
            f"{self.name} ({format_bytes(self.memory_bytes)}; "
            f"{format_bytes(self.usable_bytes)} usable by tensors)"
        )


GPUS: tuple[GpuSpec, ...] = (
    GpuSpec("T4", 16 * GiB, 15360 * MiB, False, False, "Turing", ("tesla t4",)),
    GpuSpec("L4", 24 * GiB, 23034 * MiB, True, True, "Ada", ()),
    GpuSpec("A10", 24 * GiB, 23028 * MiB, True, False, "Ampere", ("a10g",)),
    GpuSpec("RTX 3090", 24 * GiB, 24576 * MiB, True, False, "Ampere", ("3090", "geforce rtx 3090")),
    GpuSpec("RTX 4090", 24 * GiB, 24564 * MiB, True, True, "Ada", ("4090", "geforce rtx 4090")),
    GpuSpec("V100 16GB", 16 * GiB, 16160 * MiB, False, False, "Volta", ("v100",)),
    GpuSpec("V100 32GB", 32 * GiB, 32510 * MiB, False, False, "Volta", ()),
    GpuSpec("A100 40GB", 40 * GiB, 40960 * MiB, True, False, "Ampere", ("a100", "a100 sxm4 40gb")),
    GpuSpec("A100 80GB", 80 * GiB, 81920 * MiB, True, False, "Ampere", ("a100 sxm4 80gb",)),
    GpuSpec("L40S", 48 * GiB, 46068 * MiB, True, True, "Ada", ()),
    GpuSpec(
        "H100 80GB",
        80 * GiB,
        81559 * MiB,
        True,
        True,
        "Hopper",
        ("h100", "h100 sxm", "h100 pcie", "h100 80gb hbm3"),
    ),
    GpuSpec("H200", 141 * GiB, 143771 * MiB, True, True, "Hopper", ("h200 141gb",)),
)


def usable_bytes(driver_bytes: int, *, cached_bytes: int | None = None) -> int:
    """Bytes a step's tensors can use on a device whose driver reports ``driver_bytes``.

    ``cached_bytes``: what the caching allocator reserves beyond the live tensors at its peak,
    as the profile's allocator replay predicts it (:func:`replay_cached_bytes`); without one,
    the fixed :data:`FRAGMENTATION_FRACTION` of what the context leaves.
    """
    left = driver_bytes - CUDA_CONTEXT_BYTES
    if cached_bytes is not None:
        return max(0, left - cached_bytes)
    return max(0, int(left * (1 - FRAGMENTATION_FRACTION)))


@dataclass(frozen=True)
class Budget:
    """What a step's tensors may use, and why: the one figure the fit verdict, the planner and
    every line of text print.

    ``total_bytes`` is the budget as given (a size, or the GPU's driver-reported memory);
    ``usable_bytes`` what is left after ``reserve`` (the CUDA context and the caching
    allocator's share); ``label`` names the budget without any usable figure, so no text can
    print a second one.
    """

    total_bytes: int
    usable_bytes: int
    label: str
    reserve: str

    def describe(self) -> str:
        return f"{self.label}: {format_bytes(self.usable_bytes)} usable after {self.reserve}"

    def __repr__(self) -> str:
        return f"Budget({format_bytes(self.usable_bytes)} usable of {self.label})"


def budget_of(spec: int | str, *, cached_bytes: int | None = None) -> Budget:
    """The one budget function: usable bytes of a text budget (a size such as ``"24GiB"`` or a
    GPU name) or of a number of bytes.

    A text budget loses the CUDA context and the caching allocator's reserve: ``cached_bytes``
    (reserved minus allocated in the profile's allocator replay, :func:`replay_cached_bytes`)
    when there is one, else :data:`FRAGMENTATION_FRACTION` of what the context leaves. A number
    is taken as bytes already free of the context and loses the fixed share only (a tiny test
    budget would otherwise be eaten by the replay's 2-20 MiB segment granularity). Raises
    :class:`BudgetError` / :class:`UnknownGPUError` for text that is neither.
    """
    if cached_bytes is None:
        share = f"a {100 * FRAGMENTATION_FRACTION:.0f}% fragmentation reserve"
    else:
        share = (f"{format_bytes(cached_bytes)} the caching allocator keeps beyond the tensors "
                 "(its replay of this run)")
    if isinstance(spec, str):
        total, label = resolve_budget(spec)
        return Budget(int(total), usable_bytes(total, cached_bytes=cached_bytes), label,
                      f"the CUDA context ({format_bytes(CUDA_CONTEXT_BYTES)}) and {share}")
    total = int(spec)
    if total <= 0:
        raise BudgetError(f"a budget must be positive (got {spec} bytes)")
    usable = int(total * (1 - FRAGMENTATION_FRACTION))
    return Budget(total, usable, f"{total} bytes",
                  f"a {100 * FRAGMENTATION_FRACTION:.0f}% fragmentation reserve")


def replay_cached_bytes(allocator: AllocatorSummary | None) -> int | None:
    """Reserved minus allocated at the peaks of a profile's allocator replay
    (``Profile.allocator_summary()``), or None when the profile has none."""
    if allocator is None:
        return None
    replay = allocator.replay
    if replay.reserved_peak_bytes <= 0:
        return None
    return max(0, replay.reserved_peak_bytes - replay.allocated_peak_bytes)


def _key(name: str) -> str:
    text = name.lower().strip()
    text = re.sub(r"^(nvidia|geforce|tesla)\s+", "", text)
    text = re.sub(r"^(geforce|tesla)\s+", "", text)
    return re.sub(r"[\s_\-]+", "", text)


def _index() -> dict[str, GpuSpec]:
    index: dict[str, GpuSpec] = {}
    for spec in GPUS:
        for name in (spec.name, *spec.aliases):
            index[_key(name)] = spec
    return index


_INDEX = _index()


def lookup(name: str) -> GpuSpec:
    """The catalog entry for ``name``; :class:`UnknownGPUError` suggests close names."""
    spec = _INDEX.get(_key(name))
    if spec is not None:
        return spec
    close = difflib.get_close_matches(_key(name), list(_INDEX), n=3, cutoff=0.5)
    names = list(dict.fromkeys(_INDEX[k].name for k in close))
    hint = f"did you mean {', '.join(repr(n) for n in names)}? " if names else ""
    raise UnknownGPUError(
        f"unknown GPU {name!r}: {hint}known GPUs: {', '.join(s.name for s in GPUS)}"
    )


def resolve_budget(text: str) -> tuple[int, str]:
    """``(total_bytes, description)`` for a size (``"24GiB"``, ``"80GB"``) or a GPU name.

    For a GPU the total is what its driver reports (``driver_bytes``), before the reserve for
    the CUDA context and fragmentation (:func:`usable_bytes` takes that off). Raises
    :class:`BudgetError` for text that is neither, such as ``"24 gigs"``, and
    :class:`UnknownGPUError` for a name that looks like a GPU but is not in the catalog.
    """
    stripped = text.strip()
    if re.match(r"^\d+(\.\d+)?\s*[a-zA-Z]*$", stripped):
        try:
            total = parse_size(stripped)
        except BudgetError:
            if _key(stripped) in _INDEX:  # "3090", "4090"
                spec = _INDEX[_key(stripped)]
                return spec.driver_bytes, _label(spec)
            raise BudgetError(
                f"cannot read {text!r} as a budget: write a size such as 24GiB, 80GB or "
                f"512MiB, or a GPU name such as 'A100 40GB' (see memprof.gpus.GPUS)"
            ) from None
        if _key(stripped) in _INDEX and not re.search(r"[a-zA-Z]", stripped):
            spec = _INDEX[_key(stripped)]
            return spec.driver_bytes, _label(spec)
        return total, format_bytes(total)
    if not re.search(r"\d", stripped) or re.search(r"[a-zA-Z]", stripped[:1]):
        return _gpu(stripped)
    try:
        return _gpu(stripped)
    except UnknownGPUError:
        raise BudgetError(
            f"cannot read {text!r} as a budget: write a size such as 24GiB, 80GB or 512MiB, "
            f"or a GPU name such as 'A100 40GB'"
        ) from None


def _gpu(name: str) -> tuple[int, str]:
    spec = lookup(name)
    return spec.driver_bytes, _label(spec)


def _label(spec: GpuSpec) -> str:
    # no usable figure here: that depends on the run (its allocator replay), see Budget
    return f"{spec.name} ({format_bytes(spec.memory_bytes)})"


__all__ = [
    "CUDA_CONTEXT_BYTES",
    "FRAGMENTATION_FRACTION",
    "GPUS",
    "Budget",
    "GpuSpec",
    "budget_of",
    "lookup",
    "replay_cached_bytes",
    "resolve_budget",
    "usable_bytes",
]
