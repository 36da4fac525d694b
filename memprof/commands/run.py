"""``memprof run``: profile an unmodified script (or ``-m module``) in-process.

The script runs as ``__main__`` (``runpy``) with ``sys.argv`` set as Python would set it, inside
a :class:`~memprof.tracking.session.Profiler` that tracks every module and optimizer globally
and ends a step at each optimizer step. A script that never steps an optimizer (inference) is
profiled as one step. The script's exit code is memprof's exit code; a script that raises has
its traceback shown as Python would show it, its partial profile written, and exit code 1.

``--json`` prints one object on stdout (the script's own stdout then goes to stderr) with the
keys:

- ``target``, ``module`` (bool: ``-m``), ``argv`` (what the script saw as ``sys.argv``);
- ``exit_code``, ``error`` (``"Type: message"`` when the script raised, else null);
- ``profile`` (path of the JSON), ``report`` (path of the HTML, or null);
- ``steps`` (profiled steps), ``optimizer_steps`` (optimizer steps the script took),
  ``steps_seen``, ``interrupted``;
- ``peak``: ``total_bytes``, ``step``, ``phase``, ``module``, ``by_category`` (null when
  nothing was profiled);
- ``modules``: the largest modules, each ``module``, ``type``, ``parameter``, ``gradient``,
  ``optimizer_state``, ``activation``, ``temporary_peak``, ``held`` (bytes);
- ``advice`` (the advisor's JSON, or null), ``notes`` (why something was skipped),
  ``warnings`` (the profile's);
- ``oom``: the out-of-memory post-mortem (:class:`memprof.oom.OOMReport` as an object) when
  the script died of one, else null.
"""

from __future__ import annotations

import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from memprof.commands.budget import parse_budget
from memprof.commands.common import (
    CommandError,
    echo_json,
    examples,
    handle_errors,
    json_option,
    note,
    one_line,
    output_path,
    to_jsonable,
)
from memprof.commands.script_runner import Outcome, Target, execute, resolve_target
from memprof.errors import MemprofError

#: Where profiles go when ``--output`` is not given.
DEFAULT_DIR = Path("reports")
#: Modules shown in the summary and in ``--json``'s ``modules``.
TOP_MODULES = 15
_HELD = ("parameter", "gradient", "optimizer_state", "activation")


@click.command(
    context_settings={"allow_interspersed_args": False, "help_option_names": ["-h", "--help"]},
    epilog=examples(
        "memprof run examples/train_mlp.py --steps 5",
        "memprof run --steps 3 --budget 24GiB -o reports/gpt2.json examples/train_gpt2.py",
        'memprof run --budget "A100 40GB" --no-html examples/train_cnn.py',
        "memprof run -m mypackage.train --lr 3e-4",
    ),
    short_help="Profile an unmodified training script.",
)
@click.option("--steps", type=click.IntRange(min=1), default=None, metavar="N",
              help="Profile the first N optimizer steps only; the script still runs to its end.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              metavar="PATH", help="Profile JSON to write [default: reports/SCRIPT.json]; the "
              "HTML report goes next to it with an .html suffix. Under torchrun each rank "
              "writes its own: SCRIPT.rank0.json, SCRIPT.rank1.json, ...")
@click.option("--no-html", is_flag=True, help="Write the profile JSON only.")
@click.option("-f", "--force", is_flag=True, help="Replace existing output files.")
@click.option("--budget", default=None, metavar="SIZE|GPU",
              help='Memory budget the advice aims for: "24GiB", "80GB" or a GPU name.')
@click.option("-m", "as_module", is_flag=True,
              help="Run a module as `python -m` would: memprof run -m package.module [args].")
@click.option("--no-fake-predictions", "no_fake", is_flag=True,
              help="Predict the recommendations from the profile alone (analytic), not by "
              "fake runs of the script's model.")
@click.option("--op-trace", is_flag=True,
              help="Also record the operator trace of one of the first two steps in the "
              "profile, so `memprof advise FILE` replays autocast from the file alone. The "
              "traced steps run about 2x slower under a Python dispatch mode, which can change a "
              "few bytes of what they allocate (scalars wrapped as tensors).")
@json_option(keys="target, module, argv, exit_code, error, profile, report, steps, "
             "optimizer_steps, steps_seen, interrupted, peak, modules, advice, notes, warnings, "
             "oom")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="SCRIPT.py [ARGS]...")
@handle_errors
def command(
    steps: int | None,
    output: Path | None,
    no_html: bool,
    force: bool,
    budget: str | None,
    as_module: bool,
    no_fake: bool,
    op_trace: bool,
    as_json: bool,
    args: tuple[str, ...],
) -> None:
    """Run SCRIPT.py (or -m MODULE) with ARGS under memprof, unchanged.

    Every module's forward and backward and every optimizer step is tracked; each optimizer
    step ends a profiled step (a script with no optimizer is profiled as one step). Writes the
    profile JSON and the HTML report, prints the per-layer summary and the top
    recommendations, and exits with the script's exit code.
    """
    target = resolve_target(args, as_module=as_module)
    json_path = output if output is not None else DEFAULT_DIR / f"{target.stem}.json"
    if json_path.suffix.lower() in (".html", ".htm"):
        raise CommandError(
            f"--output {json_path} looks like HTML: it names the profile JSON; the HTML "
            "report is written next to it"
        )
    # One rank of several (torchrun): its own files, NAME.rank{R}.json and .html.
    from memprof.tracking.distributed import rank_from_env, rank_path

    json_path = rank_path(json_path, rank_from_env())
    html_path = None if no_html else json_path.with_suffix(".html")
    # Everything the user could get wrong is checked before the script runs.
    output_path(json_path, force=force, what="profile")
    if html_path is not None:
        output_path(html_path, force=force, what="report")
    budget = parse_budget(budget)

    from memprof.tracking.session import Profiler

    profiler = Profiler(step_on_optimizer=True, max_steps=steps, record_ops=op_trace)
    capture = None if no_fake else _capture()
    outcome = execute(target, profiler, quiet_stdout=as_json, capture=capture)
    profile = profiler.profile
    profile.meta["run"] = {
        "target": target.name,
        "module": target.is_module,
        "argv": target.argv,
        "exit_code": outcome.exit_code,
        "max_steps": steps,
        "optimizer_steps": outcome.optimizer_steps,
    }

    notes = list(outcome.notes)
    advised = profile
    if profile.oom is not None:  # advise for the step that did not fit, not its partial peak
        from memprof.advisor.oom_plan import needed_profile

        advised = needed_profile(profile, profile.oom)
    advice, advice_note = run_advisor(advised, budget, capture=capture, fake=not no_fake)
    if advice_note:
        notes.append(advice_note)
    if advice is not None:
        profile.advice = to_jsonable(advice)
    if profile.oom is not None and capture is not None:
        profile.oom = _oom_plan_by_fake_runs(profile, capture, notes)

    exit_code = outcome.exit_code
    profile.save(json_path, overwrite=force)
    report_path: Path | None = None
    if html_path is not None:
        try:
            from memprof.report import write_report
        except ImportError as exc:
            notes.append(f"HTML report skipped: memprof.report cannot be imported ({exc})")
        else:
            try:
                write_report(profile, html_path, advice=advice, overwrite=force)
                report_path = html_path
            except MemprofError as exc:
                notes.append(f"HTML report not written: {one_line(exc)}")
                exit_code = exit_code or exc.exit_code
            except Exception as exc:  # the profile is saved; say why the report is not
                notes.append(f"HTML report not written: {type(exc).__name__}: {one_line(exc)}")
                exit_code = exit_code or 1

    if as_json:
        echo_json(_json_result(target, outcome, profile, json_path, report_path, advice, notes))
    else:
        _print_text(target, outcome, profile, json_path, report_path, advice)
    for line in notes:
        note(line)
    if exit_code:
        sys.exit(exit_code)


# ------------------------------------------------------------------ advice
def _capture() -> Any:
    """A :class:`~memprof.advisor.capture.ScriptCapture`, or None without the advisor."""
    try:
        from memprof.advisor.capture import ScriptCapture
    except ImportError:
        return None
    return ScriptCapture()


def run_advisor(
    profile: Any, budget: str | None, *, capture: Any = None, fake: bool = False
) -> tuple[Any, str | None]:
    """The advisor's recommendations, or None and a one-line note saying why there are none.
    With ``fake``, each is predicted by a fake run of what ``capture`` took from the script
    (see :func:`memprof.advisor.capture.predict`); else from the profile alone."""
    if profile.peak_info is None:
        return None, "no advice: no step was profiled"
    try:
        from memprof.advisor import advise
    except ImportError as exc:
        return None, f"advice skipped: memprof.advisor cannot be imported ({one_line(exc)})"
    try:
        if fake and capture is not None:
            from memprof.advisor.capture import predict

            return predict(profile, capture, budget=budget), None
        return advise(profile, budget=budget), None
    except MemprofError as exc:
        return None, f"advice skipped: {one_line(exc)}"
    except Exception as exc:  # advice is a bonus: never lose the profile over it
        return None, f"advice skipped: the advisor failed ({type(exc).__name__}: {one_line(exc)})"


def _oom_plan_by_fake_runs(profile: Any, capture: Any, notes: list[str]) -> Any:
    """The post-mortem's plan again, its changes predicted by fake runs of the captured model
    (the one made at the error, inside the profiler, predicted from the profile alone)."""
    from memprof.advisor.capture import CaptureError
    from memprof.advisor.oom_plan import with_plan

    report = profile.oom
    if report.budget_bytes is None:
        return report
    try:
        workload = capture.workload()
    except CaptureError as exc:
        notes.append(f"out-of-memory plan predicted from the profile alone: {exc}")
        return report
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        return with_plan(profile, report, fake_model=workload)


def prediction_note(data: dict[str, Any]) -> str:
    """One line: how the predicted column was made (fake runs, and how long they took, or
    the profile alone), and for how many rows."""
    rows = [r for r in data["recommendations"] if r.get("applicable")]
    by = [r.get("predicted_by") for r in rows]
    fake, analytic = by.count("fake run"), by.count("analytic")
    seconds = data.get("fake_prediction_s")
    if fake and seconds is not None:
        text = f"predicted by fake runs of the model in {seconds:.1f} s: {fake} rows"
    elif fake:
        text = f"predicted by fake runs of the model (stored in the profile): {fake} rows"
    else:
        text = "predicted from the profile alone (analytic)"
    if fake and analytic:
        text += f"; {analytic} analytic (see caveats)"
    skipped = data.get("fake_prediction_skipped")
    if skipped:
        text += f"; no fake runs: {skipped}"
    return text


def advice_text(advice: Any, *, top: int = 3) -> str:
    """The top recommendations as text, from whatever summary the advice offers."""
    summary = getattr(advice, "summary", None)
    if callable(summary):
        try:
            return str(summary(top=top))
        except TypeError:
            return str(summary())
    table: Any = getattr(advice, "table", None)
    frame: Any = table() if callable(table) else table
    if hasattr(frame, "head") and hasattr(frame, "to_string"):
        return str(frame.head(top).to_string(index=False))
    return str(advice)


def recommendation_text(advice: Any, profile: Any, json_path: Path, *, top: int = 3) -> str:
    """The one recommendation (the same the report's headline and out-of-memory card give:
    :func:`memprof.report.advice_view.recommend`), then the next few changes that save memory."""
    from memprof.report import advice_view

    data = advice_view.normalise(to_jsonable(advice)) or {}
    lines = []
    fits = advice_view.fit(data)
    if fits is not None:
        lines.append(fits.text)
    chosen = advice_view.recommend(data, profile.oom)
    if chosen is not None:
        lines.append(f"{'To save more' if fits is not None else 'Recommended'}: {chosen.text}")
    others = advice_view.display_order([
        r for r in advice_view.rows(data)
        if advice_view.is_applicable(r) and advice_view.saves_memory(r)
        and (chosen is None or advice_view.describe(r) != chosen.change)])
    if others:
        lines.append(f"Other changes ({len(others)}; all of them: memprof advise {json_path} "
                     "--all):")
        for r in others[:top]:
            lines.append(f"  {advice_view.describe(r)}: saves about "
                         f"{advice_view.cell(r['predicted_saving_bytes'], 'bytes')} "
                         f"({r.get('cost') or 'cost unknown'})")
    return "\n".join(lines) if lines else advice_text(advice, top=top)


# ------------------------------------------------------------------ output
def top_modules(profile: Any, top: int = TOP_MODULES) -> list[dict[str, Any]]:
    """The modules holding the most memory (parameters + grads + optimizer state +
    activations), largest first."""
    frame = profile.modules()
    if not len(frame):
        return []
    frame = frame.assign(held=frame[list(_HELD)].sum(axis=1))
    frame = frame[frame["held"] > 0].sort_values("held", ascending=False).head(top)
    keys = ("module", "type", *_HELD, "temporary_peak", "held")
    return [{k: to_jsonable(row[k]) for k in keys} for _, row in frame.iterrows()]


def _json_result(
    target: Target,
    outcome: Outcome,
    profile: Any,
    json_path: Path,
    report_path: Path | None,
    advice: Any,
    notes: list[str],
) -> dict[str, Any]:
    peak = profile.peak_info
    return {
        "target": target.name,
        "module": target.is_module,
        "argv": target.argv,
        "exit_code": outcome.exit_code,
        "error": outcome.error,
        "profile": str(json_path),
        "report": None if report_path is None else str(report_path),
        "steps": len(profile.steps_stats),
        "optimizer_steps": outcome.optimizer_steps,
        "steps_seen": profile.meta.get("steps_seen"),
        "interrupted": bool(profile.meta.get("interrupted")),
        "peak": None if peak is None else {
            "total_bytes": peak.total_bytes,
            "step": peak.step,
            "phase": peak.phase,
            "module": peak.module,
            "by_category": peak.by_category,
        },
        "modules": top_modules(profile),
        "advice": profile.advice if advice is not None else None,
        "notes": notes,
        "warnings": list(profile.warnings),
        "oom": profile.oom.to_dict() if profile.oom is not None else None,
    }


def largest_tensors_text(profile: Any, *, top: int = 5) -> str:
    """The largest tensors at the peak, one line each, with shape, dtype and source line."""
    from memprof.units import format_bytes

    if profile.peak_info is None or not profile.peak_info.top_tensors:
        return ""
    lines = ["Largest tensors at the peak:"]
    for t in profile.peak_info.top_tensors[:top]:
        shape = "x".join(str(d) for d in t.shape) or "scalar"
        where = f"  {t.source_text(_short_path)}" if t.source else ""
        lines.append(f"  {format_bytes(t.nbytes):>10}  {t.category:<15} {t.dtype} [{shape}] "
                     f"in {t.module or '(root)'!r}{where}")
    return "\n".join(lines)


def _short_path(source: str) -> str:
    """A source line's path relative to the working directory, or from site-packages on."""
    cwd = os.getcwd() + os.sep
    if source.startswith(cwd):
        return source[len(cwd):]
    marker = "site-packages" + os.sep
    return source.split(marker, 1)[1] if marker in source else source


def _print_text(
    target: Target,
    outcome: Outcome,
    profile: Any,
    json_path: Path,
    report_path: Path | None,
    advice: Any,
) -> None:
    steps = len(profile.steps_stats)
    how = f"exit code {outcome.exit_code}" if outcome.error is None else outcome.error
    click.echo("")
    click.echo(
        f"memprof run: {target.name} ({how}); {outcome.optimizer_steps} optimizer step(s), "
        f"{steps} step(s) profiled"
    )
    click.echo(profile.summary(top=TOP_MODULES))
    largest = largest_tensors_text(profile)
    if largest:
        click.echo("")
        click.echo(largest)
    if advice is not None:
        click.echo("")
        click.echo(recommendation_text(advice, profile, json_path))
        data = advice.to_dict() if hasattr(advice, "to_dict") else None
        if isinstance(data, dict) and "recommendations" in data:
            click.echo(prediction_note(data))
        simulate = ["memprof", "advise", "--simulate", *(["-m"] if target.is_module else [])]
        simulate += [target.name, *target.argv[1:]]
        click.echo("Measure them on this script: " + shlex.join(simulate))
    click.echo("")
    click.echo(f"profile: {json_path}")
    if report_path is not None:
        click.echo(f"report:  {report_path}")
