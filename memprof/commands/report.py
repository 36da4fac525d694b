"""``memprof report``: turn a saved profile into the self-contained HTML report.

``--json`` prints one object on stdout with the keys ``profile`` (path read), ``report`` (path
written), ``bytes`` (size of the HTML file), ``steps`` (profiled steps in the profile) and
``peak_bytes`` (the profile's peak, null when it recorded no step). Several rank profiles or a
folder make one ranks report (keys in :mod:`memprof.commands.ranks`).
"""

from __future__ import annotations

from pathlib import Path

import click

from memprof.commands.common import (
    CommandError,
    echo_json,
    examples,
    handle_errors,
    json_option,
    output_path,
)
from memprof.errors import MemprofError


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=examples(
        "memprof report reports/train_mlp.json",
        "memprof report reports/train_mlp.json -o /tmp/mlp.html --force",
        "memprof report reports/train_mlp.json --json",
    ),
    short_help="Write the HTML report of a saved profile.",
)
@click.argument("profile_paths", metavar="PROFILE.json...", nargs=-1, required=True,
                type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, metavar="OUT.html",
              help="Where to write the report [default: PROFILE with an .html suffix; for "
              "several ranks NAME.ranks.html, or DIR/ranks.html for a folder].")
@click.option("-f", "--force", is_flag=True, help="Replace an existing report.")
@json_option(keys="profile, report, bytes, steps, peak_bytes (several ranks: profiles, report, "
             "bytes, ranks, imbalance)")
@handle_errors
def command(profile_paths: tuple[Path, ...], output: Path | None, force: bool,
            as_json: bool) -> None:
    """Write the interactive HTML report (one file, works offline) of PROFILE.json, or of a
    PyTorch memory snapshot pickle (torch.cuda.memory._dump_snapshot).

    Several profiles (the ranks of a torchrun run: NAME.rank0.json NAME.rank1.json ...) or a
    folder of them make one report: each rank's peak side by side, the imbalance and each
    rank's categories.
    """
    from memprof.profile import load
    from memprof.snapshot.load import is_snapshot_file, load_snapshot

    if len(profile_paths) > 1 or profile_paths[0].is_dir():
        from memprof.commands.ranks import ranks_report

        ranks_report(profile_paths, output, force=force, as_json=as_json)
        return
    profile_path = profile_paths[0]

    # A PyTorch memory snapshot (torch.cuda.memory._dump_snapshot) reads as a profile too.
    profile = load_snapshot(profile_path) if is_snapshot_file(profile_path) else load(profile_path)
    target = output if output is not None else profile_path.with_suffix(".html")
    if target.resolve() == profile_path.resolve():
        raise CommandError(f"the report would replace the profile {profile_path}: use -o")
    output_path(target, force=force, what="report")
    try:
        from memprof.report import write_report
    except ImportError as exc:
        raise MemprofError(f"the HTML report is unavailable: {exc}") from None
    written = Path(write_report(profile, target, overwrite=force))
    if as_json:
        echo_json({
            "profile": str(profile_path),
            "report": str(written),
            "bytes": written.stat().st_size,
            "steps": len(profile.steps_stats),
            "peak_bytes": None if profile.peak_info is None else profile.peak_info.total_bytes,
        })
    else:
        click.echo(f"report: {written}")
