"""``memprof report`` on the ranks of a multi-process run: several files or a folder.

``--json`` prints ``profiles`` (the files read, by rank), ``report`` (path written), ``bytes``,
``ranks`` (one object per rank: ``rank``, ``profile``, ``peak_bytes``, ``phase``, ``module``,
``by_category``) and ``imbalance`` (``ratio``: max/min peak, ``over_mean``: max minus mean peak
in bytes, ``largest_rank``, ``smallest_rank``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from memprof.commands.common import CommandError, echo_json, output_path
from memprof.tracking.distributed import RANK_TAG, rank_of_name


def rank_files(paths: tuple[Path, ...]) -> list[Path]:
    """The profiles to merge: files as given, and in a folder its ``*.rank<N>.json``
    (every ``*.json`` when none carries a rank tag)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(path.glob("*.json"))
            tagged = [p for p in inside if rank_of_name(p) is not None]
            chosen = tagged or inside
            if not chosen:
                raise CommandError(f"{path} is a directory with no profile (*.json) in it")
            runs = sorted({RANK_TAG.sub("", p.stem) for p in tagged})
            if len(runs) > 1:
                raise CommandError(
                    f"{path} holds the ranks of several runs ({', '.join(runs)}): give one "
                    f"run's files, e.g. {path / (runs[0] + '.rank*.json')}"
                )
            found.extend(sorted(chosen, key=lambda p: (rank_of_name(p) or 0, p.name)))
        else:
            found.append(path)
    return found


def default_output(paths: tuple[Path, ...], files: list[Path]) -> Path:
    """``reports/train.ranks.html`` for ``reports/train.rank*.json``; ``DIR/ranks.html``."""
    if len(paths) == 1 and paths[0].is_dir():
        return paths[0] / "ranks.html"
    first = files[0]
    stem = RANK_TAG.sub("", first.stem)
    return first.with_name(f"{stem}.ranks.html")


def ranks_report(paths: tuple[Path, ...], output: Path | None, *, force: bool,
                 as_json: bool) -> None:
    """Load each rank's profile and write the merged ranks report."""
    from memprof.profile import load
    from memprof.report.ranks import imbalance, rank_rows, write_ranks_report

    files = rank_files(paths)
    target = output if output is not None else default_output(paths, files)
    if any(target.resolve() == f.resolve() for f in files):
        raise CommandError(f"the report would replace the profile {target}: use -o")
    output_path(target, force=force, what="report")
    profiles = [(str(f), load(f)) for f in files]
    rows = rank_rows(profiles)
    written = write_ranks_report(profiles, target, overwrite=force)
    if as_json:
        spread = imbalance(rows)
        echo_json({
            "profiles": [r.label for r in rows],
            "report": str(written),
            "bytes": written.stat().st_size,
            "ranks": [{"rank": r.rank, "profile": r.label, "peak_bytes": r.peak_bytes,
                       "phase": r.phase, "module": r.module, "by_category": r.by_category}
                      for r in rows],
            "imbalance": dataclasses.asdict(spread),
        })
    else:
        click.echo(f"report: {written} ({len(rows)} ranks)")
