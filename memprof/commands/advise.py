"""``memprof advise``: what to change so the step fits, predicted from a profile, or measured
by re-running a script with each change.

``memprof advise PROFILE.json`` predicts from a saved profile. ``memprof advise --simulate
SCRIPT.py [ARGS]...`` (or ``--simulate -m MODULE``) runs the unchanged script under memprof
(``--steps`` optimizer steps, then the rest of the script is skipped), predicts from that
profile, and runs the script again once per applicable change with the change applied to the
script's own model and optimizer (see :mod:`memprof.advisor.script`), with a progress bar per
run; the measured peak, the prediction's error, the output and loss drift and the step-time
ratio fill the table. Options go before the script; what follows it is the script's.

``--budget`` takes a size ("24GiB", "80GB") or a GPU name ("A100 40GB"); ``--gpu`` takes a
GPU name only. The CUDA context and a fragmentation reserve are kept off the budget (see
:mod:`memprof.gpus`). ``--save`` stores the advice in the profile file (the report shows it);
with ``--simulate``, ``--output`` writes the unchanged run's profile with the simulated advice.

``--json`` prints one object: ``profile`` (path, or null), ``script`` (with ``--simulate``,
else null), ``baseline_peak_bytes``, ``measured_baseline_peak_bytes`` (with ``--simulate``),
``budget`` (text or null), ``usable_bytes`` (or null), ``recommendations`` (rows with the
columns of ``Advice.table()``) and ``plan`` (or null).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

#: Optimizer steps measured per run with --simulate.
DEFAULT_SIMULATE_STEPS = 3


class _AdviseCommand(click.Command):
    """With ``--simulate``, everything after the script belongs to the script (as with
    ``memprof run``); without it, options may follow PROFILE.json."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.allow_interspersed_args = "--simulate" not in args
        return super().parse_args(ctx, args)


@click.command(
    cls=_AdviseCommand,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=examples(
        "memprof advise reports/train.json --budget 24GiB",
        'memprof advise reports/train.json --gpu "A100 40GB" --json',
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
              help="With --simulate: run a module as `python -m` would.")
@click.option("--steps", type=click.IntRange(min=1), default=DEFAULT_SIMULATE_STEPS,
              show_default=True, help="With --simulate: optimizer steps measured per run.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="With --simulate: write the unchanged run's profile, with the simulated "
              "advice, to PATH (for memprof report).")
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
    optimizer, sharding) does to the step's peak in PROFILE.json, and with a budget, the
    cheapest combination that fits. With --simulate, SCRIPT.py is run unchanged and then once
    per technique with it applied, and the measured peaks sit next to the predictions."""
    if budget is not None and gpu is not None:
        raise BudgetError("give --budget or --gpu, not both")
    if gpu is not None:
        lookup(gpu)  # an unknown name suggests close ones
    target_budget = gpu if gpu is not None else budget
    if show_all:
        top = 0  # no limit
    if simulate:
        if save:
            raise CommandError("--save stores advice in a profile file: with --simulate use -o")
        _simulate(args, as_module, steps, output, force, target_budget, top, as_json)
        return
    for flag, given in (("-m", as_module), ("-o/--output", output is not None)):
        if given:
            raise CommandError(f"{flag} goes with --simulate")
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


def _simulate(
    args: tuple[str, ...],
    as_module: bool,
    steps: int,
    output: Path | None,
    force: bool,
    budget: str | None,
    top: int,
    as_json: bool,
) -> None:
    from memprof.advisor.script import ScriptFailed, ScriptSimulator
    from memprof.commands.run import parse_budget, resolve_target, run_target, script_environment

    target = resolve_target(args, as_module=as_module)
    if output is not None:
        output_path(output, force=force, what="profile")
    parse_budget(budget)

    def run_script() -> None:
        with script_environment(target):
            run_target(target)

    simulator = _WithProgress(ScriptSimulator(run_script, steps=steps), steps)
    try:
        reference = simulator.reference()
    except ScriptFailed as exc:
        tail = simulator.inner.output_log.strip().splitlines()[-15:]
        if tail:
            click.echo("\n".join(tail), err=True)
        raise CommandError(f"{target.name} failed in its unchanged run: {exc}") from None
    advice = advise(reference.profile, budget=budget, simulator=simulator, reference=reference)
    if output is not None:
        profile = reference.profile
        profile.advice = advice.to_dict()
        profile.meta["simulated_script"] = {"target": target.name, "argv": target.argv,
                                            "steps": steps}
        profile.save(output, overwrite=force)
    _show(advice, as_json=as_json, top=top, profile=None if output is None else str(output),
          script=target.name)


class _WithProgress:
    """A simulator that shows a progress bar (on stderr) per run, counting optimizer steps."""

    def __init__(self, inner: Any, steps: int) -> None:
        self.inner = inner
        self.steps = steps

    def reference(self) -> Measurement:
        return self._with_bar("unchanged", lambda tick: self.inner.reference(progress=tick))

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
            }
        )
        return
    click.echo(render(data, top=top))
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


def _pct(value: float | None, *, sign: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}%" if sign else f"{value:.1f}%"


def _drift(quality: dict[str, Any] | None) -> str:
    value = (quality or {}).get("loss_drift")
    return "-" if value is None else f"{100 * value:.2g}%"


def _options(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items() if k != "modules")
