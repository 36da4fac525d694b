"""``memprof gpus``: what NVML sees: each GPU's memory and the processes using it.

With no NVIDIA driver (or no permission) it prints one line and exits with
:class:`~memprof.errors.DeviceNotAvailableError`'s code (4).

``--json`` prints one object on stdout with the keys ``available`` (bool), ``reason`` (null or
why NVML cannot be read), ``driver`` and ``cuda`` (versions or null), and ``gpus``: a list of
``index``, ``name``, ``total_bytes``, ``used_bytes``, ``free_bytes`` and ``processes`` (each
``pid``, ``name``, ``used_bytes`` or null when the driver does not say).
"""

from __future__ import annotations

from typing import Any

import click

from memprof.commands.common import echo_json, examples, handle_errors, json_option, size, table
from memprof.devices import GpuInfo, nvml
from memprof.errors import DeviceNotAvailableError


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=examples("memprof gpus", "memprof gpus --json"),
    short_help="List GPUs, their memory and the processes using it.",
)
@json_option(keys="available, reason, driver, cuda, gpus")
@handle_errors
def command(as_json: bool) -> None:
    """List each NVIDIA GPU with its memory (total, used, free), the processes using it, and
    the driver and CUDA versions, as NVML reports them."""
    session = nvml()
    if not session.available:
        reason = session.reason or "NVML is not available"
        if as_json:
            echo_json({"available": False, "reason": reason, "driver": None, "cuda": None,
                       "gpus": []})
        raise DeviceNotAvailableError(f"cannot list GPUs: {reason}")
    gpus = session.gpus()
    versions = session.driver_versions()
    if as_json:
        echo_json({
            "available": True,
            "reason": None,
            "driver": versions.get("driver"),
            "cuda": versions.get("cuda"),
            "gpus": [gpu_dict(g) for g in gpus],
        })
    else:
        click.echo(render(gpus, versions))
    if not gpus:
        raise DeviceNotAvailableError("NVML is working but reports no GPU")


def gpu_dict(gpu: GpuInfo) -> dict[str, Any]:
    """One GPU as the ``--json`` output spells it."""
    return {
        "index": gpu.index,
        "name": gpu.name,
        "total_bytes": gpu.total_bytes,
        "used_bytes": gpu.used_bytes,
        "free_bytes": gpu.free_bytes,
        "processes": [
            {"pid": p.pid, "name": p.name, "used_bytes": p.used_bytes} for p in gpu.processes
        ],
    }


def render(gpus: list[GpuInfo], versions: dict[str, str | None]) -> str:
    """The text view: driver line, a table of GPUs, and a table of processes."""
    lines = [
        f"NVIDIA driver {versions.get('driver') or 'unknown'}, "
        f"CUDA {versions.get('cuda') or 'unknown'}"
    ]
    if not gpus:
        return "\n".join(lines)
    lines.append("")
    lines.append(table(
        ["gpu", "name", "total", "used", "free", "used %"],
        [
            [g.index, g.name, size(g.total_bytes), size(g.used_bytes), size(g.free_bytes),
             f"{100 * g.used_bytes / g.total_bytes:.1f}%" if g.total_bytes else "-"]
            for g in gpus
        ],
        align="rlrrrr",
    ))
    processes = [(g.index, p) for g in gpus for p in g.processes]
    lines.append("")
    if processes:
        lines.append(table(
            ["gpu", "pid", "process", "used"],
            [[i, p.pid, p.name or "?", size(p.used_bytes)] for i, p in processes],
            align="rrlr",
        ))
    else:
        lines.append("no processes are using the GPUs")
    return "\n".join(lines)
