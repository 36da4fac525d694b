"""``memprof advise SCRIPT.py``: run the script unchanged, predict each change from what it
captured, and with ``--simulate`` measure each change by running the script again (a progress
bar per run)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from memprof.advisor.core import Change
from memprof.advisor.workload import Measurement
from memprof.commands.advise_text import options_text, show
from memprof.commands.common import CommandError, output_path

if TYPE_CHECKING:
    from memprof.advisor.capture import ScriptCapture


def advise_script(
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
    show(advice, as_json=as_json, top=top, profile=None if output is None else str(output),
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
        label = " + ".join(f"{c.technique} ({options_text(c.options)})" for c in changes)
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
