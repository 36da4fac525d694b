"""The out-of-memory post-mortem: what was asked for, by whom, with what alive (the plan to fit
is the advisor's: :mod:`memprof.advisor.oom_plan`).

A step that dies of an out-of-memory error (``torch.cuda.OutOfMemoryError``, or on the CPU the
allocator's ``RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate N
bytes``) ends the profile with an :class:`OOMReport` in ``Profile.oom``. The profiler captures
the module and phase at the innermost point it can (the failing module's forward hook, which
runs while the exception propagates; for backward and optimizer failures, the module stack when
the exception leaves the profiled block) and what the ledger had alive then.

Example::

    try:
        with memprof.profile(model, optimizer) as prof:
            train_step()
    except torch.cuda.OutOfMemoryError:
        print(prof.profile.oom.describe())
        # out of memory: asked for 2.0 GiB in 'h.11.mlp' backward (step 3) with 22.1 GiB live...
"""

from __future__ import annotations

import os
import re
import resource
from dataclasses import asdict, dataclass, field
from typing import Any

from memprof import hooks
from memprof.categories import CATEGORIES
from memprof.hooks import plugged
from memprof.units import format_bytes

#: The CPU allocator's message: the exact size in bytes.
_CPU_SIZE = re.compile(r"you tried to allocate (\d+) bytes")
#: CUDA's message: "Tried to allocate 2.00 GiB" (c10's format_size: bytes, KiB, MiB, GiB).
_CUDA_SIZE = re.compile(r"[Tt]ried to allocate (\d+(?:\.\d+)?) ?(bytes|KiB|MiB|GiB|TiB|PiB)")
_UNIT = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
         "PiB": 1 << 50}
#: Text that marks an out-of-memory RuntimeError (older torch, other allocators).
_OOM_TEXT = ("can't allocate memory", "out of memory", "CUDA error: out of memory")


@dataclass(frozen=True)
class OOMReport:
    """How the profiled run ran out of memory. Sizes in bytes (None: not known).

    ``requested_bytes`` is the failed request (parsed from the message; on CUDA the allocator's
    own figure when its OOM observer fired); ``module`` and ``phase`` the module and phase that
    asked; ``live_bytes`` / ``by_category`` / ``by_module`` what memprof tracked alive then;
    ``capacity_bytes`` the device's limit and ``capacity_source`` where that number comes from;
    ``device_allocated_bytes`` / ``device_free_bytes`` the device's own view at the failure
    (CUDA allocator, or the address space used under ``RLIMIT_AS``); ``budget_bytes`` what the
    step could use (the budget the advisor planned for) and ``plan`` the advisor's plan for it.
    """

    error: str
    requested_bytes: int | None
    module: str
    phase: str
    step: int
    live_bytes: int
    by_category: dict[str, int]
    by_module: dict[str, dict[str, int]]
    capacity_bytes: int | None = None
    capacity_source: str = "unknown"
    device_allocated_bytes: int | None = None
    device_free_bytes: int | None = None
    budget_bytes: int | None = None
    plan: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: ``out of memory: asked for 2.0 GiB in 'h.11.mlp' backward ...``."""
        asked = format_bytes(self.requested_bytes) if self.requested_bytes else "an unknown size"
        where = f"in {self.module!r}" if self.module else "outside any module"
        parts = [f"out of memory: asked for {asked} {where} {self.phase} (step {self.step}) "
                 f"with {format_bytes(self.live_bytes)} live"]
        held = sorted(((v, c) for c, v in self.by_category.items() if v > 0), reverse=True)
        if held:
            parts[0] += " (" + ", ".join(f"{c} {format_bytes(v)}" for v, c in held[:3]) + ")"
        if self.capacity_bytes is not None:
            parts.append(f"capacity {format_bytes(self.capacity_bytes)} ({self.capacity_source})")
        if self.plan:
            parts.append(f"to fit: {self.plan.get('explanation', '')}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OOMReport:
        return cls(**data)


def is_oom(exc: BaseException | None) -> bool:
    """Whether ``exc`` is an out-of-memory error of torch's allocators."""
    if exc is None:
        return False
    oom_type = _oom_type()
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc) for t in _OOM_TEXT)


def oom_in_chain(exc: BaseException | None) -> BaseException | None:
    """The out-of-memory error ``exc`` is or was raised from (``raise X from oom``), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if is_oom(exc):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def requested_bytes(message: str) -> int | None:
    """The size the failed request asked for, read from the error's message."""
    match = _CPU_SIZE.search(message)
    if match:
        return int(match.group(1))
    match = _CUDA_SIZE.search(message)
    if match:
        return int(float(match.group(1)) * _UNIT[match.group(2)])
    return None


def _oom_type() -> type[BaseException] | None:
    import torch

    found = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError",
                                                                 None)
    return found if isinstance(found, type) else None


# ------------------------------------------------------------------ the CUDA observer
#: The last OOM the CUDA allocator reported: (device, requested, allocated, free), or None.
last_cuda_oom: tuple[int, int, int, int] | None = None
_observer_attached = False


def _observe(device: int, requested: int, allocated: int, free: int) -> None:
    global last_cuda_oom
    last_cuda_oom = (int(device), int(requested), int(allocated), int(free))


def attach_cuda_observer() -> None:
    """Attach memprof's observer to CUDA's caching allocator (once per process: torch offers
    no detach, so it only stores the last failure). Does nothing without CUDA."""
    global _observer_attached
    if _observer_attached:
        return
    import torch

    attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
    # The caching allocator hands the observer to its per-device allocators, which exist only
    # once CUDA is initialised: attached earlier, it would be dropped.
    if attach is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    try:
        attach(_observe)
    except Exception:  # an allocator without observers (a custom one): the message suffices
        return
    _observer_attached = True


def take_cuda_oom() -> tuple[int, int, int, int] | None:
    """The CUDA allocator's last failure, forgotten once read."""
    global last_cuda_oom
    found, last_cuda_oom = last_cuda_oom, None
    return found


# ------------------------------------------------------------------ capacity
def device_capacity(kind: str) -> tuple[int | None, str, int | None, int | None]:
    """(capacity, where it comes from, used, free) of the device the profile ran on."""
    if kind == "cuda":
        import torch

        try:
            cuda_free, cuda_total = torch.cuda.mem_get_info()
        except Exception:
            return None, "unknown", None, None
        fraction = _memory_fraction()
        if fraction < 1.0:  # set_per_process_memory_fraction caps the allocator below that
            cap = int(cuda_total * fraction)
            allocated = int(torch.cuda.memory_reserved())
            return (cap, f"CUDA memory fraction {fraction:g} of {format_bytes(cuda_total)}",
                    allocated, max(cap - allocated, 0))
        return (int(cuda_total), "CUDA device memory (mem_get_info)",
                int(cuda_total - cuda_free), int(cuda_free))
    if kind != "cpu":
        return None, "unknown", None, None
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        mapped = _vm_size()
        free = None if mapped is None else max(soft - mapped, 0)
        return int(soft), "RLIMIT_AS (address-space limit)", mapped, free
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return None, "unknown", None, None
    return int(total), "physical memory", int(total - avail), int(avail)


def _memory_fraction() -> float:
    import torch

    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    try:
        return float(getter()) if getter is not None else 1.0
    except Exception:
        return 1.0


def _vm_size() -> int | None:
    """This process's virtual address space in bytes (Linux), what RLIMIT_AS caps."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ------------------------------------------------------------------ building the report
def build_report(
    *,
    error: BaseException,
    module: str,
    phase: str,
    step: int,
    by_module: dict[str, dict[str, int]],
    kind: str,
    device_view: tuple[int | None, str, int | None, int | None] | None = None,
) -> OOMReport:
    """The post-mortem of ``error`` (the advisor's plan is added by :func:`with_plan`)."""
    message = " ".join(str(error).split())
    requested: int | None = requested_bytes(message)
    by_category = dict.fromkeys(CATEGORIES, 0)
    for row in by_module.values():
        for category, nbytes in row.items():
            by_category[category] += nbytes
    live = sum(by_category.values())
    capacity, source, used, free = device_view or device_capacity(kind)
    notes: list[str] = []
    observed = take_cuda_oom() if kind == "cuda" else None
    # The observer also fires for failures torch recovers from (cuDNN retrying with less
    # workspace): use it only when it agrees with the error's own (2-decimal) figure.
    if observed is not None and (requested is None
                                 or abs(observed[1] - requested) <= 0.01 * requested):
        _device, asked, allocated, free_now = observed
        requested, used, free = asked, allocated, free_now
        notes.append("requested, allocated and free bytes from the CUDA allocator's OOM observer")
    budget = None
    if capacity is not None:
        if kind == "cpu" and used is not None and free is not None:
            # What tensors could still have: the limit's headroom plus what they already hold
            # (the rest of the address space is the interpreter, libraries, the allocator).
            budget = free + live
            notes.append(f"budget {format_bytes(budget)} = tracked live "
                         f"{format_bytes(live)} + {format_bytes(free)} left under the limit")
        else:
            budget = capacity
    return OOMReport(
        error=f"{type(error).__name__}: {message}"[:500],
        requested_bytes=requested,
        module=module,
        phase=phase,
        step=step,
        live_bytes=live,
        by_category={c: v for c, v in by_category.items() if v},
        by_module={k: {c: v for c, v in row.items() if v} for k, row in by_module.items()},
        capacity_bytes=capacity,
        capacity_source=source,
        device_allocated_bytes=used,
        device_free_bytes=free,
        budget_bytes=budget,
        notes=notes,
    )


def with_plan(profile: Any, report: OOMReport) -> OOMReport:
    """``report`` with the advisor's plan to fit its budget
    (:func:`memprof.advisor.oom_plan.with_plan`, through :data:`memprof.hooks.oom_plan`: the
    advisor sits above this module)."""
    return plugged(hooks.oom_plan, "oom_plan")(profile, report)


__all__ = ["OOMReport", "attach_cuda_observer", "build_report", "is_oom", "requested_bytes"]
