"""The fake runs' shortcuts give the bytes of the runs they shorten (#24: fast, byte-identical)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from workloads import gpt2_workload, llama_workload, mlp_workload

from memprof.advisor import (
    Workload,
    advise,
    changes_for,
    fake_prediction,
    parallel,
    pruning,
    qlora,
    read_facts,
)
from memprof.advisor.fake_prediction import fake_peak
from memprof.advisor.workload import baseline, seeded
from memprof.errors import FakeRunError
from memprof.estimate import estimate_step


def _optimizer_changes(w: Workload) -> list[Any]:
    changes = changes_for(read_facts(baseline(w).profile))
    return [
        c
        for c in changes
        if c.applicable
        and c.apply is not None
        and (
            (c.technique in ("optimizer", "quantization") and "to" in c.options)
            or c.options.get("grad_scaler")
        )
    ]


def _peak(w: Workload, applies: list[Any], *, skip: bool, monkeypatch: pytest.MonkeyPatch) -> int:
    with monkeypatch.context() as m:
        m.setattr(fake_prediction, "SKIP_TRACKED_UPDATES", skip)
        with seeded():
            return fake_peak(w, applies)


@pytest.mark.parametrize("foreach", [False, True])
def test_skipping_the_optimizers_tracked_updates_keeps_every_byte(
    monkeypatch: pytest.MonkeyPatch, foreach: bool
) -> None:
    # GIVEN a small GPT-2 whose AdamW steps per tensor or with foreach, and the changes that
    # act on the optimizer (SGD, momentum, Adafactor, 8-bit AdamW, fp16 with a GradScaler)
    w = gpt2_workload()
    w.optimizer.param_groups[0]["foreach"] = foreach
    picked = _optimizer_changes(w)
    assert {c.options.get("to") for c in picked} >= {"SGD", "Adafactor", "AdamW8bit"}
    for applies in ([], *([c.apply] for c in picked)):
        # WHEN each is run with its optimizer's in-place updates skipped, and with every op
        fast = _peak(w, applies, skip=True, monkeypatch=monkeypatch)
        slow = _peak(w, applies, skip=False, monkeypatch=monkeypatch)
        # THEN the peaks are the same bytes
        assert fast == slow


def test_the_optimizer_step_skips_only_updates_of_tensors_the_ledger_tracks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN an MLP with AdamW stepping per tensor: its step updates parameters and state in
    # place, and makes tensors (sqrt, div)
    w = mlp_workload()
    from memprof.tracking import ledger_mode

    ledger_dispatch = ledger_mode.LedgerMode.__torch_dispatch__
    reached: list[str] = []

    def recording(self: Any, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        reached.append(func.overloadpacket.__name__)
        return ledger_dispatch(self, func, types, args, kwargs)

    monkeypatch.setattr(ledger_mode.LedgerMode, "__torch_dispatch__", recording)
    # WHEN its fake run steps the optimizer with the tracked updates skipped, then with all ops
    _peak(w, [], skip=True, monkeypatch=monkeypatch)
    fast, reached[:] = set(reached), []
    _peak(w, [], skip=False, monkeypatch=monkeypatch)
    slow = set(reached)
    # THEN the in-place updates reach the ledger (and FakeTensor) only in the full run, and the
    # ops that make tensors reach it in both
    updates = {"mul_", "lerp_", "addcdiv_"}
    assert updates <= slow
    assert not updates & fast
    assert {"sqrt", "div"} <= fast & slow


class _Tied(nn.Module):
    """Two projections sharing one weight (a weight tied to two QLoRA targets), one more, and
    the output head (not a target)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 64)
        self.again = nn.Linear(64, 64)
        self.again.weight = self.up.weight
        self.mid = nn.Linear(64, 64)
        self.head = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.again(torch.relu(self.up(x))))
        return self.head(torch.relu(self.mid(x)))


def test_qlora_fake_runs_make_nf4_weights_without_quantizing_and_keep_every_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a model already on fake tensors (as `memprof estimate` builds it), one weight tied
    # to two targets, and its QLoRA changes
    step = estimate_step(_Tied, batch=lambda: torch.randn(32, 64), dtype="fp32", device="cpu")
    w = Workload(step.model, step.optimizer, step.batch, step_fn=step.loss)
    picked = [
        c
        for c in changes_for(read_facts(step.profile))
        if c.technique == "qlora" and c.applicable and c.apply is not None
    ]
    assert len(picked) == 2
    calls: list[int] = []
    module = qlora.nf4_module()
    convert = module.to_nf4

    def counting(*args: Any) -> Any:
        calls.append(1)
        return convert(*args)

    monkeypatch.setattr(module, "to_nf4", counting)
    # WHEN each runs with its NF4 weights made directly, then quantized under fake tensors
    direct = [_peak(w, [c.apply], skip=True, monkeypatch=monkeypatch) for c in picked]
    made = len(calls)
    with monkeypatch.context() as m:
        m.setattr(qlora, "fake_nf4", lambda t, block, scalers: counting(t, block, scalers))
        quantized = [_peak(w, [c.apply], skip=True, monkeypatch=monkeypatch) for c in picked]
    # THEN the peaks are the same bytes, and only the second runs quantized (3 targets each)
    assert direct == quantized
    assert made == 0
    assert len(calls) == 2 * 3


def test_a_plan_of_one_change_reuses_that_rows_fake_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN an MLP's profile and a budget a little under its peak (one change fits)
    import memprof.advisor as advisor
    from memprof.advisor import budget_plan

    w = mlp_workload()
    profile = baseline(w).profile
    budget = int(profile.peak().total_bytes * 0.9)
    runs: list[int] = []
    real_peak = fake_prediction.fake_peak

    def counting(*args: Any, **kwargs: Any) -> int:
        runs.append(1)
        return real_peak(*args, **kwargs)

    monkeypatch.setattr(fake_prediction, "fake_peak", counting)
    # WHEN it is advised with the rows' runs reused by the plan, then with every plan run made
    fast = advisor.advise(profile, workload=w, simulate=False, budget=budget)
    reused = len(runs)
    runs.clear()
    plan_runner = budget_plan.plan_runner
    monkeypatch.setattr(
        budget_plan, "plan_runner", lambda model, options, ran=None: plan_runner(model, options)
    )
    slow = advisor.advise(profile, workload=w, simulate=False, budget=budget)
    # THEN the plan is the same, checked by a fake run of one change, run once fewer
    assert fast.plan == slow.plan
    assert fast.plan["fits"] and fast.plan["checked_by"] == "fake run"
    assert len(fast.plan["changes"]) == 1
    assert reused == len(runs) - 1


def _row_peaks(
    w: Workload, profile: Any, monkeypatch: pytest.MonkeyPatch, workers: str
) -> list[Any]:
    """Every row's fake-run peak (or failure) of ``w`` with ``workers`` processes, from an
    empty kernel table (so some runs need scratch measured)."""
    import memprof.advisor as advisor
    from memprof.tracking import kernel_corrections

    changes = changes_for(read_facts(profile))
    faked: dict[int, str | None] = {}
    with monkeypatch.context() as m:
        m.setenv(parallel.WORKERS_ENV, workers)
        m.setattr(parallel.os, "sched_getaffinity", lambda pid: {0, 1})
        m.setattr(kernel_corrections, "TABLE", kernel_corrections.KernelCorrections())
        reference = advisor.fake_predict(w, changes, faked)
    return [reference] + [
        (c.technique, c.options, c.predicted_peak, faked.get(id(c)))
        for c in changes
        if id(c) in faked
    ]


def _counted_answers(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """A list that gets every answer the worker processes send back from now on."""
    answers: list[Any] = []
    read_answers = parallel._answers

    def counting(*args: Any) -> Any:
        found = read_answers(*args)
        answers.extend(answer for _, answer in found)
        return found

    monkeypatch.setattr(parallel, "_answers", counting)
    return answers


def test_rows_run_on_worker_processes_give_the_bytes_of_rows_run_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a small GPT-2's changes, and a count of the answers worker processes send back
    w = gpt2_workload()
    profile = baseline(w).profile  # one profile: checkpointing picks blocks by their time
    answers = _counted_answers(monkeypatch)
    # WHEN every row is run by fake runs in this process alone, then on two processes
    alone = _row_peaks(w, profile, monkeypatch, "0")
    assert answers == []
    shared = _row_peaks(w, profile, monkeypatch, "2")
    # THEN every row has the same bytes (or the same failure); a worker finished some rows, and
    # sent others back for lack of a kernel measurement (made here, then)
    assert len(alone) > 20
    assert shared == alone
    assert any(isinstance(a, int) for a in answers)
    assert any(isinstance(a, list) and a for a in answers)


def test_workers_read_the_kernel_measurements_on_disk_and_give_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
) -> None:
    # GIVEN a small GPT-2's rows, their kernels measured once into a cache directory
    from memprof.tracking import kernel_cache

    w = gpt2_workload()
    profile = baseline(w).profile
    monkeypatch.setenv(kernel_cache.ENABLED_ENV, "1")
    monkeypatch.setenv(kernel_cache.DIR_ENV, str(tmp_path))
    kernel_cache.forget()
    alone = _row_peaks(w, profile, monkeypatch, "0")
    answers = _counted_answers(monkeypatch)
    # WHEN a new process (an empty table, the file read again) runs them on two processes
    kernel_cache.forget()
    shared = _row_peaks(w, profile, monkeypatch, "2")
    # THEN the same bytes, and no run was sent back for lack of a measurement
    assert shared == alone
    assert any(isinstance(a, int) for a in answers)
    assert not [a for a in answers if isinstance(a, list)]
    kernel_cache.forget()


def test_a_runs_extrapolated_scratch_does_not_depend_on_the_runs_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN ops above the measuring limit (extrapolated from the largest measured key of the
    # same op), and a 16-bit run whose matmuls measure other scratch than fp32 ones
    from memprof.tracking import kernel_corrections

    monkeypatch.setattr(kernel_corrections, "TABLE", kernel_corrections.KernelCorrections())
    monkeypatch.setattr(kernel_corrections, "MEASURE_LIMIT_BYTES", 40_000)
    w = gpt2_workload()
    changes = changes_for(read_facts(baseline(w).profile))
    autocast = next(c for c in changes if c.options.get("mode") == "autocast"
                    and c.apply is not None)
    # WHEN the unchanged step runs first, then after the 16-bit one
    first = fake_peak(w)
    fake_peak(w, [autocast.apply])
    # THEN the same bytes: each run extrapolates from its own ops
    assert fake_peak(w) == first


def test_measuring_nothing_stops_a_run_at_a_kernel_not_measured_yet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN an empty kernel table and an MLP's fake run (its matmuls are measured kernels)
    from memprof.errors import KernelNotMeasured
    from memprof.tracking import kernel_corrections

    monkeypatch.setattr(kernel_corrections, "TABLE", kernel_corrections.KernelCorrections())
    w = mlp_workload()
    # WHEN it runs measuring nothing, then as usual, then measuring nothing again
    with kernel_corrections.measuring_nothing() as missed, pytest.raises(KernelNotMeasured):
        fake_peak(w)
    assert missed and not kernel_corrections.measured(missed)
    peak = fake_peak(w)
    with kernel_corrections.measuring_nothing() as again:
        assert fake_peak(w) == peak
    # THEN the first stopped at the kernel it lacked, which the usual run measured; the last
    # needed nothing new
    assert kernel_corrections.measured(missed)
    assert again == []


def _answer(i: int) -> Any:
    def run() -> int:
        if parallel._in_worker and i == 1:
            time.sleep(120)  # a worker that hangs
        if parallel._in_worker and i == 2:
            os._exit(3)  # a worker that dies
        if i == 3:
            raise FakeRunError("the fake run failed: row 3")
        if not parallel._in_worker:
            time.sleep(0.3)  # this process is slow: the workers take the other runs first
        return 1000 + i

    return run


@pytest.mark.parametrize("workers", ["2", "3"])
def test_runs_a_worker_never_answers_are_run_in_this_process(
    monkeypatch: pytest.MonkeyPatch, workers: str
) -> None:
    # GIVEN runs of which one hangs in a worker, one kills its worker, one fails (a FakeRunError)
    monkeypatch.setenv(parallel.WORKERS_ENV, workers)
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr(parallel, "WORKER_TIMEOUT_S", 2.0)
    # WHEN they run on worker processes
    start = time.perf_counter()
    outcomes = parallel.run_all([_answer(i) for i in range(6)])
    # THEN every run has its answer, the failure its message, and the hung worker was stopped
    assert [o if isinstance(o, int) else str(o) for o in outcomes] == [
        1000, 1001, 1002, "the fake run failed: row 3", 1004, 1005]
    assert time.perf_counter() - start < 60
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # no worker left behind


def _cpu_samples(monkeypatch: pytest.MonkeyPatch, busy_share: float) -> None:
    """/proc/stat as it reads on a machine whose 4 CPUs are busy ``busy_share`` of the time."""
    samples = iter([(0, 0), (int(400 * busy_share), 400)])
    monkeypatch.setattr(parallel, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(parallel, "IDLE_SAMPLE_S", 0.0)


def test_the_costliest_runs_are_taken_first_and_outcomes_stay_in_order(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
) -> None:
    # GIVEN runs that note which process started them, the last one the costliest
    monkeypatch.setenv(parallel.WORKERS_ENV, "2")
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {0, 1})
    log = tmp_path / "started"

    def run(i: int) -> Callable[[], int]:
        def go() -> int:
            with open(log, "a") as out:
                out.write(f"{'worker' if parallel._in_worker else 'here'} {i}\n")
            if not parallel._in_worker:
                time.sleep(0.5)  # this process is slow: the worker takes the tickets
            return 100 + i
        return go

    # WHEN they run on two processes
    outcomes = parallel.run_all([run(i) for i in range(4)], costs=[1, 1, 1, 5])
    # THEN the outcomes are in the runs' order; this process ran the lowest, and the worker
    # took the costliest ticket first
    assert outcomes == [100, 101, 102, 103]
    started = [line.split() for line in log.read_text().splitlines()]
    assert ["here", "0"] in started
    assert [i for who, i in started if who == "worker"] == ["3", "1", "2"]


def test_workers_find_the_runs_imports_made_and_this_process_objects_frozen(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
) -> None:
    # GIVEN runs that note, in the process they run in, whether a module no one imported yet
    # is loaded and how many objects the garbage collector leaves alone (frozen)
    import gc
    import sys

    module = "xml.dom.minidom"
    assert module not in sys.modules
    monkeypatch.setenv(parallel.WORKERS_ENV, "2")
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {0, 1})
    log = tmp_path / "seen"

    def run(i: int) -> Callable[[], int]:
        def go() -> int:
            with open(log, "a") as out:
                out.write(f"{'worker' if parallel._in_worker else 'here'} "
                          f"{int(module in sys.modules)} {gc.get_freeze_count()}\n")
            if not parallel._in_worker:
                time.sleep(0.5)  # this process is slow: the worker takes the tickets
            return i
        return go

    # WHEN they run on two processes, the module named as one the runs import
    try:
        outcomes = parallel.run_all([run(i) for i in range(4)], imports=[module])
    finally:
        sys.modules.pop(module, None)
    # THEN each run found it imported; the worker's runs found this process's objects frozen,
    # and this process has them back in its collections
    assert outcomes == [0, 1, 2, 3]
    seen = [line.split() for line in log.read_text().splitlines()]
    assert all(imported == "1" for _, imported, _ in seen)
    assert [who for who, _, _ in seen].count("worker") >= 1
    assert all(int(frozen) > 1000 for who, _, frozen in seen if who == "worker")
    assert gc.get_freeze_count() == 0


def test_workers_on_idle_cores_or_where_asked_and_forking_is_safe(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a Linux machine with 4 usable cores
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(parallel.sys, "platform", "linux")
    # WHEN / THEN: unset, one process per core idle now (this one's included)
    monkeypatch.delenv(parallel.WORKERS_ENV, raising=False)
    _cpu_samples(monkeypatch, busy_share=0.25)  # one core busy with other work
    assert parallel.processes(10) == 3
    _cpu_samples(monkeypatch, busy_share=1.0)  # every core busy: this process alone
    assert parallel.processes(10) == 1
    _cpu_samples(monkeypatch, busy_share=0.0)
    assert parallel.processes(2) == 2
    monkeypatch.setattr(parallel, "_cpu_times", lambda: None)  # no /proc/stat: alone
    assert parallel.processes(10) == 1
    # the environment variable decides where set: at most one per core and run
    monkeypatch.setenv(parallel.WORKERS_ENV, "0")
    assert parallel.processes(10) == 1
    monkeypatch.setenv(parallel.WORKERS_ENV, "8")
    assert parallel.processes(10) == 4
    assert parallel.processes(3) == 3
    assert parallel.processes(1) == 1
    monkeypatch.setenv(parallel.WORKERS_ENV, "2")
    assert parallel.processes(10) == 2
    # none once CUDA is initialized, on one core, or off Linux
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_initialized", lambda: True)
        assert parallel.processes(10) == 1
    with monkeypatch.context() as m:
        m.setattr(parallel.os, "sched_getaffinity", lambda pid: {0})
        assert parallel.processes(10) == 1
    monkeypatch.setattr(parallel.sys, "platform", "darwin")
    assert parallel.processes(10) == 1


def _state_layout(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[Any]:
    index = {p: i for i, p in enumerate(params)}
    return [(index[p], [(name, tuple(v.shape), v.stride(), v.dtype, v.device)
                        if isinstance(v, torch.Tensor) else (name, v)
                        for name, v in values.items()])
            for p, values in optimizer.state.items()]


@pytest.mark.parametrize(("kind", "options"), [
    (torch.optim.AdamW, {}), (torch.optim.Adam, {"amsgrad": True}),
    (torch.optim.AdamW, {"foreach": True, "weight_decay": 0.1}),
])
def test_adams_state_made_without_a_step_is_the_state_its_first_step_makes(
    kind: type, options: dict[str, Any]
) -> None:
    # GIVEN a model with a frozen layer and a channels-last convolution, and two optimizers
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
                          nn.Linear(5, 2))
    model[0].to(memory_format=torch.channels_last)
    model[3].requires_grad_(False)
    params = list(model.parameters())
    stepped, direct = kind(params, **options), kind(params, **options)
    # WHEN one takes a real first step on zero gradients and the other is given its state
    for p in params:
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    stepped.step()
    made = fake_prediction._direct_state(direct)
    # THEN both hold the same tensors (names, order, shapes, strides, dtypes, devices)
    assert made
    assert _state_layout(direct, params) == _state_layout(stepped, params)
    assert len(direct.state) == 4  # the frozen layer has none


@pytest.mark.parametrize("options", [{}, {"amsgrad": True, "foreach": True}])
def test_adams_state_on_fake_parameters_is_made_without_a_fake_op(
    options: dict[str, Any]
) -> None:
    # GIVEN a fake copy of a model with a frozen layer and a channels-last convolution
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
                          nn.Linear(5, 2))
    model[0].to(memory_format=torch.channels_last)
    model[3].requires_grad_(False)
    w = Workload(model, torch.optim.AdamW(model.parameters(), **options), torch.zeros(1, 3, 8, 8))
    mode = fake_prediction.fake_mode()
    with mode:
        state = fake_prediction.fake_state(w, mode)
        params = list(state.model.parameters())
        stepped, direct = state.build_optimizer(), state.build_optimizer()
        for p in params:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        stepped.step()  # (reads no value: a fake step makes the state's tensors alone)
        # WHEN the other is given its state directly, counting the fake ops that makes
        ops = [0]
        dispatch = FakeTensorMode.__torch_dispatch__

        def counting(self: Any, func: Any, types: Any, a: Any = (), kw: Any = None) -> Any:
            ops[0] += 1
            return dispatch(self, func, types, a, kw)

        FakeTensorMode.__torch_dispatch__ = counting  # type: ignore[method-assign]
        try:
            made = fake_prediction._direct_state(direct)
        finally:
            FakeTensorMode.__torch_dispatch__ = dispatch  # type: ignore[method-assign]
    # THEN it dispatched none, and holds the stepped one's tensors: fake ones of its mode,
    # each with a storage of its own sized as the parameter's
    assert made and ops[0] == 0
    assert _state_layout(direct, params) == _state_layout(stepped, params)
    assert len(direct.state) == 4
    made_tensors = [v for values in direct.state.values() for v in values.values()]
    assert all(type(v) is FakeTensor and v.fake_mode is mode for v in made_tensors)
    assert len({id(v.untyped_storage()) for v in made_tensors}) == len(made_tensors)
    for p, values in direct.state.items():
        assert values["exp_avg"].untyped_storage().nbytes() == p.untyped_storage().nbytes()


def test_other_optimizers_get_their_state_from_the_warm_up_step() -> None:
    model = nn.Linear(4, 4)
    for optimizer in (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                      torch.optim.Adam(model.parameters(), differentiable=True)):
        assert not fake_prediction._direct_state(optimizer)
        assert not optimizer.state


class _SavesItsOutput(torch.autograd.Function):
    """A custom op whose forward makes autograd nodes (grad on) before it saves its output."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            y = x.detach().requires_grad_() * 2  # a node numbered after this op's own
        out = y.detach().exp()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return grad * out


class _DeadBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.randn(32, 32))
        self.lin = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = -torch.exp(self.A_log)  # exp saves its own output, mul its inputs
        b = _SavesItsOutput.apply(self.A_log) * a  # noqa: F841 - never reaches backward
        return self.lin(x)


def test_a_fake_runs_saved_tensors_keep_no_graph_alive() -> None:
    # GIVEN a fake model whose forward leaves branches that never reach backward: ops that
    # save their own output (exp, a custom Function) and ops that save their inputs (mul)
    import weakref

    import memprof

    with fake_prediction.fake_mode():
        model = nn.Sequential(_DeadBranches(), _DeadBranches())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(4, 32)
        # WHEN it is profiled for two steps (the saved inputs are given back undetached)
        with memprof.profile(model, optimizer) as prof:
            for _ in range(2):
                model(x).sum().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                prof.step()
    # THEN live bytes between steps stay the parameters and the batch, and the model dies
    # with its last reference, without the garbage collector (no cycle through a graph)
    persistent = sum(p.untyped_storage().nbytes() for p in model.parameters())
    assert [s.end_bytes for s in prof.profile.steps_stats] == [persistent + x.nbytes] * 2
    param, module = weakref.ref(model[0].A_log), weakref.ref(model)
    del model, optimizer
    assert module() is None
    assert param() is None


@pytest.mark.parametrize("foreach", [False, True])
def test_rows_that_change_only_the_optimizer_share_one_backward_and_keep_every_byte(
    foreach: bool,
) -> None:
    # GIVEN a small GPT-2 with AdamW (per tensor or foreach) and every applicable change
    w = gpt2_workload()
    w.optimizer.param_groups[0]["foreach"] = foreach
    changes = [c for c in changes_for(read_facts(baseline(w).profile))
               if c.applicable and c.apply is not None]
    # WHEN the rows are predicted together, sharing the unchanged run's forward and backward
    with seeded():
        reference, shared = fake_prediction.fake_peaks(w, [[c.apply] for c in changes])
    # THEN the changes of optimizer (SGD, momentum, Adafactor, 8-bit AdamW, ZeRO-1) are
    # composed, the others left to their own runs
    composed = {(c.technique, c.options.get("to") or c.options.get("stage"))
                for c, peak in zip(changes, shared, strict=True) if peak is not None}
    assert composed >= {("optimizer", "SGD"), ("optimizer", "SGD_momentum"),
                        ("optimizer", "Adafactor"), ("quantization", "AdamW8bit"),
                        ("sharding", "ZeRO-1")}
    assert not {t for t, _ in composed} & {"lora", "qlora", "checkpointing", "mixed_precision",
                                           "pruning", "offload"}
    assert ("sharding", "ZeRO-2") not in composed
    # AND each composed peak, and the unchanged one, are the bytes of the row's own run
    with seeded():
        assert reference == fake_peak(w)
    for c, peak in zip(changes, shared, strict=True):
        if peak is not None:
            with seeded():
                assert peak == fake_peak(w, [c.apply]), (c.technique, c.options)


def test_a_shared_backward_leaves_a_row_to_its_own_run_when_a_parameter_gets_no_gradient(
) -> None:
    # GIVEN an MLP whose last layer the loss never reaches: a real run gives it no state
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 4))
    w = Workload(model, torch.optim.AdamW(model.parameters()), torch.randn(4, 8),
                 step_fn=lambda m, x: m[:3](x).sum())
    changes = [c for c in changes_for(read_facts(baseline(w).profile))
               if c.applicable and c.apply is not None and c.technique == "optimizer"]
    assert changes
    # WHEN the optimizer rows are predicted sharing one backward
    with seeded():
        reference, shared = fake_prediction.fake_peaks(w, [[c.apply] for c in changes])
    # THEN none is composed (its own run takes two profiled steps), and the unchanged peak is
    # its own run's
    assert shared == [None] * len(changes)
    with seeded():
        assert reference == fake_peak(w)


def test_a_run_of_several_peaks_comes_back_from_a_worker_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN runs of which one predicts several rows (a peak, or None for a row left alone)
    monkeypatch.setenv(parallel.WORKERS_ENV, "2")
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {0, 1})

    def slow_here() -> int:
        if not parallel._in_worker:
            time.sleep(0.5)  # this process is slow: the worker takes the other tickets
        return 7

    def several() -> tuple[int | None, ...]:
        return (2**40 + 1, None, 3)

    # WHEN a worker runs it
    outcomes = parallel.run_all([slow_here, several, several])
    # THEN each comes back as the run returned it
    assert outcomes == [7, (2**40 + 1, None, 3), (2**40 + 1, None, 3)]


def test_advise_composes_the_optimizer_rows_in_one_shared_run_with_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a small GPT-2's profile and its rows, each predicted by its own fake run
    w = gpt2_workload()
    profile = baseline(w).profile
    changes = [c for c in changes_for(read_facts(profile)) if c.applicable and c.apply is not None]
    own = {}
    for c in changes:
        with seeded():
            own[(c.technique, str(c.options))] = fake_peak(w, [c.apply])
    shared = []
    real = fake_prediction.fake_peaks

    def spying(*args: Any, **kwargs: Any) -> Any:
        reference, peaks = real(*args, **kwargs)
        shared.extend(p for p in peaks if p is not None)
        return reference, peaks

    monkeypatch.setattr(fake_prediction, "fake_peaks", spying)
    # WHEN the advisor predicts every row by fake runs
    from memprof.advisor import advise

    advice = advise(profile, workload=w, simulate=False)
    # THEN some rows came from the shared run, and every row has its own run's bytes
    assert len(shared) >= 5
    rows = {(r["technique"], str(r["options"])): r for r in advice.rows}
    for key, peak in own.items():
        assert rows[key]["predicted_by"] == "fake run"
        assert rows[key]["predicted_peak_bytes"] == peak, key


def test_the_batch_rows_fake_runs_share_out_with_the_other_rows_and_keep_their_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN an MLP's profile, and the advisor's parallel runs counted
    from memprof.advisor import advise, batch, batch_rows

    w = mlp_workload()
    profile = baseline(w).profile
    calls: list[int] = []
    real = parallel.run_all

    def counting(runs: Any, costs: Any = None, imports: Any = ()) -> Any:
        calls.append(len(runs))
        return real(runs, costs, imports)

    monkeypatch.setattr(parallel, "run_all", counting)
    # WHEN every row is predicted by fake runs
    advice = advise(profile, workload=w, simulate=False)
    # THEN the batch rows' runs were made in the one call with the other rows'
    assert len(calls) == 1
    # AND each batch row has the bytes of its own fake run at its batch
    size = batch.batch_size(w.batch)
    assert size is not None
    rows = [r for r in advice.rows if r["technique"] == "batch" and r["predicted_by"] == "fake run"]
    assert len(rows) == 2
    for row in rows:
        target = row["options"].get("micro_batch") or row["options"]["batch"]
        with seeded():
            own = fake_peak(w, [batch_rows.resize_apply(target, size)])
        assert row["predicted_peak_bytes"] == own, row["options"]


@pytest.mark.parametrize("make", [gpt2_workload, llama_workload])
def test_pruning_to_dense_zeros_takes_the_unchanged_peak_which_its_own_run_gives(
    make: Callable[[], Workload]
) -> None:
    # GIVEN a small GPT-2 or Llama and its row of magnitude pruning then prune.remove
    w = make()
    with seeded():
        profile = baseline(w).profile
    dense = next(c for c in changes_for(read_facts(profile))
                 if c.technique == "pruning" and c.options.get("state") == "dense zeros")
    # WHEN the row's own fake run is made, and advise takes its peak from the unchanged run
    assert dense.apply is not None and dense.unchanged_step is not None
    with seeded():
        own, unchanged = fake_peak(w, [dense.apply]), fake_peak(w)
    advice = advise(profile, workload=w, simulate=False)
    row = next(r for r in advice.rows
               if r.technique == "pruning" and r.options.get("state") == "dense zeros")
    # THEN the row's step is the unchanged one, and its peak is its own run's to the byte
    assert dense.unchanged_step(w)
    assert own == unchanged == advice.extra["fake_baseline_peak_bytes"]
    assert row.predicted_peak_bytes == own and row.predicted_by == "fake run"


def test_pruned_weights_viewing_one_storage_are_run_not_taken_for_the_unchanged_step() -> None:
    # GIVEN two Linear layers whose weights are views of one flat buffer, and two that own theirs
    flat = torch.zeros(2 * 16 * 16 + 8)
    shared = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    for i, layer in enumerate(shared):
        layer.weight = nn.Parameter(flat[i * 256:(i + 1) * 256].view(16, 16))
    owned = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    check = pruning.weights_own_their_storages(["0", "1"])
    # WHEN each is checked, THEN only the weights that own their storage count as unchanged
    # (prune.remove gives each viewed weight a storage of its own: other bytes than the flat one)
    assert check(Workload(owned, torch.optim.AdamW(owned.parameters()), torch.zeros(2, 16)))
    assert not check(Workload(shared, torch.optim.AdamW(shared.parameters()), torch.zeros(2, 16)))
    assert not pruning.weights_own_their_storages(["0", "0"])(
        Workload(owned, torch.optim.AdamW(owned.parameters()), torch.zeros(2, 16)))


def test_a_fake_runs_gradient_sums_are_made_in_place_by_the_ledgers_own_mode(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a small GPT-2 (a tied embedding and residual streams: gradients summed in backward)
    from memprof.estimate import grad_accumulation
    from memprof.tracking.session import Profiler

    w = gpt2_workload()
    sums = {"layer": 0, "in place": 0}
    layer = grad_accumulation.InPlaceGradSums.__torch_dispatch__
    pick = grad_accumulation.in_place_sum

    def counted_layer(self: Any, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        sums["layer"] += 1
        return layer(self, func, types, args, kwargs)

    def counted_pick(args: Any, kwargs: Any) -> Any:
        op = pick(args, kwargs)
        sums["in place"] += op is torch.ops.aten.add_.Tensor
        return op

    monkeypatch.setattr(grad_accumulation.InPlaceGradSums, "__torch_dispatch__", counted_layer)
    monkeypatch.setattr(grad_accumulation, "in_place_sum", counted_pick)
    # WHEN it is run on fake tensors, and again with the InPlaceGradSums mode on top
    with seeded():
        folded = fake_peak(w)
    folded_sums, sums["in place"] = dict(sums), 0
    monkeypatch.setattr(Profiler, "innermost_ledger_mode", lambda self: None)
    with seeded():
        layered = fake_peak(w)
    # THEN the first made its in-place sums with no dispatch through that mode, to the same bytes
    assert folded_sums["layer"] == 0 and folded_sums["in place"] > 0
    assert sums["layer"] > 0
    assert folded == layered


def test_a_change_whose_check_cannot_find_its_modules_is_run_not_fatal() -> None:
    """A profile's module names that the workload's model lacks (Lightning's callback profiles
    the LightningModule; its captured model may name its layers otherwise): the dense-zeros
    pruning row's check raised KeyError out of advise and every row was lost."""
    from memprof.advisor import _leaves_step_unchanged
    from memprof.advisor.core import Change
    from memprof.advisor.pruning import weights_own_their_storages

    w = mlp_workload()
    lost = Change("pruning", {}, "", unchanged_step=weights_own_their_storages(["net.9"]))
    found = Change("pruning", {}, "", unchanged_step=weights_own_their_storages(
        [next(name for name, m in w.model.named_modules() if isinstance(m, nn.Linear))]))
    assert _leaves_step_unchanged(lost, w) is False
    assert _leaves_step_unchanged(found, w) is True
    assert _leaves_step_unchanged(Change("pruning", {}, ""), w) is False
