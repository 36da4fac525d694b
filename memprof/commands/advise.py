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

from pathlib import Path

import click

from memprof.advisor import advise
from memprof.commands.advise_script import advise_script
from memprof.commands.advise_text import render as render  # tests read the text through it
from memprof.commands.advise_text import show
from memprof.commands.common import (
    CommandError,
    examples,
    handle_errors,
    json_option,
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
        advise_script(args, as_module, steps, output, force, target_budget, top, as_json,
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
    show(advice, as_json=as_json, top=top, profile=str(profile_path), script=None)
