"""``memprof advise``: what to change so the step fits, predicted from a profile, or measured
by re-running a script with each change.

``memprof advise SCRIPT.py [ARGS]...`` (or ``-m MODULE``) runs the unchanged script under
memprof (``--steps`` optimizer steps, then the rest of the script is skipped), takes its model,
optimizer, batch and loss as it runs (:mod:`memprof.advisor.capture`) and predicts each change
by a fake run of them (nothing allocated; ``--no-fake-predictions``: from the profile alone).
``--simulate`` then runs the script again once per applicable change with the change applied
to the script's own model and optimizer (see :mod:`memprof.advisor.script`), with a progress
bar per run; the measured peak, the prediction's error, the output and loss drift and the
step-time ratio fill the table. Options go before the script; what follows it is the script's.

``memprof advise PROFILE.json`` shows the fake-run predictions the profile carries (saved by
``memprof run`` or ``-o``) and predicts the other rows from the profile alone (analytic); the
plan is made from those same numbers.

``--budget`` takes a size ("24GiB", "80GB") or a GPU name ("A100 40GB"); ``--gpu`` takes a
GPU name only. The CUDA context and a fragmentation reserve are kept off the budget (see
:mod:`memprof.gpus`). ``--save`` stores the advice in the profile file (the report shows it);
with a script, ``--output`` writes its unchanged run's profile with the advice.

``--json`` prints one object: ``profile`` (path, or null), ``script`` (with a script,
else null), ``baseline_peak_bytes``, ``measured_baseline_peak_bytes`` (with ``--simulate``),
``budget`` (text or null), ``usable_bytes`` (or null), ``recommendations`` (rows with the
columns of ``Advice.table()``, each with ``predicted_by``: "fake run", "analytic" or
"measured simulation") and ``plan`` (or null); with fake runs, ``fake_baseline_peak_bytes``
(the unchanged step's fake peak) and ``fake_prediction_s`` (the time they took), or
``fake_prediction_stored`` (from the profile file); ``fake_prediction_skipped`` says why none
ran.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from memprof.advisor import Advice, advise
from memprof.advisor.core import Change
from memprof.advisor.workload import Measurement
from memprof.commands.common import (
    CommandError,
    echo_json,
    examples,
    handle_errors,
    json_option,
    output_path,
    size,
    table,
)
from memprof.errors import BudgetError
from memprof.gpus import lookup
from memprof.profile import load

if TYPE_CHECKING:
    from memprof.advisor.capture import ScriptCapture

#: Optimizer steps measured per run with --simulate.
DEFAULT_SIMULATE_STEPS = 3


class _AdviseCommand(click.Command):
    """With ``--simulate``, everything after the script belongs to the script (as with
    ``memprof run``); without it, options may follow PROFILE.json."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.allow_interspersed_args = not (
            "--simulate" in args or "-m" in args or _names_a_script(args)
        )
        return super().parse_args(ctx, args)


#: Options of ``memprof advise`` that take a value (the next word is not the target).
_VALUE_OPTIONS = frozenset({"--steps", "-o", "--output", "--budget", "--gpu", "--top"})
_SCRIPT_SUFFIXES = (".py", ".pyw")


def _names_a_script(args: list[str]) -> bool:
    """Whether the first word that is no option (nor an option's value) is a Python script."""
    skip = False
    for word in args:
        if skip:
            skip = False
        elif word in _VALUE_OPTIONS:
            skip = True
        elif not word.startswith("-"):
            return Path(word).suffix.lower() in _SCRIPT_SUFFIXES
    return False


@click.command(
    cls=_AdviseCommand,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=examples(
        "memprof advise reports/train.json --budget 24GiB",
        'memprof advise reports/train.json --gpu "A100 40GB" --json',
        "memprof advise examples/train_mlp.py --batch 32",
        "memprof advise --simulate examples/train_mlp.py --batch 32",
        "memprof advise --simulate --steps 2 --budget 8GiB -o reports/mlp.json "
        "examples/train_mlp.py",
    ),
    short_help="Rank memory-saving techniques, simulate them, plan for a budget.",
)
@click.option("--simulate", is_flag=True,
              help="Re-run SCRIPT.py once per technique and measure it (options go before "
              "the script; what follows it is the script's).")
@click.option("-m", "as_module", is_flag=True,
              help="Run a module as `python -m` would (instead of SCRIPT.py).")
@click.option("--steps", type=click.IntRange(min=1), default=DEFAULT_SIMULATE_STEPS,
              show_default=True, help="With a script: optimizer steps measured per run.")
@click.option("--no-fake-predictions", "no_fake", is_flag=True,
              help="With a script: predict from its profile alone (analytic), not by fake "
              "runs of its model.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="With a script: write its unchanged run's profile, with the advice, to "
              "PATH (memprof advise PATH and memprof report show that advice).")
@click.option("-f", "--force", is_flag=True, help="Replace an existing --output file.")
@click.option("--budget", default=None, help='Memory budget: "24GiB", "80GB" or a GPU name.')
@click.option("--gpu", default=None, help='GPU to fit, from the catalog ("A100 40GB", "T4").')
@click.option("--top", default=12, show_default=True,
              help="Rows shown in the text table (0 or --all: every row).")
@click.option("--all", "show_all", is_flag=True, help="Show every row of the text table.")
@click.option("--save", is_flag=True, help="Store the advice in PROFILE.json (for the report).")
@json_option(keys="profile, script, baseline_peak_bytes, measured_baseline_peak_bytes, budget, "
             "usable_bytes, recommendations, plan")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="PROFILE.json | SCRIPT.py [ARGS]")
@handle_errors
def command(
    simulate: bool,
    as_module: bool,
    steps: int,
    no_fake: bool,
    output: Path | None,
    force: bool,
    budget: str | None,
    gpu: str | None,
    top: int,
    show_all: bool,
    save: bool,
    as_json: bool,
    args: tuple[str, ...],
) -> None:
    """Predict what each technique (mixed precision, quantization, pruning, checkpointing,
    optimizer, sharding) does to the step's peak, and with a budget, the cheapest combination
    that fits. Given SCRIPT.py, the script runs unchanged to its first optimizer steps and
    each technique is predicted by a fake run of its model (nothing allocated); with
    --simulate it then runs once per technique with it applied, and the measured peaks sit
    next to the predictions. Given PROFILE.json, the predictions it carries (from a fake run)
    are shown, the others are computed from the profile alone."""
    if budget is not None and gpu is not None:
        raise BudgetError("give --budget or --gpu, not both")
    if gpu is not None:
        lookup(gpu)  # an unknown name suggests close ones
    target_budget = gpu if gpu is not None else budget
    if show_all:
        top = 0  # no limit
    if simulate or as_module or (args and Path(args[0]).suffix.lower() in _SCRIPT_SUFFIXES):
        if save:
            raise CommandError("--save stores advice in a profile file: with a script use -o")
        _advise_script(args, as_module, steps, output, force, target_budget, top, as_json,
                       simulate=simulate, fake=not no_fake)
        return
    for flag, given in (("-o/--output", output is not None),
                        ("--no-fake-predictions", no_fake)):
        if given:
            raise CommandError(f"{flag} goes with a script (SCRIPT.py or -m MODULE)")
    if len(args) != 1:
        raise CommandError(
            "give one PROFILE.json (or --simulate SCRIPT.py [ARGS]... to measure a script)"
            if not args else f"unexpected arguments after PROFILE.json: {' '.join(args[1:])}"
        )
    profile_path = Path(args[0])
    profile = load(profile_path)
    advice = advise(profile, budget=target_budget)
    if save:
        profile.advice = advice.to_dict()
        profile.save(profile_path, overwrite=True)
    _show(advice, as_json=as_json, top=top, profile=str(profile_path), script=None)


def _advise_script(
    args: tuple[str, ...],
    as_module: bool,
    steps: int,
    output: Path | None,
    force: bool,
    budget: str | None,
    top: int,
    as_json: bool,
    *,
    simulate: bool,
    fake: bool,
) -> None:
    """Run the script unchanged for ``steps`` optimizer steps, predict every change by a fake
    run of what it captured (``fake``), and with ``simulate`` measure each change."""
    from memprof.advisor.capture import ScriptCapture, predict
    from memprof.advisor.script import ScriptFailed, ScriptSimulator
    from memprof.commands.budget import parse_budget
    from memprof.commands.script_runner import resolve_target, run_target, script_environment

    target = resolve_target(args, as_module=as_module)
    if output is not None:
        output_path(output, force=force, what="profile")
    parse_budget(budget)

    def run_script() -> None:
        with script_environment(target):
            run_target(target)

    simulator = _WithProgress(ScriptSimulator(run_script, steps=steps), steps)
    capture = ScriptCapture() if fake else None
    try:
        reference = simulator.reference(capture)
    except ScriptFailed as exc:
        tail = simulator.inner.output_log.strip().splitlines()[-15:]
        if tail:
            click.echo("\n".join(tail), err=True)
        raise CommandError(f"{target.name} failed in its unchanged run: {exc}") from None
    advice = predict(reference.profile, capture, budget=budget,
                     simulator=simulator if simulate else None, reference=reference)
    if output is not None:
        profile = reference.profile
        profile.advice = advice.to_dict()
        profile.meta["advised_script"] = {"target": target.name, "argv": target.argv,
                                          "steps": steps, "simulated": simulate}
        profile.save(output, overwrite=force)
    _show(advice, as_json=as_json, top=top, profile=None if output is None else str(output),
          script=target.name)


class _WithProgress:
    """A simulator that shows a progress bar (on stderr) per run, counting optimizer steps."""

    def __init__(self, inner: Any, steps: int) -> None:
        self.inner = inner
        self.steps = steps

    def reference(self, capture: ScriptCapture | None = None) -> Measurement:
        return self._with_bar(
            "unchanged", lambda tick: self.inner.reference(progress=tick, capture=capture)
        )

    def measure(self, changes: list[Change], reference: Measurement) -> Measurement | str:
        label = " + ".join(f"{c.technique} ({_options(c.options)})" for c in changes)
        return self._with_bar(label, lambda tick: self.inner.measure(changes, reference, tick))

    def _with_bar(self, label: str, work: Callable[[Callable[[int], None]], Any]) -> Any:
        with click.progressbar(length=self.steps, label=f"{label:<42.42}", file=sys.stderr,
                               show_pos=True) as bar:
            done = 0

            def tick(steps_done: int) -> None:
                nonlocal done
                bar.update(steps_done - done)
                done = steps_done

            result = work(tick)
            bar.update(self.steps - done)
        return result


def _show(advice: Advice, *, as_json: bool, top: int, profile: str | None,
          script: str | None) -> None:
    data = advice.to_dict()
    if as_json:
        echo_json(
            {
                "profile": profile,
                "script": script,
                "baseline_peak_bytes": advice.baseline_peak_bytes,
                "measured_baseline_peak_bytes": data.get("measured_baseline_peak_bytes"),
                "budget": data.get("budget"),
                "usable_bytes": data.get("usable_bytes"),
                "recommendations": data["recommendations"],
                "plan": data["plan"],
                **{k: data[k] for k in _PREDICTION_KEYS if k in data},
            }
        )
        return
    click.echo(render(data, top=top))
    from memprof.commands.run import prediction_note

    click.echo(prediction_note(data))
    if profile is not None and script is not None:
        click.echo(f"\nprofile: {profile} (memprof report {profile})")


def render(data: dict[str, Any], *, top: int) -> str:
    """The advice as text: first whether the step fits its budget (and with how much room),
    then the one recommendation, then a table of the applicable rows (those that save memory
    first: what a single GPU can do, cheapest to the training first, then what needs more
    GPUs; with the measured columns when simulated), the
    reasons for the others, and the plan. ``top`` cuts the table (0: every row), and the
    text says how many rows were left out and how to see them."""
    from memprof.report import advice as advice_view

    lines = [f"baseline step peak {size(data['baseline_peak_bytes'])}"]
    remeasured = data.get("measured_baseline_peak_bytes")
    if remeasured is not None and remeasured != data["baseline_peak_bytes"]:
        lines[0] += f" (measured again: {size(remeasured)})"
    fits = advice_view.fit(data)
    if fits is not None:
        lines.append(fits.text)
    recommendation = advice_view.recommend(data)
    if recommendation is not None:
        lead = "to save more" if fits is not None else "recommended"
        lines.append(f"{lead}: {recommendation.text}")
    lines.append("")
    applicable = [r for r in advice_view.display_order(data["recommendations"])
                  if r.get("applicable")]
    rows = applicable[:top] if top > 0 else applicable
    if data.get("simulated"):
        headers = ["technique", "options", "predicted", "measured", "error", "saving",
                   "loss drift", "time", "caveats"]
        body = [
            [
                r["technique"],
                _options(r.get("options") or {}),
                size(r.get("predicted_peak_bytes")),
                size(r.get("measured_peak_bytes")),
                _pct(r.get("error_pct"), sign=False),
                _pct(r.get("saving_pct")),
                _drift(r.get("quality")),
                f"{r['step_time_ratio']:.2f}x" if r.get("step_time_ratio") else "-",
                _clip(r.get("caveats"), 50),
                r.get("cost") or "-",
            ]
            for r in rows
        ]
        headers.append("cost to training")
        align = "llrrrrrrll"
    else:
        headers = ["technique", "options", "predicted peak", "saving", "caveats"]
        body = [
            [
                r["technique"],
                _options(r.get("options") or {}),
                size(r.get("predicted_peak_bytes")),
                _pct(r.get("saving_pct")),
                _clip(r.get("caveats"), 60),
                r.get("cost") or "-",
            ]
            for r in rows
        ]
        headers.append("cost to training")
        align = "llrrll"
    lines.append(table(headers, body, align=align))
    left_out = len(applicable) - len(rows)
    if left_out:
        lines.append(f"... {left_out} more row(s) not shown (of {len(applicable)}): --all shows "
                     "them all, --top N the first N, --json every column")
    skipped = [r for r in data["recommendations"] if not r.get("applicable")]
    if skipped:
        lines.append("")
        reasons = sorted({f"{r['technique']}: {r.get('reason')}" for r in skipped})
        lines.extend(f"not applicable: {text}" for text in reasons)
    plan = data.get("plan")
    if plan:
        lines += ["", f"budget {plan['budget']}", f"plan: {plan['explanation']}"]
        if plan.get("measured_peak_bytes") is not None:
            verdict = "fits" if plan.get("measured_fits") else "does NOT fit"
            lines.append(f"plan measured: {size(plan['measured_peak_bytes'])}, {verdict}")
        elif plan.get("simulation"):
            lines.append(f"plan: {plan['simulation']}")
    return "\n".join(lines)


def _clip(text: str | None, limit: int) -> str:
    """A caveat cut to ``limit`` characters, marked when cut (--json has the whole text)."""
    text = text or ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


#: How the predictions were made (see :func:`predict`), in ``--json`` when known.
_PREDICTION_KEYS = ("fake_baseline_peak_bytes", "fake_prediction_s", "fake_prediction_skipped",
                    "fake_prediction_stored")


def _pct(value: float | None, *, sign: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}%" if sign else f"{value:.1f}%"


def _drift(quality: dict[str, Any] | None) -> str:
    value = (quality or {}).get("loss_drift")
    return "-" if value is None else f"{100 * value:.2g}%"


def _options(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items() if k != "modules")
