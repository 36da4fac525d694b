"""Device truth: the CUDA caching allocator's counters and NVML's view of the GPUs.

Every query answers; when something cannot be read (no GPU, no driver, no permission, a call the
driver does not support) the answer is ``{"available": False, "reason": "..."}``, never an
exception. NVML is initialised lazily, once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

#: The caching allocator hands out blocks in multiples of this many bytes.
CUDA_BLOCK_BYTES = 512


def cuda_allocator_stats(device: int | None = None) -> dict[str, Any]:
    """Allocated / reserved bytes (and their peaks) from ``torch.cuda``, or why not."""
    if not torch.cuda.is_available():
        return {"available": False, "reason": "no CUDA device visible to torch"}
    try:
        dev = torch.cuda.current_device() if device is None else device
        return {
            "available": True,
            "device_index": dev,
            "name": torch.cuda.get_device_name(dev),
            "allocated": int(torch.cuda.memory_allocated(dev)),
            "max_allocated": int(torch.cuda.max_memory_allocated(dev)),
            "reserved": int(torch.cuda.memory_reserved(dev)),
            "max_reserved": int(torch.cuda.max_memory_reserved(dev)),
            "total": int(torch.cuda.get_device_properties(dev).total_memory),
        }
    except (RuntimeError, AssertionError) as exc:
        return {"available": False, "reason": f"torch.cuda failed: {exc}"}


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU."""

    pid: int
    used_bytes: int | None
    name: str = ""


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML sees it."""

    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    processes: list[GpuProcess] = field(default_factory=list)


class Nvml:
    """A lazily initialised NVML session; every failure becomes ``available = False``."""

    def __init__(self) -> None:
        self._module: Any = None
        self.reason: str | None = None
        self._initialised = False

    def _init(self) -> bool:
        if self._initialised:
            return self._module is not None
        self._initialised = True
        try:
            import pynvml

            pynvml.nvmlInit()
        except ImportError:
            self.reason = "nvidia-ml-py (the pynvml module) is not installed"
            return False
        except Exception as exc:  # pynvml raises many NVMLError subclasses
            self.reason = _nvml_reason(exc)
            return False
        self._module = pynvml
        return True

    @property
    def available(self) -> bool:
        return self._init()

    def driver_versions(self) -> dict[str, str | None]:
        """NVIDIA driver and the CUDA version it supports."""
        if not self._init():
            return {"driver": None, "cuda": None}
        nv = self._module
        driver = _try(lambda: _text(nv.nvmlSystemGetDriverVersion()))
        cuda = _try(lambda: _cuda_version(nv.nvmlSystemGetCudaDriverVersion()))
        return {"driver": driver, "cuda": cuda}

    def gpus(self) -> list[GpuInfo]:
        """Every GPU, with memory and the processes using it. Empty if NVML is unavailable."""
        if not self._init():
            return []
        nv = self._module
        result = []
        count = _try(nv.nvmlDeviceGetCount) or 0
        for index in range(count):
            handle = _try(lambda i=index: nv.nvmlDeviceGetHandleByIndex(i))
            if handle is None:
                continue
            memory = _try(lambda h=handle: nv.nvmlDeviceGetMemoryInfo(h))
            processes = []
            for proc in _try(lambda h=handle: nv.nvmlDeviceGetComputeRunningProcesses(h)) or []:
                used = getattr(proc, "usedGpuMemory", None)
                processes.append(
                    GpuProcess(
                        pid=int(proc.pid),
                        used_bytes=int(used) if isinstance(used, int) else None,
                        name=_process_name(int(proc.pid)),
                    )
                )
            result.append(
                GpuInfo(
                    index=index,
                    name=_text(_try(lambda h=handle: nv.nvmlDeviceGetName(h)) or "unknown"),
                    total_bytes=int(getattr(memory, "total", 0) or 0),
                    used_bytes=int(getattr(memory, "used", 0) or 0),
                    free_bytes=int(getattr(memory, "free", 0) or 0),
                    processes=processes,
                )
            )
        return result

    def process_view(self, pid: int | None = None) -> dict[str, Any]:
        """This process's GPU memory and each device's use, as the profile records them."""
        if not self._init():
            return {"available": False, "reason": self.reason}
        pid = os.getpid() if pid is None else pid
        devices = self.gpus()
        mine = [
            {"index": g.index, "used_bytes": p.used_bytes}
            for g in devices
            for p in g.processes
            if p.pid == pid
        ]
        return {
            "available": True,
            **self.driver_versions(),
            "process_used_bytes": sum(m["used_bytes"] or 0 for m in mine) if mine else None,
            "process_devices": mine,
            "devices": [
                {"index": g.index, "name": g.name, "total_bytes": g.total_bytes,
                 "used_bytes": g.used_bytes, "free_bytes": g.free_bytes}
                for g in devices
            ],
        }


def _nvml_reason(exc: BaseException) -> str:
    name = type(exc).__name__
    if "LibraryNotFound" in name or "DriverNotLoaded" in name:
        return "no NVIDIA driver found (NVML library not loaded)"
    if "NoPermission" in name:
        return "no permission to query the NVIDIA driver"
    return f"NVML failed: {name}: {exc}"


def _try(call: Any) -> Any:
    """Run an NVML query; a failure (unsupported, not found, ...) becomes None."""
    try:
        return call()
    except Exception:
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cuda_version(code: int) -> str:
    return f"{code // 1000}.{(code % 1000) // 10}"


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return ""


_NVML = Nvml()


def nvml() -> Nvml:
    """The shared NVML session."""
    return _NVML
