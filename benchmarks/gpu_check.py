"""The checks that need a CUDA GPU, as one prepared script for a session that has one lent.

Within about 8 minutes it runs:

1. ``python -m pytest -m cuda -q`` (the test suite's CUDA tests);
2. for a few zoo models, each in a fresh subprocess per ``PYTORCH_CUDA_ALLOC_CONF`` (the
   allocator reads it once, at CUDA initialisation): two real training steps on the GPU under
   :func:`memprof.profile`, comparing memprof's tracked peak with
   ``torch.cuda.max_memory_allocated()``, the profile's device-reported reserved bytes and
   (when the profile models the caching allocator: ``Profile.allocator_summary()``) its predicted
   reserved peak with ``torch.cuda.max_memory_reserved()``, and ``memprof.estimate(...,
   device="cuda")`` (fake tensors) with the real run's peak.

It prints one table and, with ``--json``, writes the rows. Without CUDA it says so on stderr
and exits with code 2 (``--no-cuda-ok`` makes that 0), running nothing.

Run from the repository root: ``python benchmarks/gpu_check.py --json reports/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("gpt2", "llama-gqa", "bert", "resnet-bn", "lstm-tied")
CONFS = ("", "expandable_segments:True")
TOTAL_BUDGET_S = 8 * 60
PYTEST_TIMEOUT_S = 200
CHILD_TIMEOUT_S = 90
NO_CUDA = 2


# ------------------------------------------------------------------ the child: one model, one conf
def _to_cuda(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.cuda()
    if isinstance(value, dict):
        return {k: _to_cuda(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_to_cuda(v) for v in value)
    return value


def measure_model(name: str, *, with_estimate: bool) -> dict[str, Any]:
    """Two real CUDA steps of the zoo model under memprof.profile, and what CUDA reported."""
    import torch

    import memprof
    from benchmarks.advisor_accuracy import _wrapped
    from benchmarks.zoo import by_name

    entry = by_name(name)
    workload = entry.build()
    model = workload.model.cuda()  # parameters move in place: the optimizer keeps them
    batch = _to_cuda(workload.batch)
    assert workload.optimizer is not None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with memprof.profile(model, workload.optimizer) as prof:
        for _ in range(2):
            loss = workload.loss(model, batch)
            loss.backward()
            del loss
            workload.optimizer.step()
            workload.optimizer.zero_grad(set_to_none=True)
            prof.step()
    torch.cuda.synchronize()
    profile = prof.profile
    reported = [s.device_reserved for s in profile.steps_stats if s.device_reserved is not None]
    allocator = profile.allocator_summary()
    predicted_reserved = allocator.replay.reserved_peak_bytes if allocator is not None else None
    out: dict[str, Any] = {
        "model": name,
        "conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "tracked_peak_bytes": profile.peak().total_bytes,
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(),
        "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(),
        "profile_reserved_bytes": max(reported) if reported else None,
        "predicted_reserved_bytes": predicted_reserved,
        "estimate_peak_bytes": None,
        "real_estimate_run_peak_bytes": None,
    }
    del model, batch, workload, prof
    if with_estimate:
        out.update(_estimate_vs_real(entry, _wrapped))
    return out


def _estimate_vs_real(entry: Any, wrapped: Any) -> dict[str, Any]:
    """estimate(device="cuda") vs the same two steps (estimate's AdamW, foreach) run for real."""
    import torch

    import memprof

    batch = entry.build().batch
    fake = memprof.estimate(wrapped(entry), batch=batch, optimizer="adamw", dtype="fp32",
                            device="cuda", steps=2)
    model = wrapped(entry)().cuda()
    data = _to_cuda(batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            foreach=True)
    with memprof.profile(model, opt) as prof:
        for _ in range(2):
            loss = (model(**data) if isinstance(data, dict) else model(*data)
                    if isinstance(data, tuple | list) else model(data))["loss"]
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
            prof.step()
    return {"estimate_peak_bytes": fake.peak().total_bytes,
            "real_estimate_run_peak_bytes": prof.profile.peak().total_bytes}


# ------------------------------------------------------------------ the table
def _ratio(a: int | None, b: int | None) -> float | None:
    return a / b if a is not None and b else None


def build_table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, conf) with the ratios memprof / CUDA (1.0 is exact)."""
    rows = []
    for r in results:
        if "error" in r:
            rows.append({"model": r["model"], "conf": r.get("conf", ""), "error": r["error"]})
            continue
        rows.append({
            **r,
            "tracked_over_max_allocated": _ratio(r["tracked_peak_bytes"],
                                                 r["cuda_max_allocated_bytes"]),
            "reported_over_max_reserved": _ratio(r["profile_reserved_bytes"],
                                                 r["cuda_max_reserved_bytes"]),
            "predicted_over_max_reserved": _ratio(r["predicted_reserved_bytes"],
                                                  r["cuda_max_reserved_bytes"]),
            "estimate_over_real": _ratio(r["estimate_peak_bytes"],
                                         r["real_estimate_run_peak_bytes"]),
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    from memprof.units import format_bytes

    def size(v: int | None) -> str:
        return "-" if v is None else format_bytes(v)

    def rat(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    header = ["model", "conf", "tracked", "max alloc", "ratio", "reserved", "pred res",
              "ratio", "rep/res", "estimate", "est/real"]
    widths = [12, 24, 10, 10, 7, 10, 10, 7, 7, 10, 8]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<12}  {r['conf'] or '(default)':<24}  FAILED: {r['error']}")
            continue
        cells = [r["model"], r["conf"] or "(default)", size(r["tracked_peak_bytes"]),
                 size(r["cuda_max_allocated_bytes"]), rat(r["tracked_over_max_allocated"]),
                 size(r["cuda_max_reserved_bytes"]), size(r["predicted_reserved_bytes"]),
                 rat(r["predicted_over_max_reserved"]), rat(r["reported_over_max_reserved"]),
                 size(r["estimate_peak_bytes"]), rat(r["estimate_over_real"])]
        lines.append("  ".join(c[:w].ljust(w) for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


# ------------------------------------------------------------------ the parent
def _remaining(start: float) -> float:
    return TOTAL_BUDGET_S - (time.monotonic() - start)


def run_pytest(start: float) -> dict[str, Any]:
    timeout = min(PYTEST_TIMEOUT_S, max(10.0, _remaining(start) - 240))
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p",
                               "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"returncode": None, "tail": f"timed out after {timeout:.0f}s"}
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    return {"returncode": done.returncode, "tail": "\n".join(tail)}


def run_child(name: str, conf: str, *, with_estimate: bool, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": conf}
    args = [sys.executable, str(Path(__file__).resolve()), "--child", name]
    if with_estimate:
        args.append("--with-estimate")
    try:
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "conf": conf, "error": f"timed out after {timeout:.0f}s"}
    last = done.stdout.strip().splitlines()[-1:] if done.stdout.strip() else []
    if done.returncode != 0 or not last:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "conf": conf, "error": reason[:200]}
    result: dict[str, Any] = json.loads(last[0])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--skip-pytest", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--force", action="store_true", help="overwrite --json's file")
    parser.add_argument("--no-cuda-ok", action="store_true", help="exit 0 without CUDA")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--with-estimate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False): "
              "nothing checked", file=sys.stderr)
        return 0 if args.no_cuda_ok else NO_CUDA
    if args.child:
        print(json.dumps(measure_model(args.child, with_estimate=args.with_estimate)))
        return 0
    if args.json is not None and args.json.exists() and not args.force:
        print(f"gpu_check: {args.json} exists (pass --force to overwrite)", file=sys.stderr)
        return 2

    start = time.monotonic()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0)}
    if not args.skip_pytest:
        report["pytest"] = run_pytest(start)
        print(f"pytest -m cuda: rc={report['pytest']['returncode']}\n{report['pytest']['tail']}",
              flush=True)
    results = []
    for name in args.models.split(","):
        for conf in CONFS:
            left = _remaining(start)
            if left < 20:
                results.append({"model": name, "conf": conf, "error": "out of time"})
                continue
            results.append(run_child(name, conf, with_estimate=conf == "",
                                     timeout=min(CHILD_TIMEOUT_S, left)))
            print(f"{name} [{conf or 'default'}] done at {time.monotonic() - start:.0f}s",
                  flush=True)
    rows = build_table(results)
    report["rows"] = rows
    print(format_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    failed = any("error" in r for r in rows) or report.get("pytest", {}).get("returncode") not in (
        0, 5, None)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
