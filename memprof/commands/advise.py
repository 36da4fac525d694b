"""``memprof advise PROFILE.json``: what to change so the step fits, predicted from a profile.

``--budget`` takes a size ("24GiB", "80GB") or a GPU name ("A100 40GB"); ``--gpu`` takes a
GPU name only. The CUDA context and a fragmentation reserve are kept off the budget (see
:mod:`memprof.gpus`). ``--save`` stores the advice in the profile file (the report shows it).
Predictions only: simulation needs the model, so it runs through the API
(``memprof.advisor.advise(profile, workload=Workload(...))``).

``--json`` prints one object: ``profile`` (path), ``baseline_peak_bytes``, ``budget`` (text or
null), ``usable_bytes`` (or null), ``recommendations`` (rows with the columns of
``Advice.table()``) and ``plan`` (or null).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from memprof.advisor import advise
from memprof.commands.common import echo_json, examples, handle_errors, json_option, size, table
from memprof.errors import BudgetError
from memprof.gpus import lookup
from memprof.profile import load


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=examples(
        "memprof advise reports/train.json --budget 24GiB",
        'memprof advise reports/train.json --gpu "A100 40GB" --json',
    ),
    short_help="Rank memory-saving techniques and plan for a budget.",
)
@click.argument("profile_path", metavar="PROFILE.json", type=click.Path(path_type=Path))
@click.option("--budget", default=None, help='Memory budget: "24GiB", "80GB" or a GPU name.')
@click.option("--gpu", default=None, help='GPU to fit, from the catalog ("A100 40GB", "T4").')
@click.option("--top", default=12, show_default=True, help="Rows shown in the text table.")
@click.option("--save", is_flag=True, help="Store the advice in PROFILE.json (for the report).")
@json_option(keys="profile, baseline_peak_bytes, budget, usable_bytes, recommendations, plan")
@handle_errors
def command(
    profile_path: Path, budget: str | None, gpu: str | None, top: int, save: bool, as_json: bool
) -> None:
    """Predict what each technique (mixed precision, quantization, pruning, checkpointing,
    optimizer, sharding) does to the step's peak in PROFILE.json, and with a budget, the
    cheapest combination that fits."""
    if budget is not None and gpu is not None:
        raise BudgetError("give --budget or --gpu, not both")
    if gpu is not None:
        lookup(gpu)  # an unknown name suggests close ones
    profile = load(profile_path)
    advice = advise(profile, budget=gpu if gpu is not None else budget)
    if save:
        profile.advice = advice.to_dict()
        profile.save(profile_path, overwrite=True)
    data = advice.to_dict()
    if as_json:
        echo_json(
            {
                "profile": str(profile_path),
                "baseline_peak_bytes": advice.baseline_peak_bytes,
                "budget": data.get("budget"),
                "usable_bytes": data.get("usable_bytes"),
                "recommendations": data["recommendations"],
                "plan": data["plan"],
            }
        )
        return
    click.echo(render(data, top=top))


def render(data: dict[str, Any], *, top: int) -> str:
    lines = [f"baseline step peak {size(data['baseline_peak_bytes'])}", ""]
    rows = [r for r in data["recommendations"] if r.get("applicable")][:top]
    lines.append(
        table(
            ["technique", "options", "predicted peak", "saving", "caveats"],
            [
                [
                    r["technique"],
                    _options(r.get("options") or {}),
                    size(r.get("predicted_peak_bytes")),
                    f"{r['saving_pct']:+.1f}%" if r.get("saving_pct") is not None else "-",
                    (r.get("caveats") or "")[:60],
                ]
                for r in rows
            ],
            align="llrrl",
        )
    )
    skipped = [r for r in data["recommendations"] if not r.get("applicable")]
    if skipped:
        lines.append("")
        reasons = sorted({f"{r['technique']}: {r.get('reason')}" for r in skipped})
        lines.extend(f"not applicable: {text}" for text in reasons)
    plan = data.get("plan")
    if plan:
        lines += ["", f"budget {plan['budget']}", f"plan: {plan['explanation']}"]
    return "\n".join(lines)


def _options(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items() if k != "modules")
