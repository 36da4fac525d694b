"""``memprof diff``: compare two saved profiles (run A, then run B).

Prints both peaks, the change at the peak by category, the modules whose bytes at the peak
changed most, the per-phase highs and the step peaks; ``-o diff.html`` also writes the
comparison report (timelines overlaid). ``--fail-over 5%`` (or a size, ``64MiB``) makes it exit
with code 5 (:data:`FAIL_OVER_EXIT_CODE`) when B's peak exceeds A's by more than that: a memory
regression check for CI.

``--json`` prints one object on stdout with the keys ``a``, ``b`` (the paths), ``peak``
(``a_bytes``, ``b_bytes``, ``delta_bytes``, ``delta_pct``), ``rows`` (every row of
:func:`memprof.compare`, as objects with its columns), ``fail_over`` (``threshold``,
``limit_bytes``, ``exceeded``; null without ``--fail-over``) and ``report`` (the HTML path or
null).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import click

from memprof.commands.common import (
    CommandError,
    echo_json,
    examples,
    handle_errors,
    json_option,
    output_path,
    table,
)

#: Exit code when B's peak exceeds A's by more than ``--fail-over``.
FAIL_OVER_EXIT_CODE = 5
#: Modules listed in the text output.
TOP_MODULES = 15


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=examples(
        "memprof diff reports/base.json reports/new.json",
        "memprof diff base.json new.json -o diff.html --force",
        "memprof diff base.json new.json --fail-over 5%     # exit 5 on a >5% peak regression",
        "memprof diff base.json new.json --fail-over 64MiB --json",
    ),
    short_help="Compare two saved profiles (A, then B).",
)
@click.argument("a_path", metavar="A.json", type=click.Path(path_type=Path))
@click.argument("b_path", metavar="B.json", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              metavar="DIFF.html", help="Also write the comparison as an HTML report.")
@click.option("--fail-over", "fail_over", default=None, metavar="PCT%|SIZE",
              help=f"Exit {FAIL_OVER_EXIT_CODE} when B's peak exceeds A's by more than this "
              "(5%, or a size such as 64MiB).")
@click.option("-f", "--force", is_flag=True, help="Replace an existing report.")
@json_option(keys="a, b, peak, rows, fail_over, report")
@handle_errors
def command(a_path: Path, b_path: Path, output: Path | None, fail_over: str | None,
            force: bool, as_json: bool) -> None:
    """Compare profile B.json against A.json: peaks, per module and category at the peak, per
    phase, step peaks."""
    from memprof.compare import compare, parse_threshold, peak_line
    from memprof.profile import load

    threshold = None
    if fail_over is not None:
        try:
            threshold = parse_threshold(fail_over)
        except ValueError as exc:
            raise CommandError(f"--fail-over: {exc}") from None
    if output is not None:
        output_path(output, force=force, what="report")
    a, b = load(a_path), load(b_path)
    frame = compare(a, b)
    report = None
    if output is not None:
        from memprof.report.diff import write_diff_report

        report = write_diff_report(a, b, output, names=(a_path.name, b_path.name),
                                   overwrite=force)
    total = frame[(frame.section == "peak") & (frame.category == "total")].iloc[0]
    a_peak, b_peak = int(total.a_bytes), int(total.b_bytes)
    verdict: dict[str, Any] | None = None
    if threshold is not None:
        verdict = {"threshold": threshold.text, "limit_bytes": threshold.limit(a_peak),
                   "exceeded": threshold.exceeded(a_peak, b_peak)}
    if as_json:
        echo_json({
            "a": str(a_path),
            "b": str(b_path),
            "peak": {"a_bytes": a_peak, "b_bytes": b_peak, "delta_bytes": b_peak - a_peak,
                     "delta_pct": _finite(float(total.delta_pct))},
            "rows": [{k: _finite(v) if isinstance(v, float) else v for k, v in r.items()}
                     for r in frame.to_dict(orient="records")],
            "fail_over": verdict,
            "report": None if report is None else str(report),
        })
    else:
        _print_text(a_path, b_path, a, b, frame, peak_line(frame))
        if report is not None:
            click.echo(f"report: {report}")
    if threshold is not None and threshold.exceeded(a_peak, b_peak):
        from memprof.units import format_bytes

        click.echo(
            f"memprof: B's peak {format_bytes(b_peak)} exceeds A's {format_bytes(a_peak)} by "
            f"more than {threshold.text} (limit {format_bytes(threshold.limit(a_peak))})",
            err=True,
        )
        sys.exit(FAIL_OVER_EXIT_CODE)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _print_text(a_path: Path, b_path: Path, a: Any, b: Any, frame: Any, headline: str) -> None:
    from memprof.commands.common import size
    from memprof.compare import signed_bytes, signed_pct

    def rows_of(section: str, *, changed: bool = False, top: int | None = None) -> list[Any]:
        part = frame[frame.section == section]
        if changed:
            part = part[(part.delta_bytes != 0) | (part.present != "both")]
            part = part.reindex(part.delta_bytes.abs().sort_values(ascending=False).index)
        if top is not None:
            part = part.head(top)
        return list(part.itertuples())

    def cells(r: Any) -> list[str]:
        return [size(int(r.a_bytes)), size(int(r.b_bytes)), signed_bytes(int(r.delta_bytes)),
                signed_pct(float(r.delta_pct))]

    click.echo(f"memprof diff: A = {a_path}, B = {b_path}")
    click.echo(headline)
    for label, profile in (("A", a), ("B", b)):
        peak = profile.peak_info
        click.echo(f"  {label}: {peak.describe() if peak else 'no step profiled'}")
        if profile.oom is not None:
            click.echo(f"  {label}: {profile.oom.describe()}")
    click.echo("")
    click.echo("at the peak, by category:")
    peak_rows = [r for r in rows_of("peak") if r.a_bytes or r.b_bytes or r.category == "total"]
    click.echo(table(["category", "A", "B", "change", "%"],
                     [[str(r.category), *cells(r)] for r in peak_rows]))
    changed = [r for r in rows_of("peak_module", changed=True, top=TOP_MODULES)]
    click.echo("")
    if changed:
        click.echo("modules at the peak, largest changes:")
        click.echo(table(["module", "category", "A", "B", "change", "%", "present"],
                         [[str(r.name) or "(root)", str(r.category), *cells(r), str(r.present)]
                          for r in changed]))
    else:
        click.echo("modules at the peak: no change")
    for section, title in (("phase", "per phase (highest live bytes):"), ("step", "step peaks:")):
        found = rows_of(section)
        if found:
            click.echo("")
            click.echo(title)
            click.echo(table([section, "A", "B", "change", "%", "present"],
                             [[str(r.name), *cells(r), str(r.present)] for r in found]))
