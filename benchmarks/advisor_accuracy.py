"""How close the advisor's predictions come to the measured step peak, per technique and model.

For each model (GPT-2 from a small config, a CNN, an MLP) and each technique that can run on
CPU: |predicted - measured| / measured of the step peak, where the prediction reads only the
baseline profile and the measurement applies the change to a copy and profiles it. Beside it,
accelerate's ``estimate-memory`` rule for the same run: the weights' bytes in the dtype the
change leaves them in, times 4 for Adam training (accelerate's "training = 4 x weights").

Run: ``python benchmarks/advisor_accuracy.py`` (under a minute on 2 CPU cores).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from workloads import cnn_workload, gpt2_workload, mlp_workload

from memprof.advisor import batch, changes_for, read_facts
from memprof.advisor.workload import Measurement, Workload, baseline, seeded, simulate
from memprof.units import format_bytes

TARGET = {
    "mixed_precision": 5.0,
    "checkpointing": 5.0,
    "optimizer": 5.0,
    "batch": 5.0,
    "quantization": 10.0,
    "pruning": 10.0,
}
#: Techniques measured and printed without a target (the issue sets none): sharding, simulated
#: with real ranks on this machine's CPU.
UNTARGETED = ("sharding",)


def gpt2_small_config() -> Workload:
    return gpt2_workload(layers=4, width=128, heads=4, vocab=512, seq=128, batch=8, lr=1e-4)


def accelerate_rule(model: nn.Module, options: dict[str, object]) -> int:
    """accelerate estimate-memory: weights in the target dtype x 4 for Adam training."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if options.get("mode") == "pure":
        weights //= 2
    elif options.get("weights") == "int8":
        weights //= 4
    elif options.get("weights") == "int4":
        weights //= 8
    return 4 * weights


def _row(model: str, technique: str, options: str, predicted: int, measured: int,
         accelerate: int) -> tuple[str, str, str, int, int, float, float]:
    return (model, technique, options, predicted, measured,
            100 * abs(predicted - measured) / measured, 100 * abs(accelerate - measured) / measured)


def _batch_predictions(workload: Workload, ref: Measurement) -> list[tuple[int, int, str]]:
    """(predicted, measured, options) for twice the workload's batch, from the fit at 1/2 and 1x."""
    size = batch.batch_size(workload.batch)
    if size is None or size < 2:
        return []
    half = size // 2
    with seeded():
        small = simulate(workload, [], ref, batch=batch.resize(workload.batch, half, size))
    fit = batch.BatchFit.from_profiles((half, small.profile), (size, ref.profile))
    with seeded():
        large = simulate(workload, [], ref, batch=batch.resize(workload.batch, 2 * size, size))
    return [(fit.peak(2 * size), large.peak_bytes, f"batch={2 * size} (fit at {half}, {size})")]


def _zero_grad_predictions(workload: Workload) -> list[tuple[int, int, str]]:
    """(predicted, measured, options) for ``zero_grad(set_to_none=True)``, predicted from a
    profile of the same loop keeping its gradients (``set_to_none=False``)."""
    kept = dataclasses.replace(workload, set_to_none=False)
    with seeded():
        ref = baseline(kept)
    change = next(c for c in changes_for(read_facts(ref.profile)) if c.group == "zero_grad")
    if not change.applicable or change.apply is None or change.predicted_peak is None:
        return []
    with seeded():
        m = simulate(kept, [change.apply], ref)
    options = ", ".join(f"{k}={v}" for k, v in change.options.items())
    return [(change.predicted_peak, m.peak_bytes, options)]


def main() -> None:
    rows = []
    for name, factory in (
        ("gpt2-small-config", gpt2_small_config),
        ("cnn", cnn_workload),
        ("mlp", mlp_workload),
    ):
        workload = factory()
        with seeded():
            baseline(workload)
            ref = baseline(workload)
        facts = read_facts(ref.profile)
        for change in changes_for(facts):
            if not change.applicable or change.apply is None or change.predicted_peak is None:
                continue
            with seeded():
                m = simulate(workload, [change.apply], ref)
            opts = ", ".join(f"{k}={v}" for k, v in change.options.items() if k != "modules")
            acc = accelerate_rule(workload.model, change.options)
            rows.append(_row(name, change.technique, opts, change.predicted_peak, m.peak_bytes,
                             acc))
        # Batch size: the advisor fits a line per phase through two measured batches (the
        # workload's and half of it) and predicts twice the batch, measured independently.
        for fitted in _batch_predictions(workload, ref):
            predicted, measured, opts = fitted
            acc = accelerate_rule(workload.model, {})  # weights only: the batch plays no part
            rows.append(_row(name, "batch", opts, predicted, measured, acc))
        for predicted, measured, opts in _zero_grad_predictions(workload):
            rows.append(_row(name, "optimizer", opts, predicted, measured,
                             accelerate_rule(workload.model, {})))
    header = (
        "model",
        "technique",
        "options",
        "predicted",
        "measured",
        "error %",
        "accelerate error %",
        "target %",
    )
    widths = [18, 16, 62, 11, 11, 8, 18, 8]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        cells = [
            r[0],
            r[1],
            r[2][:62],
            format_bytes(r[3]),
            format_bytes(r[4]),
            f"{r[5]:.1f}",
            f"{r[6]:.1f}",
            f"{TARGET[r[1]]:.0f}" if r[1] in TARGET else "-",
        ]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
    targeted = [r for r in rows if r[1] in TARGET]
    within = sum(1 for r in targeted if r[5] <= TARGET[r[1]])
    print(
        f"\n{within} of {len(targeted)} predictions within the target; median advisor error "
        f"{sorted(r[5] for r in targeted)[len(targeted) // 2]:.1f}%, median accelerate-rule "
        f"error {sorted(r[6] for r in targeted)[len(targeted) // 2]:.1f}%"
    )
    for technique in UNTARGETED:
        errors = [f"{r[0]} {r[2][:40]}: {r[5]:.1f}%" for r in rows if r[1] == technique]
        if errors:
            print(f"{technique} (no target): " + "; ".join(errors))


if __name__ == "__main__":
    main()
