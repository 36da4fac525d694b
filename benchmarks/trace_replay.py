"""File-only autocast predictions: the operator trace's replay against the analytic model.

    python benchmarks/trace_replay.py [--models issue-gpt2,resnet-bn,bert,gpt2] [--size]

For each model: profile its step (which records the operator trace), save the profile and
advise from the file alone (no model: what ``memprof advise FILE`` does), then apply autocast
(bf16, and fp16 with a GradScaler) to a copy and measure it. Prints each row's measured saving,
the trace replay's and the analytic model's predictions (percent of the peak) and their
errors in points, the time ``advise`` took on the file and the bytes the trace adds to the
file. ``issue-gpt2`` is issue #24's 4-layer GPT-2 (d=256, vocab 4096, batch 4 x 256, dropout
on); the others come from benchmarks/zoo.py. ``--size`` also profiles GPT-2 small (124M
parameters, batch 1 x 128) and prints the size the trace adds to its file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import memprof
from benchmarks import zoo
from memprof.advisor.mixed_precision import _apply_autocast, _apply_autocast_fp16_scaler
from memprof.advisor.workload import Workload, baseline, copy_state, seeded, simulate

ROWS = {
    "autocast bf16": ({"mode": "autocast", "dtype": "bf16"}, _apply_autocast(torch.bfloat16)),
    "autocast fp16 + GradScaler": (
        {"mode": "autocast", "dtype": "fp16", "grad_scaler": True},
        _apply_autocast_fp16_scaler,
    ),
}


def issue_gpt2() -> Workload:
    """Issue #24's model: 4-layer GPT-2, d=256, vocab 4096, batch 4 x 256, dropout on."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=4,
        n_embd=256,
        n_head=4,
        vocab_size=4096,
        n_positions=256,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 4096, (4, 256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Workload(model, opt, {"input_ids": ids, "labels": ids}, steps=2)


def gpt2_small() -> Workload:
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    ids = torch.randint(0, 50257, (1, 128))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return Workload(model, opt, {"input_ids": ids, "labels": ids}, steps=2)


def traced_run(workload: Workload, dtype: torch.dtype | None = None) -> memprof.Profile:
    """The workload's steps on a copy (under ``torch.autocast`` to ``dtype`` if given),
    profiled with the operator trace, as ``memprof run`` profiles a script."""
    state = copy_state(workload)
    model, optimizer = state.model, state.build_optimizer()
    with seeded(), memprof.profile(model, optimizer, record_ops=True) as prof:
        for _ in range(workload.steps):
            cast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
            with cast:
                loss = workload.loss(model, state.batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=workload.set_to_none)
            del loss
            prof.step()
    return prof.profile


def workload_of(name: str) -> Workload:
    if name == "issue-gpt2":
        return issue_gpt2()
    torch.manual_seed(zoo.SEED)
    return zoo.by_name(name).build()


def trace_bytes(profile: memprof.Profile) -> int:
    """What the operator trace adds to the saved file (bytes of its compact JSON)."""
    return len(json.dumps(profile.op_trace, separators=(",", ":"))) if profile.op_trace else 0


def file_advice(profile: memprof.Profile) -> tuple[dict[str, dict[str, Any]], float]:
    """The autocast rows of ``memprof.advise`` on the saved file, and the seconds it took."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.json"
        profile.save(path)
        started = time.perf_counter()
        loaded = memprof.load(path)
        advice = memprof.advise(loaded)
        took = time.perf_counter() - started
    rows = {}
    for label, (options, _) in ROWS.items():
        for row in advice.rows:
            if row["technique"] == "mixed_precision" and row["options"] == options:
                rows[label] = row
    return rows, took


def run_model(name: str) -> list[dict[str, Any]]:
    workload = workload_of(name)
    with seeded():
        ref = baseline(workload)
    traced = traced_run(workload)
    base = traced.peak().total_bytes
    rows, took = file_advice(traced)
    out = []
    for label, (_, apply) in ROWS.items():
        row = rows.get(label)
        if row is None or not row.get("applicable"):
            continue
        with seeded():
            measured = simulate(workload, [apply], ref)

        def pct(peak: int | None, of: int = base) -> float | None:
            return None if peak is None else 100.0 * (of - peak) / of

        out.append(
            {
                "model": name,
                "row": label,
                "predicted_by": row["predicted_by"],
                "measured_pct": pct(measured.peak_bytes, ref.peak_bytes),
                "predicted_pct": pct(row["predicted_peak_bytes"]),
                "analytic_pct": pct(row["analytic_peak_bytes"]),
                "advise_s": took,
                "trace_bytes": trace_bytes(traced),
            }
        )
    return out


def overhead(steps: int = 6, repeats: int = 3) -> None:
    """CPU seconds per step of overhead.py's MLP (300 Linear(32, 32) + ReLU) under memprof,
    with the operator trace (recorded in the first two steps) and without, in one run."""
    from benchmarks.overhead import mlp_workload

    model, step = mlp_workload()
    step()
    best: dict[bool, list[float]] = {}
    for _ in range(repeats):
        for record in (False, True):
            times = []
            with memprof.profile(model, record_ops=record) as prof:
                for _ in range(steps):
                    started = time.process_time()
                    step()
                    prof.step()
                    times.append(time.process_time() - started)
            old = best.get(record)
            best[record] = (
                times if old is None else [min(a, b) for a, b in zip(old, times, strict=True)]
            )
    off, on = best[False], best[True]
    print(f"MLP step CPU s (best of {repeats}), steps 1-{steps}:")
    print("  trace off: " + " ".join(f"{t:.3f}" for t in off))
    print("  trace on:  " + " ".join(f"{t:.3f}" for t in on))
    traced = sum(on[:2]) / sum(off[:2])
    rest = sum(on[2:]) / sum(off[2:])
    whole = sum(on) / sum(off)
    print(
        f"  traced steps (1-2) {traced:.2f}x, later steps {rest:.2f}x, all {steps} steps "
        f"{whole:.2f}x the same steps without the trace"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="issue-gpt2,resnet-bn,bert,gpt2")
    parser.add_argument("--size", action="store_true", help="also GPT-2 small's trace size")
    parser.add_argument(
        "--overhead",
        action="store_true",
        help="only the recording's cost on overhead.py's 600-module MLP",
    )
    args = parser.parse_args()
    if args.overhead:
        overhead()
        return
    print(
        f"{'model':<11} {'row':<27} {'measured':>8} {'replay':>7} {'err':>6} "
        f"{'analytic':>8} {'err':>6} {'advise':>7} {'trace':>9}"
    )
    for name in args.models.split(","):
        for r in run_model(name):
            err = r["predicted_pct"] - r["measured_pct"]
            a_err = r["analytic_pct"] - r["measured_pct"]
            print(
                f"{r['model']:<11} {r['row']:<27} {r['measured_pct']:7.1f}% "
                f"{r['predicted_pct']:6.1f}% {err:+6.1f} {r['analytic_pct']:7.1f}% "
                f"{a_err:+6.1f} {r['advise_s']:6.2f}s {r['trace_bytes'] / 1024:7.1f}KiB"
                f"  ({r['predicted_by']})",
                flush=True,
            )
    if args.size:
        profile = traced_run(gpt2_small())
        whole = len(json.dumps(profile.to_dict(), separators=(",", ":"), default=str))
        added = trace_bytes(profile)
        print(
            f"GPT-2 small (124M, batch 1 x 128): profile file {whole / 1024:.0f} KiB, of which "
            f"the operator trace {added / 1024:.0f} KiB ({100.0 * added / whole:.0f}%)"
        )


if __name__ == "__main__":
    main()
