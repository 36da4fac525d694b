"""How long the advisor's fake-run predictions take, against the unchanged step they predict.

Builds GPT-2 small (transformers' default ``GPT2Config``: 124M parameters, batch 2 x 256,
AdamW) or a zoo model (``--model``), runs its real step a few times (the unchanged step time
every figure is divided by), profiles it under memprof, then times:

- the analytic predictions from the profile (``changes_for``: what ``memprof advise FILE``
  computes, kernel measurements included);
- the fake run of the unchanged step and of every applicable change, one row each;
- ``advise(profile, workload=w, simulate=False)`` as a user calls it (all rows by fake runs);
- ``memprof advise FILE`` on the saved profile, in a subprocess (imports included).

``--estimate NAME`` (a built-in shape of ``memprof estimate``, e.g. ``llama-2-7b``) times
instead ``memprof estimate NAME --batch-size 1 --seq-len 512 --gpu "RTX 4090"`` (its advice
rows and plan by fake runs) in a subprocess, as a ratio against the same estimate without
``--gpu`` (the unchanged fake step alone, no advice) timed in the same run.

Every time is printed with its ratio to the unchanged real step measured in the same run: wall
time, and CPU time (this process's threads and its children), which a machine shared with other
work inflates less.
``--workers N`` sets how many processes share the fake runs (``MEMPROF_FAKE_WORKERS``; ``0``:
all in this process; the default, the cores idle when they start). Kernel-scratch measurements
are kept on disk (memprof.tracking.kernel_cache), so a second run reads what the first measured;
``--cold`` starts from none (a first run on a new machine). ``--quick`` uses a 2-layer
GPT-2 (d=128) so the whole script takes seconds; ``--cprofile N`` prints the N most expensive
functions of the all-rows ``advise`` call (in this process: by cumulative, then own time).
``--bytes FILE`` writes the all-rows call's predicted bytes per row to FILE, or, where FILE
exists, says whether they are the same as those it holds (a speed-up must not change one
byte; the checkpointing rows pick blocks by their measured forward time, so a loaded machine
may pick others).

Example::

    python benchmarks/fake_speed.py --quick
    python benchmarks/fake_speed.py --quick --workers 0     # every fake run in this process
    python benchmarks/fake_speed.py                 # GPT-2 small (minutes on a 2-core CPU)
    python benchmarks/fake_speed.py --model llama-gqa --cprofile 25
    python benchmarks/fake_speed.py --estimate llama-2-7b
    python benchmarks/fake_speed.py --quick --no-rows --no-cli --bytes quick-bytes.json
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from memprof.advisor import Workload, advise, changes_for, read_facts
from memprof.advisor.fake_prediction import FakeRunError, fake_peak
from memprof.advisor.workload import baseline, seeded


def gpt2_small(*, quick: bool) -> Workload:
    """GPT-2 small (default config) at batch 2 x 256, or a 2-layer d=128 one with ``quick``."""
    import transformers

    torch.manual_seed(0)
    if quick:
        config = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=2048,
                                         n_positions=128, bos_token_id=0, eos_token_id=0)
        batch, seq = 2, 128
    else:
        config = transformers.GPT2Config()
        batch, seq = 2, 256
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return Workload(model, optimizer, {"input_ids": ids, "labels": ids}, steps=2)


class Clock:
    """Wall and CPU seconds since it was made (CPU: all threads, and children that ended)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), _cpu()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, _cpu() - self.cpu


def _cpu() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def real_step_seconds(w: Workload, repeats: int = 3) -> tuple[float, float]:
    """Wall and CPU seconds of the fastest of ``repeats`` unchanged steps on a copy (no
    profiler), after one warm-up."""
    import copy

    model = copy.deepcopy(w.model)
    assert w.optimizer is not None
    opt = type(w.optimizer)(model.parameters())
    opt.param_groups[0].update({k: v for k, v in w.optimizer.defaults.items()})
    best = (float("inf"), float("inf"))
    for i in range(repeats + 1):
        clock = Clock()
        w.loss(model, w.batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            best = min(best, clock.read())
    return best


def _label(change: Any) -> str:
    opts = ",".join(f"{k}={v}" for k, v in change.options.items())
    return f"{change.technique}[{opts}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2-layer GPT-2 (seconds)")
    parser.add_argument("--model", help="a zoo model (benchmarks/zoo.py) instead of GPT-2")
    parser.add_argument("--no-rows", action="store_true", help="skip the per-row fake runs")
    parser.add_argument("--no-advise", action="store_true", help="skip the all-rows advise call")
    parser.add_argument("--no-cli", action="store_true", help="skip `memprof advise FILE`")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="print the N costliest functions of the all-rows advise call")
    parser.add_argument("--bytes", type=Path, metavar="FILE",
                        help="write the all-rows call's predicted bytes per row to FILE, or "
                             "compare them with FILE's where it exists")
    parser.add_argument("--workers", metavar="N",
                        help="processes the fake runs share (MEMPROF_FAKE_WORKERS: 0 runs them "
                             "all in this process; default: the cores idle when they start)")
    parser.add_argument("--cold", action="store_true",
                        help="start with no kernel measurements on disk (a fresh "
                             "MEMPROF_CACHE_DIR for this run): a first run on a new machine")
    parser.add_argument("--estimate", metavar="NAME",
                        help="time `memprof estimate NAME --gpu \"RTX 4090\"` (advice by fake "
                             "runs) against the unchanged fake step, instead of the above")
    args = parser.parse_args(argv)
    if args.workers is not None:
        os.environ["MEMPROF_FAKE_WORKERS"] = args.workers  # subprocesses inherit it too
    from memprof.advisor import parallel
    from memprof.tracking import kernel_cache

    if args.cold:
        os.environ[kernel_cache.DIR_ENV] = tempfile.mkdtemp(prefix="memprof-kernels-")
    print(f"fake-run processes: {os.environ.get('MEMPROF_FAKE_WORKERS') or 'default'} "
          f"({len(os.sched_getaffinity(0))} usable cores, "
          f"{parallel.idle_cores(len(os.sched_getaffinity(0)))} idle now)")
    path = kernel_cache.file_path()
    stored = len(path.read_text().splitlines()) if path.exists() else 0
    print(f"kernel measurements on disk: {stored} ({path})"
          if kernel_cache.enabled() else "kernel measurements on disk: off")

    if args.estimate:
        return _time_estimate(args.estimate)
    if args.model:
        from benchmarks import zoo

        w = zoo.by_name(args.model).build()
        name = args.model
    else:
        w = gpt2_small(quick=args.quick)
        name = "gpt2 (2 layers, d=128)" if args.quick else "gpt2 small (124M)"
    params = sum(p.numel() for p in w.model.parameters())
    print(f"model: {name}, {params / 1e6:.1f}M parameters, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    step, step_cpu = real_step_seconds(w)
    print(f"{'':<58} {'wall':>8}   {'ratio':>6} {'cpu':>8}   {'ratio':>6}")
    print(f"{'unchanged real step (no profiler)':<58} {step:8.2f} s   1.00x {step_cpu:8.2f} s"
          "   1.00x")

    def report(what: str, clock: Clock, note: str = "") -> None:
        wall, cpu = clock.read()
        print(f"{what:<58} {wall:8.2f} s {wall / step:6.2f}x {cpu:8.2f} s {cpu / step_cpu:6.2f}x"
              f" {note}", flush=True)

    clock = Clock()
    with seeded():
        profile = baseline(w).profile
    report(f"real profile ({w.steps} steps under memprof)", clock)

    clock = Clock()
    facts = read_facts(profile)
    changes = changes_for(facts)
    report("analytic predictions (changes_for)", clock)
    _print_dispatches(w)

    if not args.no_rows:
        clock = Clock()
        with seeded():
            ref = fake_peak(w)
        report("fake run: unchanged", clock,
               f"peak {ref / 2**20:.1f} MiB (real {profile.peak().total_bytes / 2**20:.1f})")
        for c in changes:
            if not (c.applicable and c.apply is not None):
                continue
            clock = Clock()
            try:
                with seeded():
                    peak: int | str = fake_peak(w, [c.apply])
            except FakeRunError as exc:
                peak = str(exc)[:60]
            shown = f"peak {peak / 2**20:.1f} MiB" if isinstance(peak, int) else peak
            report(f"fake run: {_label(c)}"[:58], clock, shown)

    if not args.no_advise:
        advice = _time_advise(profile, w, report, args.cprofile)
        if args.bytes is not None:
            _check_bytes(advice, args.bytes)
    if not args.no_cli:
        _time_cli(profile, report)
    return 0


def dispatches_per_run(w: Workload) -> collections.Counter[str]:
    """The ops FakeTensorMode dispatched, by name, in one fake run of the unchanged step (after
    one not counted, which measures the kernels it meets): every dispatch costs Python time,
    so fewer per run is the measure of a per-run saving that no loaded clock blurs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with seeded():
        fake_peak(w)
    counts: collections.Counter[str] = collections.Counter()
    dispatch = FakeTensorMode.__torch_dispatch__

    def counting(self: Any, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        counts[str(func)] += 1
        return dispatch(self, func, types, args, kwargs)

    FakeTensorMode.__torch_dispatch__ = counting  # type: ignore[method-assign]
    try:
        with seeded():
            fake_peak(w)
    finally:
        FakeTensorMode.__torch_dispatch__ = dispatch  # type: ignore[method-assign]
    return counts


def _print_dispatches(w: Workload) -> None:
    counts = dispatches_per_run(w)
    top = ", ".join(f"{name} {n}" for name, n in counts.most_common(4))
    print(f"fake dispatches per unchanged run: {sum(counts.values())} ({top})", flush=True)


def _check_bytes(advice: Any, path: Path) -> None:
    """Write each row's predicted bytes to ``path``, or compare them with those it holds."""
    rows = sorted([r["technique"], json.dumps(r.get("options"), sort_keys=True, default=str),
                   r.get("predicted_peak_bytes"), r.get("predicted_by")] for r in advice.rows)
    if not path.exists():
        path.write_text(json.dumps(rows, indent=0))
        print(f"predicted bytes of {len(rows)} rows written to {path}")
        return
    before = json.loads(path.read_text())
    changed = [(a, b) for a, b in zip(before, rows, strict=False) if a != b]
    if not changed and len(before) == len(rows):
        print(f"predicted bytes of {len(rows)} rows: the same as {path}'s")
        return
    print(f"predicted bytes differ from {path}'s ({len(before)} rows there, {len(rows)} here):")
    for a, b in changed:
        print(f"  {a}\n  -> {b}")


def _time_advise(profile: Any, w: Workload, report: Any, top: int) -> Any:
    prof = cProfile.Profile() if top else None
    clock = Clock()
    if prof is not None:
        prof.enable()
    advice = advise(profile, workload=w, simulate=False)
    if prof is not None:
        prof.disable()
    faked = sum(1 for r in advice.rows if r.get("predicted_by") == "fake run")
    report("advise(profile, workload=w, simulate=False)", clock,
           f"{faked} rows by fake runs")
    if prof is not None:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
        print(out.getvalue())
    return advice


def _time_estimate(name: str, gpu: str = "RTX 4090") -> int:
    """``memprof estimate NAME`` at batch 1 x 512 with ``--gpu`` (every advice row and the plan by
    fake runs), as a ratio against the same estimate without ``--gpu``: the unchanged fake step
    alone, in the same run (both subprocesses, imports included)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    base = [sys.executable, "-m", "memprof", "estimate", name, "--batch-size", "1",
            "--seq-len", "512"]
    print(f"estimate: {name}, batch 1 x 512, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'':<58} {'wall':>8}   {'ratio':>6} {'cpu':>8}   {'ratio':>6}")
    step = step_cpu = 0.0
    for what, extra in (("unchanged fake step (memprof estimate, no --gpu)", []),
                        (f"estimate --gpu {gpu!r} (rows + plan by fake runs)", ["--gpu", gpu])):
        clock = Clock()
        done = subprocess.run([*base, *extra], env=env, capture_output=True, text=True)
        wall, cpu = clock.read()
        if done.returncode:
            print(done.stderr[-2000:])
            return done.returncode
        if not extra:
            step, step_cpu = wall, cpu
        last = [line for line in done.stdout.splitlines() if line.strip()]
        note = next((line.strip() for line in reversed(last) if "plan" in line), "")
        print(f"{what:<58} {wall:8.2f} s {wall / step:6.2f}x {cpu:8.2f} s {cpu / step_cpu:6.2f}x"
              f" {note[:80]}", flush=True)
    return 0


def _time_cli(profile: Any, report: Any) -> None:
    """``memprof advise FILE`` in a fresh process, and the same process's imports alone."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "profile.json"
        profile.save(path)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
        clock = Clock()
        subprocess.run([sys.executable, "-c", "import memprof.advisor, memprof.cli"],
                       check=True, env=env)
        report("  imports alone (memprof.advisor, memprof.cli)", clock)
        clock = Clock()
        done = subprocess.run([sys.executable, "-m", "memprof", "advise", str(path)],
                              env=env, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-2000:])
        report("`memprof advise FILE` (subprocess)", clock, f"rc {done.returncode}")


if __name__ == "__main__":
    sys.exit(main())
