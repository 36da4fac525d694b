"""``memprof export``: write a saved profile in PyTorch's own formats.

``--format memory-viz`` writes the pickle ``torch.cuda.memory._dump_snapshot`` writes (open it
at pytorch.org/memory_viz, or ``python -m torch.cuda._memory_viz stats FILE``), taken at the
profile's peak; ``--format chrome-trace`` writes trace-event JSON for Perfetto
(ui.perfetto.dev) or chrome://tracing: memory counters per category, slices per step, phase
and module.

``--json`` prints one object on stdout with the keys ``profile`` (path read), ``output`` (path
written), ``format``, ``bytes`` (size of the file written) and ``peak_bytes``.
"""

from __future__ import annotations

from pathlib import Path

import click

from memprof.commands.common import CommandError, echo_json, examples, handle_errors, json_option
from memprof.commands.common import output_path as check_output

FORMATS = {"memory-viz": ".pickle", "chrome-trace": ".trace.json"}


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=examples(
        "memprof export reports/train_gpt2.json --format memory-viz -o snap.pickle",
        "memprof export reports/train_gpt2.json --format chrome-trace -o trace.json --force",
    ),
    short_help="Write a profile as a PyTorch memory snapshot or a Chrome trace.",
)
@click.argument("profile_path", metavar="PROFILE.json", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(sorted(FORMATS)), required=True,
              help="memory-viz: torch's snapshot pickle; chrome-trace: Perfetto JSON.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, metavar="OUT",
              help="Where to write [default: PROFILE with .pickle or .trace.json].")
@click.option("-f", "--force", is_flag=True, help="Replace an existing file.")
@json_option(keys="profile, output, format, bytes, peak_bytes")
@handle_errors
def command(profile_path: Path, fmt: str, output: Path | None, force: bool,
            as_json: bool) -> None:
    """Write PROFILE.json as a PyTorch memory snapshot (memory_viz) or a Chrome trace."""
    from memprof.profile import load

    profile = load(profile_path)
    target = output if output is not None else profile_path.with_suffix(FORMATS[fmt])
    if target.resolve() == profile_path.resolve():
        raise CommandError(f"the export would replace the profile {profile_path}: use -o")
    check_output(target, force=force, what="export")
    if fmt == "memory-viz":
        from memprof.snapshot.memory_viz import write_snapshot

        written = write_snapshot(profile, target, overwrite=force)
    else:
        from memprof.snapshot.chrome_trace import write_trace

        written = write_trace(profile, target, overwrite=force)
    if as_json:
        echo_json({
            "profile": str(profile_path),
            "output": str(written),
            "format": fmt,
            "bytes": written.stat().st_size,
            "peak_bytes": None if profile.peak_info is None else profile.peak_info.total_bytes,
        })
    else:
        click.echo(f"{fmt}: {written}")
