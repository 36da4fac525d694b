"""How close memprof's predictions come to the real thing, on every model of the zoo.

For each zoo model (:mod:`benchmarks.zoo`): profile the baseline, run ``memprof.advise`` with
the workload (every applicable technique is applied to a copy and measured), and print per
row the predicted peak, the simulated (measured) peak, the error, what the prediction came
from (``predicted_by``: "fake run", "analytic" or "measured simulation"; "analytic" when the
advisor does not say) and whether the sign of the saving was right. Then per technique the
median and worst error, per prediction kind, and the count within the targets (3% for a
prediction by fake run, 10% for the analytic model that reads only a profile file).

Per model also ``memprof.estimate`` (fake tensors, ``device="cpu"``) against the same steps
run for real on the CPU (target 1%).

Every error is shown beside a peer's in the same run: accelerate's ``estimate-memory`` rule
(the weights' bytes in the dtype the change leaves them in, times 4 for Adam training), and
the ratio of memprof's error to the peer's.

Run from the repository root::

    python benchmarks/advisor_accuracy.py                      # the whole zoo
    python benchmarks/advisor_accuracy.py --quick              # 3 models, no sharding
    python benchmarks/advisor_accuracy.py --models gpt2,t5 --techniques mixed_precision
    python benchmarks/advisor_accuracy.py --json reports/accuracy.json
    python benchmarks/advisor_accuracy.py --estimate-only      # estimate vs real run only
    python benchmarks/advisor_accuracy.py --estimate-only --estimate-mixed fp16
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import memprof
from benchmarks.zoo import ZOO, ZooModel, by_name
from memprof.advisor import Workload
from memprof.advisor.workload import Measurement, baseline, seeded
from memprof.units import format_bytes

ANALYTIC = "analytic"
MEASURED = "measured simulation"
#: Targets in percent per prediction kind (the issue's): fake runs 3% (median under 1%), the
#: analytic model 10% (an aim; its worst is printed), estimate vs a real run 1%.
TARGET = {"fake run": 3.0, ANALYTIC: 10.0}
ESTIMATE_TARGET = 1.0
MIXED_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
QUICK_MODELS = ("gpt2", "resnet-bn", "lstm-tied")
#: Simulated with forked ranks: slow, skipped by --quick.
SLOW_TECHNIQUES = ("sharding",)


# ------------------------------------------------------------------ the peer
def accelerate_rule(model: nn.Module, options: dict[str, Any]) -> int:
    """accelerate estimate-memory: weights in the target dtype x 4 for Adam training."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if options.get("mode") == "pure":
        weights //= 2
    elif options.get("weights") == "int8":
        weights //= 4
    elif options.get("weights") == "int4":
        weights //= 8
    return 4 * weights


def error_pct(predicted: int, actual: int) -> float:
    return 100.0 * abs(predicted - actual) / actual if actual else 0.0


def ratio(ours: float, peer: float) -> float | None:
    """memprof's error over the peer's (lower is better); None when the peer is exact."""
    return ours / peer if peer else None


def sign_right(base: int, predicted: int, measured_base: int, measured: int,
               *, tolerance_pct: float = 0.5) -> bool:
    """True when the prediction says save / cost / no change as the measurement does (a change
    under ``tolerance_pct`` of the baseline counts as no change)."""

    def sign(before: int, after: int) -> int:
        change = 100.0 * (before - after) / before if before else 0.0
        return 0 if abs(change) < tolerance_pct else (1 if change > 0 else -1)

    return sign(base, predicted) == sign(measured_base, measured)


# ------------------------------------------------------------------ advise rows
def _options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items() if k != "modules")


class _SelectiveSimulator:
    """The advisor's own WorkloadSimulator, measuring only the chosen techniques."""

    def __init__(self, workload: Workload, techniques: set[str]) -> None:
        from memprof.advisor import WorkloadSimulator

        self.inner = WorkloadSimulator(workload)
        self.techniques = techniques

    def reference(self) -> Measurement:
        return self.inner.reference()

    def measure(self, changes: list[Any], reference: Measurement) -> Measurement | str:
        if any(c.technique not in self.techniques for c in changes):
            return "not measured (technique not selected)"
        return self.inner.measure(changes, reference)


def advise_rows(
    entry: ZooModel, workload: Workload, ref: Measurement, *, techniques: set[str] | None,
    prediction: str | None,
) -> list[dict[str, Any]]:
    """One record per (row, prediction kind) that has a measured peak."""
    kwargs: dict[str, Any] = {}
    if prediction is not None and "prediction" in inspect.signature(memprof.advise).parameters:
        kwargs["prediction"] = prediction
    # the model is at hand: the analytic rows may measure this CPU's 16-bit layer scratch
    # (advice from a profile alone runs no kernel)
    from memprof.advisor import cpu_kernels

    measuring = getattr(cpu_kernels, "measuring", contextlib.nullcontext)
    with measuring():
        return _advise_rows(entry, workload, ref, techniques=techniques, kwargs=kwargs)


def _advise_rows(
    entry: ZooModel, workload: Workload, ref: Measurement, *, techniques: set[str] | None,
    kwargs: dict[str, Any],
) -> list[dict[str, Any]]:
    if techniques is None:
        advice = memprof.advise(ref.profile, workload=workload, reference=ref, **kwargs)
    else:
        from memprof.advisor import batch_rows

        if kwargs.get("prediction") != ANALYTIC:
            kwargs["fake_model"] = workload  # the model is at hand: predict by fake runs
        advice = memprof.advise(
            ref.profile, simulator=_SelectiveSimulator(workload, techniques), reference=ref,
            **kwargs,
        )
        if "batch" in techniques:
            advice.rows.extend(
                row.to_dict() for row in
                batch_rows.advice_rows(workload, ref, advice.baseline_peak_bytes, None)
            )
    base = advice.baseline_peak_bytes
    measured_base = advice.extra.get("measured_baseline_peak_bytes", ref.peak_bytes)
    out: list[dict[str, Any]] = []
    for row in advice.rows:
        measured = row.get("measured_peak_bytes")
        if techniques is not None and row["technique"] not in techniques:
            continue
        if row.get("applicable") and measured is None and row.get("caveats"):
            # applicable but its simulation failed: say so rather than drop it silently
            print(f"{entry.name}: {row['technique']} {_options_text(row['options'])}: not "
                  f"measured ({str(row['caveats'])[-160:]})", flush=True)
        if not row.get("applicable") or measured is None:
            continue
        kinds: list[tuple[str, int]] = []
        predicted = row.get("predicted_peak_bytes")
        kind = row.get("predicted_by") or ANALYTIC
        if predicted is not None:
            kinds.append((kind, int(predicted)))
        analytic = row.get("analytic_peak_bytes")
        if kind != ANALYTIC and analytic is not None:
            kinds.append((ANALYTIC, int(analytic)))
        peer = accelerate_rule(workload.model, row["options"])
        for how, value in kinds:
            ours, theirs = error_pct(value, measured), error_pct(peer, measured)
            out.append({
                "model": entry.name,
                "family": entry.family,
                "technique": row["technique"],
                "options": _options_text(row["options"]),
                "predicted_by": how,
                "baseline_peak_bytes": base,
                "predicted_peak_bytes": value,
                "measured_baseline_peak_bytes": measured_base,
                "measured_peak_bytes": int(measured),
                "error_pct": ours,
                "sign_right": sign_right(base, value, measured_base, int(measured)),
                "peer_peak_bytes": peer,
                "peer_error_pct": theirs,
                "error_ratio_to_peer": ratio(ours, theirs),
            })
    return out


# ------------------------------------------------------------------ estimate vs a real run
class _StepAsModel(nn.Module):
    """The workload's model whose forward computes the workload's loss, so that ``estimate``
    and the real run below take the same step (``{"loss": ...}`` is what estimate reads)."""

    def __init__(self, workload: Workload) -> None:
        super().__init__()
        self.inner = workload.model
        self.workload = workload

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        batch: Any = kwargs if kwargs else (args if len(args) > 1 else args[0])
        return {"loss": self.workload.loss(self.inner, batch)}


def _wrapped(entry: ZooModel) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        w = entry.build()
        w.optimizer = None  # estimate builds its own (AdamW, lr 1e-4)
        return _StepAsModel(w)

    return factory


def real_peak(entry: ZooModel, batch: Any, *, steps: int = 2,
              mixed_precision: str | None = None) -> int:
    """The peak of ``steps`` real CPU steps shaped as estimate's (forward, under CPU autocast
    with ``mixed_precision``; backward, AdamW step, zero_grad(set_to_none=True)), under
    memprof.profile."""
    model = _wrapped(entry)()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    autocast: Any = (torch.autocast("cpu", dtype=MIXED_DTYPES[mixed_precision])
                     if mixed_precision else contextlib.nullcontext())
    with seeded(), memprof.profile(model, opt) as prof:
        for _ in range(steps):
            model.train()
            with autocast:
                out = model(**batch) if isinstance(batch, dict) else (
                    model(*batch) if isinstance(batch, tuple | list) else model(batch))
            loss = out["loss"]
            del out
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
            prof.step()
    return prof.profile.peak().total_bytes


def estimate_row(entry: ZooModel, workload: Workload,
                 mixed_precision: str | None = None) -> dict[str, Any]:
    batch = workload.batch
    with seeded():
        real = real_peak(entry, batch, mixed_precision=mixed_precision)
    try:
        with seeded():
            profile = memprof.estimate(
                _wrapped(entry), batch=batch, optimizer="adamw", dtype="fp32", device="cpu",
                steps=2, mixed_precision=mixed_precision,
            )
        predicted: int | None = profile.peak().total_bytes
        failure = None
    except memprof.MemprofError as exc:
        predicted, failure = None, str(exc)
    peer = accelerate_rule(workload.model, {})
    ours = error_pct(predicted, real) if predicted is not None else None
    theirs = error_pct(peer, real)
    return {
        "model": entry.name,
        "family": entry.family,
        "mixed_precision": mixed_precision,
        "estimate_peak_bytes": predicted,
        "real_peak_bytes": real,
        "error_pct": ours,
        "signed_error_pct": 100.0 * (predicted - real) / real if predicted is not None else None,
        "peer_peak_bytes": peer,
        "peer_error_pct": theirs,
        "error_ratio_to_peer": ratio(ours, theirs) if ours is not None else None,
        "failure": failure,
    }


# ------------------------------------------------------------------ summaries and printing
def technique_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (technique, prediction kind): count, median and worst error, within target."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["technique"], r["predicted_by"]), []).append(r)
    out = []
    for (technique, how), members in sorted(groups.items()):
        errors = [r["error_pct"] for r in members]
        peers = [r["peer_error_pct"] for r in members]
        worst = max(members, key=lambda r: r["error_pct"])
        target = TARGET.get(how)
        out.append({
            "technique": technique,
            "predicted_by": how,
            "rows": len(members),
            "median_error_pct": statistics.median(errors),
            "worst_error_pct": worst["error_pct"],
            "worst_row": f"{worst['model']} {worst['options']}",
            "target_pct": target,
            "within_target": sum(e <= target for e in errors) if target is not None else None,
            "sign_right": sum(r["sign_right"] for r in members),
            "peer_median_error_pct": statistics.median(peers),
            "median_ratio_to_peer": ratio(statistics.median(errors), statistics.median(peers)),
        })
    return out


#: The issue's targets for fake-run predictions vs simulation, per technique.
FAKE_MEDIAN_TARGET = 1.0
FAKE_WORST_TARGET = 3.0


def side_by_side(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per technique, the fake-run and the analytic predictions of the same simulated rows:
    median and worst error and signs right of each, and whether the fake runs meet the
    targets (median under 1%, worst within 3%, every sign right)."""
    by_technique: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        by_technique.setdefault(r["technique"], {}).setdefault(r["predicted_by"], []).append(r)
    out = []
    for technique, kinds in sorted(by_technique.items()):
        line: dict[str, Any] = {"technique": technique}
        for kind, key in (("fake run", "fake"), (ANALYTIC, "analytic")):
            members = kinds.get(kind, [])
            errors = [r["error_pct"] for r in members]
            worst = max(members, key=lambda r: r["error_pct"]) if members else None
            line[f"{key}_rows"] = len(members)
            line[f"{key}_median_pct"] = statistics.median(errors) if errors else None
            line[f"{key}_worst_pct"] = worst["error_pct"] if worst else None
            line[f"{key}_worst_row"] = f"{worst['model']} {worst['options']}" if worst else ""
            line[f"{key}_sign_right"] = sum(r["sign_right"] for r in members)
        line["fake_meets_targets"] = (
            None if not line["fake_rows"] else
            line["fake_median_pct"] < FAKE_MEDIAN_TARGET
            and line["fake_worst_pct"] <= FAKE_WORST_TARGET
            and line["fake_sign_right"] == line["fake_rows"])
        out.append(line)
    return out


def print_side_by_side(lines: list[dict[str, Any]]) -> None:
    print_table(
        ["technique", "fake rows", "fake median %", "fake worst %", "fake signs",
         "analytic median %", "analytic worst %", "analytic signs", "targets"],
        [15, 9, 13, 12, 10, 17, 16, 14, 7],
        [[s["technique"], str(s["fake_rows"]), _fmt(s["fake_median_pct"], ".2f"),
          _fmt(s["fake_worst_pct"], ".2f"), f"{s['fake_sign_right']}/{s['fake_rows']}",
          _fmt(s["analytic_median_pct"], ".2f"), _fmt(s["analytic_worst_pct"], ".2f"),
          f"{s['analytic_sign_right']}/{s['analytic_rows']}",
          {True: "met", False: "MISSED", None: "-"}[s["fake_meets_targets"]]]
         for s in lines],
    )
    for s in lines:
        if s["fake_meets_targets"] is False:
            print(f"  {s['technique']}: fake-run worst {s['fake_worst_row']}")


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(header: list[str], widths: list[int], lines: list[list[str]]) -> None:
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for cells in lines:
        print("  ".join(c[:w].ljust(w) for c, w in zip(cells, widths, strict=True)))


def print_rows(rows: list[dict[str, Any]]) -> None:
    print_table(
        ["model", "technique", "options", "by", "predicted", "simulated", "err %", "sign",
         "peer err %", "ratio"],
        [16, 15, 44, 9, 10, 10, 6, 5, 10, 6],
        [[r["model"], r["technique"], r["options"], r["predicted_by"],
          format_bytes(r["predicted_peak_bytes"]), format_bytes(r["measured_peak_bytes"]),
          _fmt(r["error_pct"]), "ok" if r["sign_right"] else "WRONG",
          _fmt(r["peer_error_pct"]), _fmt(r["error_ratio_to_peer"], ".2f")] for r in rows],
    )


def print_summary(summary: list[dict[str, Any]]) -> None:
    print_table(
        ["technique", "by", "rows", "median %", "worst %", "worst row", "within", "sign ok",
         "peer median %", "ratio"],
        [15, 9, 4, 8, 7, 40, 9, 7, 13, 6],
        [[s["technique"], s["predicted_by"], str(s["rows"]), _fmt(s["median_error_pct"]),
          _fmt(s["worst_error_pct"]), s["worst_row"],
          "-" if s["target_pct"] is None
          else f"{s['within_target']}/{s['rows']}@{s['target_pct']:.0f}%",
          f"{s['sign_right']}/{s['rows']}", _fmt(s["peer_median_error_pct"]),
          _fmt(s["median_ratio_to_peer"], ".2f")] for s in summary],
    )


def print_estimates(rows: list[dict[str, Any]]) -> None:
    print_table(
        ["model", "estimate", "real CPU", "err %", "signed %", "peer err %", "ratio", "note"],
        [16, 10, 10, 6, 8, 10, 6, 50],
        [[r["model"],
          format_bytes(r["estimate_peak_bytes"]) if r["estimate_peak_bytes"] is not None
          else "failed",
          format_bytes(r["real_peak_bytes"]), _fmt(r["error_pct"]), _fmt(r["signed_error_pct"]),
          _fmt(r["peer_error_pct"]), _fmt(r["error_ratio_to_peer"], ".2f"),
          r["failure"] or ""] for r in rows],
    )
    done = [r for r in rows if r["error_pct"] is not None]
    within = sum(r["error_pct"] <= ESTIMATE_TARGET for r in done)
    if done:
        print(f"estimate within {ESTIMATE_TARGET:.0f}%: {within}/{len(rows)}; median error "
              f"{statistics.median(r['error_pct'] for r in done):.1f}% (peer "
              f"{statistics.median(r['peer_error_pct'] for r in done):.1f}%)")


# ------------------------------------------------------------------ main
def _write_json(path: Path, rows: list[dict[str, Any]], estimates: list[dict[str, Any]],
                timings: dict[str, float], failures: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({
        "rows": rows, "techniques": technique_summary(rows), "estimates": estimates,
        "timings_s": timings, "failures": failures,
    }, indent=1))
    partial.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated zoo names (default: all)")
    parser.add_argument("--techniques", help="comma-separated techniques (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{', '.join(QUICK_MODELS)} only (unless --models), no sharding")
    parser.add_argument("--no-estimate", action="store_true", help="skip estimate vs real run")
    parser.add_argument("--estimate-only", action="store_true",
                        help="only estimate vs real run (no advise rows)")
    parser.add_argument("--estimate-mixed", choices=tuple(MIXED_DTYPES),
                        help="estimate (and run) the step's forward under CPU autocast")
    parser.add_argument("--prediction", choices=("analytic", "fake"),
                        help="ask advise for this prediction kind (when it supports it)")
    parser.add_argument("--json", type=Path, help="write the rows and summaries here")
    parser.add_argument("--force", action="store_true", help="overwrite --json's file")
    parser.add_argument("--summarize", nargs="+", type=Path, metavar="JSON",
                        help="run nothing: print the summaries of earlier --json files together "
                             "(a later file's rows of a model and technique replace earlier ones)")
    return parser.parse_args(argv)


def summarize(paths: list[Path]) -> int:
    """The tables of earlier runs' --json files, merged (runs split over processes). A later
    file's rows of a (model, technique), and its estimate of a model, replace an earlier
    file's: a rerun of some techniques after a fix supersedes them."""
    rows: list[dict[str, Any]] = []
    estimates: list[dict[str, Any]] = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"error: cannot read {path}: {exc}", file=sys.stderr)
            return 2
        new_rows = data.get("rows", [])
        rerun = {(r["model"], r["technique"]) for r in new_rows}
        rows = [r for r in rows if (r["model"], r["technique"]) not in rerun] + new_rows
        new_estimates = data.get("estimates", [])
        again = {e["model"] for e in new_estimates}
        estimates = [e for e in estimates if e["model"] not in again] + new_estimates
    print_summary(technique_summary(rows))
    print("\nFake run and analytic side by side (targets: fake-run median under "
          f"{FAKE_MEDIAN_TARGET:.0f}%, worst within {FAKE_WORST_TARGET:.0f}%, signs right):")
    print_side_by_side(side_by_side(rows))
    if estimates:
        print()
        print_estimates(estimates)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        return summarize(args.summarize)
    if args.json is not None and args.json.exists() and not args.force:
        print(f"error: {args.json} exists (pass --force to overwrite)", file=sys.stderr)
        return 2
    try:
        names = args.models.split(",") if args.models else (
            list(QUICK_MODELS) if args.quick else [e.name for e in ZOO])
        entries = [by_name(n.strip()) for n in names]
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    techniques: set[str] | None = None
    if args.techniques:
        techniques = {t.strip() for t in args.techniques.split(",")}
    elif args.quick:
        techniques = {"mixed_precision", "master_weights", "quantization", "pruning",
                      "checkpointing", "optimizer", "zero_grad", "batch"}

    rows: list[dict[str, Any]] = []
    estimates: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    failures: dict[str, str] = {}
    for entry in entries:
        if not entry.available():
            print(f"{entry.name}: skipped ({entry.needs} is not installed)")
            continue
        start = time.perf_counter()
        try:
            if not args.estimate_only:
                workload = entry.build()
                with seeded():
                    baseline(workload)  # warm-up: first-call allocations out of the measure
                    ref = baseline(workload)
                rows.extend(advise_rows(entry, workload, ref, techniques=techniques,
                                        prediction=args.prediction))
            if not args.no_estimate:
                estimates.append(estimate_row(entry, entry.build(), args.estimate_mixed))
        except Exception as exc:  # one broken model must not hide the others' figures
            failures[entry.name] = f"{type(exc).__name__}: {exc}"
            print(f"{entry.name}: FAILED {failures[entry.name]}", flush=True)
        timings[entry.name] = time.perf_counter() - start
        print(f"{entry.name}: {sum(r['model'] == entry.name for r in rows)} rows in "
              f"{timings[entry.name]:.1f}s", flush=True)
        if args.json is not None:  # after every model, so an interrupted run keeps its rows
            _write_json(args.json, rows, estimates, timings, failures)

    if rows:
        print()
        print_rows(rows)
        summary = technique_summary(rows)
        print("\nPer technique (error = |predicted - simulated| / simulated):")
        print_summary(summary)
        print("\nFake run and analytic side by side (targets: fake-run median under "
              f"{FAKE_MEDIAN_TARGET:.0f}%, worst within {FAKE_WORST_TARGET:.0f}%, signs right):")
        print_side_by_side(side_by_side(rows))
        wrong = [r for r in rows if not r["sign_right"]]
        print(f"\nsign of the saving right in {len(rows) - len(wrong)}/{len(rows)} rows"
              + ("; wrong: " + "; ".join(f"{r['model']} {r['technique']} {r['options']}"
                                         for r in wrong) if wrong else ""))
    if estimates:
        mixed = f", forward under {args.estimate_mixed} autocast" if args.estimate_mixed else ""
        print(f"\nestimate (fake tensors, device cpu{mixed}) vs the same steps run for real:")
        print_estimates(estimates)
    print(f"\ntotal {sum(timings.values()):.0f}s; per model: "
          + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    if args.json is not None:
        _write_json(args.json, rows, estimates, timings, failures)
        print(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
