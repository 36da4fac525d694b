"""What each advice row's fake run costs, against the unchanged fake run in the same process.

For GPT-2 small (batch 2 x 256, AdamW; ``--quick``: 2 layers, d=128) or the model a
``memprof estimate NAME`` builds (``--estimate llama-2-7b``: batch 1 x 512, bf16, AdamW, as
CUDA), runs the unchanged step and then every applicable row on fake tensors, each row
``--repeat`` times in this one process, and prints per row: the CPU seconds of each run (the
first pays one-off costs: imports such as peft's, kernel measurements), the last run's ratio to
the unchanged run, the fake ops it dispatched (a measure no load blurs) and its peak bytes.

GPT-2's rows come from a real profile of its step (minutes on a 2-core CPU); ``--profile FILE``
keeps it in FILE (made when FILE is absent) so later runs skip it.

Example::

    python benchmarks/row_costs.py --quick
    python benchmarks/row_costs.py --profile /tmp/gpt2.json --only qlora,pruning
    python benchmarks/row_costs.py --estimate llama-2-7b --repeat 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("MEMPROF_FAKE_WORKERS", "0")  # every run in this process


def _label(change: Any) -> str:
    shown = {k: v for k, v in change.options.items() if k != "modules"}
    return f"{change.technique}[{','.join(f'{k}={v}' for k, v in shown.items())}]"


def _gpt2(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    from benchmarks.fake_speed import gpt2_small
    from memprof.advisor.workload import baseline, seeded
    from memprof.profile import load

    w = gpt2_small(quick=args.quick)
    if args.profile is not None and args.profile.exists():
        return w, load(args.profile), {}
    with seeded():
        profile = baseline(w).profile
    if args.profile is not None:
        profile.save(args.profile)
    return w, profile, {}


def _estimated(name: str) -> tuple[Any, Any, dict[str, Any]]:
    from memprof.advisor import Workload, fake_options
    from memprof.estimate import build_spec, estimate_step

    spec = build_spec(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = estimate_step(spec, batch=lambda: spec.make_batch(1, 512), optimizer="adamw",
                             dtype="bf16", device="cuda", gpu="RTX 4090")
    w = Workload(model=step.model, optimizer=step.optimizer, batch=step.batch,
                 step_fn=step.loss)
    return w, step.profile, fake_options(step.profile)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2-layer GPT-2 (seconds)")
    parser.add_argument("--estimate", metavar="NAME", help="a memprof estimate shape instead")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="GPT-2's profile: read from FILE, or made and written there")
    parser.add_argument("--only", default="", help="rows whose label holds one of these "
                        "comma-separated words")
    parser.add_argument("--repeat", type=int, default=2, help="runs per row (default 2)")
    args = parser.parse_args(argv)

    from torch._subclasses.fake_tensor import FakeTensorMode

    from memprof.advisor import changes_for, read_facts
    from memprof.advisor.fake_prediction import fake_peak
    from memprof.advisor.workload import seeded
    from memprof.errors import FakeRunError

    w, profile, options = _estimated(args.estimate) if args.estimate else _gpt2(args)
    changes = [c for c in changes_for(read_facts(profile)) if c.applicable and c.apply]
    wanted = [word for word in args.only.split(",") if word]
    ops = [0]
    dispatch = FakeTensorMode.__torch_dispatch__

    def counting(self: Any, func: Any, types: Any, a: Any = (), kw: Any = None) -> Any:
        ops[0] += 1
        return dispatch(self, func, types, a, kw)

    FakeTensorMode.__torch_dispatch__ = counting  # type: ignore[method-assign]

    def run(applies: list[Any]) -> tuple[float, int, int | str]:
        ops[0], started = 0, time.process_time()
        try:
            with seeded():
                peak: int | str = fake_peak(w, applies, **options)
        except FakeRunError as exc:
            peak = str(exc)[:40]
        return time.process_time() - started, ops[0], peak

    run([])  # one-off costs (kernel measurements) are not the unchanged run's
    base, base_ops, base_peak = run([])
    print(f"{'row':<64} {'cpu s (each run)':>18} {'ratio':>6} {'fake ops':>9}  peak bytes")
    print(f"{'unchanged':<64} {base:18.2f}  1.00x {base_ops:9d}  {base_peak}", flush=True)
    for change in changes:
        label = _label(change)
        if wanted and not any(word in label for word in wanted):
            continue
        runs = [run([change.apply]) for _ in range(args.repeat)]
        seconds = " ".join(f"{s:.2f}" for s, _, _ in runs)
        last, count, peak = runs[-1]
        print(f"{label[:64]:<64} {seconds:>18} {last / base:5.2f}x {count:9d}  {peak}",
              flush=True)
    FakeTensorMode.__torch_dispatch__ = dispatch  # type: ignore[method-assign]
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
