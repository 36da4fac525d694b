"""Step-time overhead of memprof against its peers, measured side by side in one run.

    python benchmarks/overhead.py [--repeats 3] [--steps 3] [--only NAME ...] [--all]
                                  [--backend auto|events|dispatch|all] [--memtracker]

NAME is ``gpt2-4l`` (GPT-2 from a config: 4 layers, d=384, 6 heads, vocab 8192, batch 4 x
256), ``mlp-600`` (300 Linear(32, 32) + ReLU pairs, 600 small modules, batch 16), any model of
the zoo (benchmarks/zoo.py) or any pattern (benchmarks/patterns.py); ``--all`` sweeps them all.
One thread (``torch.set_num_threads(1)``), timed by the process's CPU time (``--clock wall``:
wall time), so other work on the machine disturbs it less.

Per model it times one training step with no profiler, memprof and
torch.profiler(profile_memory=True) (and, asked for, memprof's other backends and torch's
MemTracker), best of ``--repeats`` taken round-robin, and prints each as a ratio to the
unprofiled step. memprof's events backend defers its work: its replay of the timed steps'
events runs inside the timed region (as its flush every few steps would), so memprof's ratio is
its whole per-step cost. torch.profiler's ratio is its steps alone: its post-processing at exit
(several times a step) is not counted, which makes the comparison strict for memprof. Single
models also print the replay's share, and memprof's own bookkeeping for a 1000-step run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import io
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import memprof
from benchmarks import patterns, zoo
from memprof.tracking import events as events_backend

#: A workload: the model memprof is given (None: let it find the modules that run) and a step.
Workload = tuple[nn.Module | None, Callable[[], None]]


def steady_malloc() -> str:
    """Pin glibc's mmap and trim thresholds. Left dynamic, whichever context runs after a large
    free (MemTracker's, a profile's exit) pays fresh page faults for the step's big tensors:
    measured here, the unprofiled GPT-2 step came out 460 ms in one run and 365 ms in the next,
    which made every profiler look 20% faster than no profiler."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "allocator thresholds left as they are (no glibc)"
    m_trim_threshold, m_mmap_threshold = -1, -3
    if libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30):
        return "glibc mmap threshold 32 MiB, trim threshold 1 GiB"
    return "allocator thresholds left as they are (mallopt refused)"


# ---------------------------------------------------------------------------- workloads
def gpt2_workload() -> Workload:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=384, n_head=6, vocab_size=8192, n_positions=256)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 8192, (4, 256))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return model, step


def mlp_workload() -> Workload:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(300):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    model = nn.Sequential(*layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(16, 32)

    def step() -> None:
        model(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    return model, step


def zoo_workload(entry: zoo.ZooModel) -> Callable[[], Workload]:
    def build() -> Workload:
        work = entry.build()
        optimizer = work.optimizer
        assert optimizer is not None

        def step() -> None:
            work.loss(work.model, work.batch).backward()
            optimizer.step()
            optimizer.zero_grad()

        return work.model, step

    return build


def pattern_workload(pattern: patterns.Pattern) -> Callable[[], Workload]:
    def build() -> Workload:
        torch.manual_seed(patterns.SEED)
        loop = pattern.build()
        count = [0]

        def step() -> None:
            loop.step(count[0])
            count[0] += 1

        return (loop.models[0] if len(loop.models) == 1 else None), step

    return build


def workloads() -> dict[str, tuple[Callable[[], Workload], str | None]]:
    """Every workload by name, with the package it needs (None: torch alone)."""
    found: dict[str, tuple[Callable[[], Workload], str | None]] = {
        "gpt2-4l": (gpt2_workload, "transformers"),
        "mlp-600": (mlp_workload, None),
    }
    for entry in zoo.ZOO:
        found[entry.name] = (zoo_workload(entry), entry.needs)
    for pattern in patterns.PATTERNS:
        found[pattern.name] = (pattern_workload(pattern), pattern.needs)
    return found


# ------------------------------------------------------------------------------ timing
#: What the steps are timed by: the process's CPU time (default; on a machine others share, it
#: counts only what this process runs, its threads included) or wall time (``--clock wall``).
CLOCK: list[Callable[[], float]] = [time.process_time]

#: Per label: the events backend's flush time per step (reading the events, all), best of the
#: repeats.
FLUSH: dict[str, tuple[float, float]] = {}
#: Per label: the replay of the timed steps, per step, by :data:`CLOCK`, best of the repeats.
REPLAY: dict[str, float] = {}
SOURCES: dict[str, str] = {}  # the events backend's source, by label


def _replay(ctx: Any) -> None:
    """Replay what memprof's events backend deferred, and run the requests its what-if
    allocator model batches (nothing for any other context)."""
    events = getattr(ctx, "_events", None)
    if events is not None:
        events.flush(restart=True)
    settle = getattr(getattr(ctx, "_reserved", None), "model", None)
    settle = getattr(settle, "settle", None)  # (a memprof before #25 runs the what-if at once)
    if settle is not None:
        settle()


def time_step(
    step: Callable[[], None],
    make_ctx: Callable[[], AbstractContextManager[Any]],
    *,
    steps: int,
    per_step: Callable[[Any], None] | None = None,
    label: str = "",
) -> tuple[float, float]:
    """Mean seconds per step in a fresh context: the steps with memprof's replay of them, and
    the same plus the context's exit."""
    gc.collect()
    ctx_manager = make_ctx()
    ctx = ctx_manager.__enter__()
    try:
        step()  # warm: the first step creates optimizer state
        if per_step:
            per_step(ctx)
        _replay(ctx)
        replayed = _flush_seconds(ctx)
        start = CLOCK[0]()
        for _ in range(steps):
            step()
            if per_step:
                per_step(ctx)
        replay_start = CLOCK[0]()
        _replay(ctx)
        elapsed = CLOCK[0]() - start
        replay = (CLOCK[0]() - replay_start) / steps
    finally:
        ctx_manager.__exit__(None, None, None)
    with_exit = CLOCK[0]() - start
    events = getattr(ctx, "_events", None)
    if events is not None:
        REPLAY[label] = min(REPLAY.get(label, replay), replay)
        done = _flush_seconds(ctx)
        flush = ((done[0] - replayed[0]) / steps, (done[1] - replayed[1]) / steps)
        FLUSH[label] = min(FLUSH.get(label, flush), flush, key=lambda f: f[1])
        SOURCES[label] = events.source.name
    return elapsed / steps, with_exit / steps


def _flush_seconds(ctx: Any) -> tuple[float, float]:
    events = getattr(ctx, "_events", None)
    return (events.stop_s, events.replay_s) if events is not None else (0.0, 0.0)


def _memprof_ctx(model: nn.Module | None, backend: str, source: str = "auto") -> Callable[[], Any]:
    def make() -> Any:
        events_backend.PREFERRED_SOURCE = source  # read when the profile is entered
        return memprof.profile(model, backend=backend)  # type: ignore[arg-type]

    return make


TORCH_PROFILER = "torch.profiler(profile_memory)"


def contexts_for(
    model: nn.Module | None, backend: str, memtracker: bool
) -> dict[str, tuple[Callable[[], Any], Callable[[Any], None] | None]]:
    """The contexts to time, by label."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    contexts: dict[str, tuple[Callable[[], Any], Callable[[Any], None] | None]] = {
        "no profiler": (nullcontext, None),
        "memprof": (_memprof_ctx(model, "auto"), lambda p: p.step()),
        TORCH_PROFILER: (
            lambda: torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True),
            lambda p: p.step(),
        ),
    }
    if backend == "all":
        contexts["memprof backend=dispatch"] = (_memprof_ctx(model, "dispatch"), lambda p: p.step())
        for source in ("recorder", "torch.profiler"):
            contexts[f"memprof events from {source}"] = (
                _memprof_ctx(model, "events", source),
                lambda p: p.step(),
            )
    elif backend != "auto":
        contexts["memprof"] = (_memprof_ctx(model, backend), lambda p: p.step())
    if memtracker and model is not None:
        from torch.distributed._tools.mem_tracker import MemTracker

        def make_tracker() -> Any:
            tracker = MemTracker()
            tracker.track_external(model)
            return tracker

        # MemTracker refuses a second iteration unless its module stats are reset in between.
        contexts["MemTracker"] = (make_tracker, lambda tracker: tracker.reset_mod_stats())
    return contexts


def measure(
    build: Callable[[], Workload],
    *,
    steps: int,
    repeats: int,
    backend: str = "auto",
    memtracker: bool = False,
) -> dict[str, tuple[float, float]]:
    """Best seconds per step (steps with memprof's replay; plus the exit) by context label."""
    model, step = build()
    step()
    contexts = contexts_for(model, backend, memtracker)
    # Repeats go round-robin over the contexts, so a machine whose load changes during the run
    # slows every context alike; each keeps its best.
    times: dict[str, tuple[float, float]] = {}
    for round_ in range(repeats):
        for label, (make_ctx, per_step) in contexts.items():
            slow = label == "MemTracker"
            if slow and round_ > 0:
                continue  # seconds to minutes a step: once is enough
            seconds, with_exit = time_step(
                step, make_ctx, steps=1 if slow else steps, per_step=per_step, label=label
            )
            best = times.get(label, (float("inf"), float("inf")))
            times[label] = (min(best[0], seconds), min(best[1], with_exit))
    events_backend.PREFERRED_SOURCE = "auto"
    return times


def print_detail(name: str, steps: int, times: dict[str, tuple[float, float]]) -> None:
    base = times["no profiler"][0]
    print(
        f"\n{name}  ({steps} timed steps; ratio of the steps (memprof: with its replay) |"
        f" of steps + exit)"
    )
    for label, (seconds, with_exit) in times.items():
        print(
            f"  {label:32s} {seconds * 1e3:9.1f} ms/step   {seconds / base:7.2f}x"
            f"   | {with_exit * 1e3:9.1f} ms/step {with_exit / base:7.2f}x"
        )
        if label in FLUSH:
            cpp, flush = FLUSH.pop(label)
            replay = REPLAY.pop(label)
            print(
                f"  {'':32s} its replay per step: {replay * 1e3:.1f} ms = {replay / base:.2f}x"
                f" (in wall time {flush * 1e3:.1f} ms, {cpp * 1e3:.1f} ms of it reading the"
                f" events from {SOURCES.pop(label)})"
            )


def sweep(
    names: list[str],
    found: dict[str, tuple[Callable[[], Workload], str | None]],
    *,
    steps: int,
    repeats: int,
) -> None:
    """One line per model: the unprofiled step, memprof's and torch.profiler's ratios."""
    print(
        f"\n{'model':20} {'step ms':>9} {'memprof':>8} {'torch.prof':>10} {'replay':>7}  "
        f"memprof <= torch.profiler"
    )
    worse = []
    for name in names:
        build, needs = found[name]
        if needs and importlib.util.find_spec(needs) is None:
            print(f"{name:20} skipped: needs {needs}")
            continue
        try:
            with _quiet():
                times = measure(build, steps=steps, repeats=repeats)
        except Exception as exc:  # a model that cannot run here is reported, not fatal
            print(f"{name:20} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            continue
        base = times["no profiler"][0]
        ours, theirs = times["memprof"][0] / base, times[TORCH_PROFILER][0] / base
        FLUSH.pop("memprof", None)
        replay = REPLAY.pop("memprof", 0.0) / base
        ok = ours <= theirs
        if not ok:
            worse.append(name)
        print(
            f"{name:20} {base * 1e3:9.1f} {ours:7.2f}x {theirs:9.2f}x {replay:6.2f}x  "
            f"{'yes' if ok else 'NO'}"
        )
        sys.stdout.flush()
    print(
        f"\nmemprof above torch.profiler on {len(worse)} of {len(names)}"
        + (f": {', '.join(worse)}" if worse else "")
    )


@contextlib.contextmanager
def _quiet() -> Any:
    """Warnings and the models' own prints (torch.profiler's, transformers') kept out."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def bookkeeping(steps: int = 1000) -> None:
    """memprof's own Python memory for a run of ``steps`` small steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(8, 64)
    tracemalloc.start()
    with memprof.profile(model, optimizer) as prof:
        for _ in range(steps):
            model(x).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            prof.step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    native = 0
    if prof._events is not None:
        native = getattr(prof._events.source, "buffer_bytes", 0)
    print(
        f"\nmemprof bookkeeping for {steps} steps: peak {peak / 2**20:.1f} MiB of Python "
        f"memory (tracemalloc) + {native / 2**20:.1f} MiB of event buffer in C++"
        f" ({prof.backend} backend), target < 50 MB"
    )


def main() -> None:
    found = workloads()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help=f"models to time: {', '.join(found)}"
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="one line per model (every model, or those of --only), memprof's default backend",
    )
    parser.add_argument("--memtracker", action="store_true", help="also time torch's MemTracker")
    parser.add_argument("--no-bookkeeping", action="store_true")
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="time the steps by this process's CPU time (default) or by wall time",
    )
    parser.add_argument(
        "--backend",
        choices=["auto", "events", "dispatch", "all"],
        default="auto",
        help="memprof's measurement backend(s) to time (all: dispatch, and the"
        " events backend from its recorder and from torch.profiler)",
    )
    args = parser.parse_args()
    unknown = [name for name in args.only or [] if name not in found]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(found)}")
    torch.set_num_threads(1)
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread, CPU; {steady_malloc()};"
        f" {args.clock} time"
    )
    if args.all:
        sweep(args.only or list(found), found, steps=args.steps, repeats=args.repeats)
        return
    for name in args.only or ["gpt2-4l", "mlp-600"]:
        build, _needs = found[name]
        times = measure(
            build,
            steps=args.steps,
            repeats=args.repeats,
            backend=args.backend,
            memtracker=args.memtracker,
        )
        print_detail(name, args.steps, times)
    if not args.no_bookkeeping:
        bookkeeping()


if __name__ == "__main__":
    main()
