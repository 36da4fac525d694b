"""``memprof advise``'s output: the advice as text (:func:`render`) or as ``--json``."""

from __future__ import annotations

from typing import Any

import click

from memprof.advisor import Advice
from memprof.commands.common import echo_json, size, table


def show(advice: Advice, *, as_json: bool, top: int, profile: str | None,
         script: str | None) -> None:
    """Print the advice: the text of :func:`render` and how it was predicted, or ``--json``."""
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
    from memprof.report import advice_view

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
                options_text(r.get("options") or {}),
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
                options_text(r.get("options") or {}),
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


def options_text(options: dict[str, Any]) -> str:
    """A change's options as ``key=value`` text (the modules it touches left out)."""
    return ", ".join(f"{k}={v}" for k, v in options.items() if k != "modules")
