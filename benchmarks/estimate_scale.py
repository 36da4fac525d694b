"""Scale of ``memprof estimate``: a Llama-2-7B-shaped training step on fake tensors.

    python benchmarks/estimate_scale.py [--layers 32] [--seq-len 512] [--skip-memtracker]
                                        [--cprofile]

The model: 32 layers, d=4096, FFN 11008, 32 heads, vocab 32000; batch 1 x 512 tokens, bf16,
AdamW, two steps (the second with optimizer state), all under FakeTensorMode on the CPU.

Each contender runs in its own fresh Python process, so that one's memory does not count for
the other:

* ``bare``: the same two steps under FakeTensorMode with no tracker (the floor);
* ``memprof``: :func:`memprof.estimate.estimate` (512-byte blocks, per-layer table);
* ``memtracker``: ``torch.distributed._tools.mem_tracker.MemTracker`` on the same step.

For each: wall time of the estimate (model build + two steps; interpreter start and imports are
shown apart), peak RSS of the process, and RSS growth over the estimate (peak RSS minus RSS
after the imports). Targets for memprof: <= 15 s and <= 1 GiB. ``--cprofile`` adds the hottest
functions of memprof's run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

TARGET_SECONDS = 15.0
TARGET_BYTES = 1 << 30
#: Measured elsewhere for MemTracker on this step (the issue's figures).
MEMTRACKER_REFERENCE = {"seconds": 27.5, "peak_rss_bytes": 357 * 1024**2}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _config(layers: int) -> dict[str, Any]:
    from memprof.estimate import KNOWN_MODELS

    return {**KNOWN_MODELS["llama-2-7b"], "num_hidden_layers": layers}


# ------------------------------------------------------------------ children
def child(which: str, layers: int, seq_len: int, cprofile: bool) -> dict[str, Any]:
    started = time.perf_counter()
    import torch
    import transformers  # noqa: F401 - imported here so its cost is counted apart

    from memprof.estimate import spec_from_config

    spec = spec_from_config("llama-2-7b-shaped", _config(layers))
    imported = time.perf_counter()
    rss_after_imports = _rss_now()
    result: dict[str, Any] = {"which": which, "import_s": imported - started}

    t0 = time.perf_counter()
    if which == "memprof":
        from memprof.commands.estimate import layer_frame
        from memprof.estimate import estimate

        def run() -> Any:
            return estimate(spec, batch=lambda: spec.make_batch(1, seq_len), dtype="bf16",
                            optimizer="adamw", device="cuda")

        if cprofile:
            import cProfile
            import io
            import pstats

            profiler = cProfile.Profile()
            profile = profiler.runcall(run)
            stream = io.StringIO()
            stats = pstats.Stats(profiler, stream=stream).sort_stats("tottime")
            stats.print_stats(18)
            result["cprofile"] = stream.getvalue()
        else:
            profile = run()
        result["seconds"] = time.perf_counter() - t0
        peak = profile.peak()
        info = profile.meta["estimate"]
        result.update(
            peak_bytes=peak.total_bytes, by_category=peak.by_category,
            where=peak.describe(), device_total_bytes=info["device_total_bytes"],
            num_parameters=info["num_parameters"],
        )
        layers_df = layer_frame(profile)
        result["layers"] = layers_df.head(6).to_dict(orient="records")
        result["layer_rows"] = len(layers_df)
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode

        from memprof.estimate.fake_step import _build_model

        with FakeTensorMode():
            model = _build_model(spec.factory, torch.bfloat16)
            # foreach=True as memprof's estimate of CUDA uses (torch's default there)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
            batch = spec.make_batch(1, seq_len)

            def step() -> None:
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            if which == "bare":
                for _ in range(2):
                    step()
            else:
                from torch.distributed._tools.mem_tracker import MemTracker

                tracker = MemTracker()
                tracker.track_external(model, optimizer)
                with tracker:
                    step()
                    tracker.reset_mod_stats()  # it refuses a second iteration otherwise
                    step()
                snapshot = tracker.get_tracker_snapshot("peak")
                totals = [v.get("Total", 0) for v in snapshot.values()]
                result["peak_bytes"] = int(max(totals)) if totals else None
        result["seconds"] = time.perf_counter() - t0
    result["peak_rss_bytes"] = _rss_peak()
    result["rss_growth_bytes"] = max(0, _rss_peak() - rss_after_imports)
    return result


def _spawn(which: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", which, "--layers", str(args.layers),
               "--seq-len", str(args.seq_len)]
    if args.cprofile and which == "memprof":
        command.append("--cprofile")
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{which} failed with exit code {proc.returncode}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    return result


# ------------------------------------------------------------------ report
def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 1024**2:,.0f} MiB"


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 1024**3:,.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--skip-memtracker", action="store_true")
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--child", choices=["bare", "memprof", "memtracker"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.seq_len, args.cprofile),
                         default=str))
        return

    print(f"Llama-2-7B-shaped ({args.layers} layers, d=4096, vocab 32000), batch 1 x "
          f"{args.seq_len}, bf16, AdamW, 2 steps under FakeTensorMode; torch "
          f"{_torch_version()}, {os.cpu_count()} CPUs")
    runs = {"bare": _spawn("bare", args), "memprof": _spawn("memprof", args)}
    if not args.skip_memtracker:
        runs["memtracker"] = _spawn("memtracker", args)

    ours = runs["memprof"]
    header = f"{'':<28}{'estimate s':>11}{'imports s':>11}{'process s':>11}" \
             f"{'peak RSS':>11}{'RSS growth':>12}{'peak est.':>12}"
    print()
    print(header)
    print("-" * len(header))
    for name, label in (("bare", "fake step, no tracker"), ("memprof", "memprof estimate"),
                        ("memtracker", "MemTracker (this machine)")):
        if name not in runs:
            continue
        r = runs[name]
        print(f"{label:<28}{r['seconds']:>11.2f}{r['import_s']:>11.2f}{r['process_s']:>11.2f}"
              f"{_mib(r['peak_rss_bytes']):>11}{_mib(r['rss_growth_bytes']):>12}"
              f"{_gib(r.get('peak_bytes')):>12}")
    ref = MEMTRACKER_REFERENCE
    print(f"{'MemTracker (issue figures)':<28}{ref['seconds']:>11.2f}{'':>11}{'':>11}"
          f"{_mib(ref['peak_rss_bytes']):>11}")
    print()
    print(f"memprof / bare fake step: {ours['seconds'] / runs['bare']['seconds']:.2f}x time")
    if "memtracker" in runs:
        mt = runs["memtracker"]
        print(f"memprof / MemTracker:     {ours['seconds'] / mt['seconds']:.2f}x time, "
              f"{ours['peak_rss_bytes'] / mt['peak_rss_bytes']:.2f}x peak RSS, "
              f"{ours['rss_growth_bytes'] / max(mt['rss_growth_bytes'], 1):.2f}x RSS growth")
    print(f"memprof / MemTracker (issue figures): {ours['seconds'] / ref['seconds']:.2f}x time, "
          f"{ours['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f}x peak RSS")
    ok_time = ours["seconds"] <= TARGET_SECONDS
    ok_mem = ours["peak_rss_bytes"] <= TARGET_BYTES
    print(f"targets: estimate <= {TARGET_SECONDS:.0f} s: {'met' if ok_time else 'MISSED'}; "
          f"peak RSS <= 1 GiB: {'met' if ok_mem else 'MISSED'}")
    print()
    print(f"memprof: {ours['where']}; {ours['num_parameters'] / 1e9:.2f} B parameters; with the "
          f"modelled CUDA context {_gib(ours['device_total_bytes'])}")
    print("  at the peak: " + ", ".join(f"{k} {_gib(v)}" for k, v in ours["by_category"].items()
                                        if v))
    print(f"\nper-layer breakdown (first 6 of {ours['layer_rows']}):")
    cols = ["parameter_total", "gradient_total", "optimizer_state_total", "activation_total",
            "peak_forward", "peak_backward"]
    print(f"{'module':<18}{'type':<20}" + "".join(f"{c.replace('_total', ''):>17}" for c in cols))
    for row in ours["layers"]:
        print(f"{row['module']:<18}{row['type']:<20}"
              + "".join(f"{_mib(row[c]):>17}" for c in cols))
    if "cprofile" in ours:
        print("\ncProfile of memprof's estimate (by own time):")
        print(ours["cprofile"])


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


if __name__ == "__main__":
    main()
