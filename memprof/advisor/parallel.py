"""Independent fake runs on several cores: forked worker processes, the same bytes as one by one.

:func:`run_all` runs a list of fake runs (each a function returning a peak in bytes, or a tuple
of them for a run that predicts several rows, or raising
:class:`~memprof.errors.FakeRunError`) and returns their outcomes in order. Where it is safe
(Linux, ``fork``, CUDA not initialized here, more than one usable core that is idle now, or
as many as ``MEMPROF_FAKE_WORKERS=N`` asks, see :data:`WORKERS_ENV`), it forks one worker per
extra core (at most N - 1); the workers and this process
take runs from a shared queue, and a worker sends back plain numbers (a peak, or the error's
message).

Two rules keep every byte as a serial run's:

- A worker sets ``torch.set_num_threads(1)`` before anything else: GNU OpenMP is not fork-safe
  once the parent used its thread pool (the worker's first parallel region would hang), and
  with one thread ATen runs its loops inline.
- Nothing is measured outside this process: a one-thread worker would measure other scratch
  (some kernels take per-thread buffers). The runs go in rounds: this process runs the lowest
  run not done, measuring what a kernel needs, while the workers, and this process after it,
  try the later runs inside :func:`~memprof.tracking.kernel_corrections.measuring_nothing`,
  reading the measurements in the table and in this machine's file of them
  (:mod:`~memprof.tracking.kernel_cache`, which a worker reads with this process's thread
  count). A run that meets a kernel measured in neither stops and waits for a later round (it
  is tried again once its kernels are measured, or runs here as the lowest). A measurement
  depends on its key alone and an extrapolation on its own run's ops, so the order the runs
  are made in changes no byte. A worker that fails, or sends nothing for
  :data:`WORKER_TIMEOUT_S`, is stopped, and the runs it took are run here.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from memprof.errors import FakeRunError, KernelNotMeasured

#: The environment variable that sets N processes (``0`` or ``1``: this one alone). Unset, the
#: cores idle now decide (:func:`idle_cores`): on a machine busy with other work the workers
#: save no wall time and cost CPU (this project's shared 2-core machine, 6 engineers at work:
#: the 7B estimate for an RTX 4090 took 87.0 s wall, 88.9 s CPU with 2 processes against
#: 74.2 s, 73.4 s in one).
WORKERS_ENV = "MEMPROF_FAKE_WORKERS"
#: Seconds over which :func:`idle_cores` samples the CPUs' idle time.
IDLE_SAMPLE_S = 0.1
#: Seconds a worker may go without sending an answer (at least; 4x the slowest run seen here
#: when that is longer) before it is stopped and its runs are made here.
WORKER_TIMEOUT_S = 60.0
#: A worker's error message is cut to this many characters (a record stays one atomic pipe
#: write, as several workers write to one pipe).
_MESSAGE_CHARS = 1000

#: What a run returns: a peak in bytes, or several (a run that predicts several rows at once,
#: :func:`memprof.advisor.fake_prediction.fake_peaks`; None for a row it left to its own run).
Peaks = int | tuple[int | None, ...]
Outcome = Peaks | FakeRunError
P = TypeVar("P", bound=Peaks)

_in_worker = False


def processes(runs: int) -> int:
    """How many processes (this one included) share ``runs`` fake runs: the N of
    ``MEMPROF_FAKE_WORKERS=N``, else the cores idle now (:func:`idle_cores`), capped by the
    usable cores and the runs; 1 where forking is not safe (see :data:`WORKERS_ENV`)."""
    if _in_worker or runs < 2:
        return 1
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return 1
    if torch.cuda.is_initialized():  # a forked child cannot use CUDA its parent initialized
        return 1
    setting = os.environ.get(WORKERS_ENV, "").strip()
    if setting and not setting.isdigit():
        return 1
    usable = len(os.sched_getaffinity(0))
    wanted = int(setting) if setting else idle_cores(usable)
    return max(1, min(usable, wanted, runs))


def idle_cores(usable: int) -> int:
    """How many of the ``usable`` cores sat idle over the last :data:`IDLE_SAMPLE_S` seconds
    (``/proc/stat``; this process's own core counts as idle, as it waits here), at least 1."""
    first = _cpu_times()
    time.sleep(IDLE_SAMPLE_S)
    second = _cpu_times()
    if first is None or second is None:
        return 1
    busy, total = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return 1
    cores = os.cpu_count() or usable
    idle = cores * (total - busy) / total
    return max(1, min(usable, int(idle + 0.5)))


def _cpu_times() -> tuple[int, int] | None:
    """All CPUs' (busy, total) jiffies from ``/proc/stat``; None where it cannot be read."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 4:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user .. steal (guest time is inside user already)
    return total - idle, total


def run_all(runs: Sequence[Callable[[], P]],
            costs: Sequence[float] | None = None,
            imports: Sequence[str] = ()) -> list[P | FakeRunError]:
    """Each run's peak, or the :class:`FakeRunError` it raised, in order (see the module
    docstring for how they are shared out). ``costs`` (one per run, relative) has the
    processes take the costliest runs first, so that no long run is left for the end while
    the others wait; it changes no result. ``imports``: modules the runs import, imported
    here before any worker is forked, so that no worker imports them again (peft: 1.5 to 2.5
    CPU seconds a process here)."""
    done: dict[int, Outcome] = {}
    workers = processes(len(runs)) - 1
    if workers:
        for name in imports:
            with contextlib.suppress(ImportError):  # the run that needs it will say so
                importlib.import_module(name)
    missing: dict[int, list[str]] = {}  # a run tried without measuring: the keys it lacked
    while len(done) < len(runs):
        pending = [i for i in range(len(runs)) if i not in done]
        lowest, rest = pending[0], pending[1:]
        ready = [i for i in rest if i not in missing or _measured(missing[i])]
        if costs is not None:
            ready.sort(key=lambda i: -costs[i])
        if workers and ready:
            _round(runs, lowest, ready, min(workers, len(ready)), done, missing)
        else:
            done[lowest] = _outcome(runs[lowest])
    return [done[i] for i in range(len(runs))]  # type: ignore[misc]  # what each run returns


def _measured(keys: list[str]) -> bool:
    from memprof.tracking import kernel_corrections

    return bool(keys) and kernel_corrections.measured(keys)


def _outcome(run: Callable[[], Peaks]) -> Outcome:
    try:
        return run()
    except FakeRunError as exc:
        return exc


def _attempt(run: Callable[[], Peaks]) -> Outcome | list[str]:
    """The run's outcome with no kernel measured, or the keys it lacked (none where it failed in
    a way only a run here, measuring, should report)."""
    from memprof.tracking import kernel_corrections

    with kernel_corrections.measuring_nothing() as missed:
        try:
            peak = run()
        except KernelNotMeasured:
            return missed
        except FakeRunError as exc:
            return missed if missed else FakeRunError(str(exc)[:_MESSAGE_CHARS])
        except Exception:
            return missed
    return missed if missed else peak


def _round(runs: Sequence[Callable[[], Peaks]], lowest: int, ready: list[int], workers: int,
           done: dict[int, Outcome], missing: dict[int, list[str]]) -> None:
    """One round: this process runs ``lowest`` as a serial run would (measuring), while
    ``workers`` forked processes, and then this one, try the ``ready`` runs without measuring.
    A run tried so reads only kernels measured for runs before it, as in a serial run."""
    tickets_r, tickets_w = os.pipe()
    answers_r, answers_w = os.pipe()
    # every run's index, 4 bytes each, written before any process reads: a read of 4 bytes
    # from a pipe takes one index whole, so each run is taken exactly once
    with os.fdopen(tickets_w, "wb") as queue:
        queue.write(b"".join(i.to_bytes(4, "little") for i in ready))
    sys.stdout.flush()
    sys.stderr.flush()
    children: list[int] = []
    try:
        # the objects made so far stay out of the workers' garbage collections, which would
        # otherwise write to (and so copy) every page holding them
        gc.freeze()
        try:
            for _ in range(workers):
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the worker (coverage does not follow forks)
                    _worker(runs, tickets_r, answers_r, answers_w)
                children.append(pid)
        finally:
            gc.unfreeze()
        os.close(answers_w)
        answers_w = -1
        start = time.perf_counter()
        done[lowest] = _outcome(runs[lowest])
        slowest = time.perf_counter() - start
        while (index := _take(tickets_r)) is not None:
            start = time.perf_counter()
            _note(index, _attempt(runs[index]), done, missing)
            slowest = max(slowest, time.perf_counter() - start)
        for index, answer in _answers(answers_r, max(WORKER_TIMEOUT_S, 4 * slowest)):
            _note(index, answer, done, missing)
    finally:
        for fd in (tickets_r, answers_r, answers_w):
            if fd >= 0:
                os.close(fd)
        for pid in children:
            _stop(pid)
    for index in ready:  # taken by a worker that never answered: to run here, measuring
        if index not in done and index not in missing:
            missing[index] = []


def _note(index: int, answer: Outcome | list[str], done: dict[int, Outcome],
          missing: dict[int, list[str]]) -> None:
    if isinstance(answer, list):
        missing[index] = answer
    else:
        done[index] = answer


def _take(tickets: int) -> int | None:
    data = os.read(tickets, 4)
    return int.from_bytes(data, "little") if len(data) == 4 else None


def _worker(runs: Sequence[Callable[[], Peaks]], tickets: int, answers_r: int,
            answers_w: int) -> None:  # pragma: no cover - runs in the forked child
    """A forked worker's whole life: one thread, runs from the queue, answers, exit."""
    global _in_worker
    code = 1
    try:
        from memprof.tracking import kernel_cache

        kernel_cache.pin()  # the parent's measurements (made with its thread count)
        torch.set_num_threads(1)  # before any op: no OpenMP region in a forked child
        _in_worker = True
        os.close(answers_r)
        while (index := _take(tickets)) is not None:
            outcome = _attempt(runs[index])
            if isinstance(outcome, list):
                record: dict[str, object] = {"index": index, "missing": _fitting(outcome)}
            elif isinstance(outcome, FakeRunError):
                record = {"index": index, "error": str(outcome)}
            else:
                record = {"index": index, "peak": outcome if isinstance(outcome, tuple)
                          else int(outcome)}
            os.write(answers_w, _framed(record))
        code = 0
    finally:
        os._exit(code)


def _fitting(keys: list[str]) -> list[str]:
    """The first keys, as many as keep a record one atomic pipe write (under 4 KiB)."""
    kept: list[str] = []
    for key in keys:
        if sum(len(k) + 4 for k in kept) + len(key) > 3000:
            break
        kept.append(key)
    return kept


def _framed(record: dict[str, object]) -> bytes:
    body = json.dumps(record).encode()
    return len(body).to_bytes(4, "little") + body


def _answers(answers: int, timeout_s: float) -> list[tuple[int, Outcome | list[str]]]:
    """The workers' answers, read until every worker has closed its end (or none sent anything
    for ``timeout_s``: a worker that hangs)."""
    buffer = b""
    while True:
        ready, _, _ = select.select([answers], [], [], timeout_s)
        if not ready:
            break
        chunk = os.read(answers, 65536)
        if not chunk:
            break
        buffer += chunk
    found: list[tuple[int, Outcome | list[str]]] = []
    while len(buffer) >= 4:
        size = int.from_bytes(buffer[:4], "little")
        if len(buffer) < 4 + size:
            break
        record = json.loads(buffer[4:4 + size])
        buffer = buffer[4 + size:]
        index = int(record["index"])
        if "peak" in record:
            peak = record["peak"]
            found.append((index, tuple(peak) if isinstance(peak, list) else int(peak)))
        elif "error" in record:
            found.append((index, FakeRunError(str(record["error"]))))
        else:
            found.append((index, [str(k) for k in record["missing"]]))
    return found


def _stop(pid: int) -> None:
    """Reap a worker, killing it first if it is still running."""
    with contextlib.suppress(ChildProcessError):
        finished, _ = os.waitpid(pid, os.WNOHANG)
        if finished == 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
