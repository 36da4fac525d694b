"""GIVEN memprof's C++ allocation recorder, THEN it sees every allocation and free in order,
gives the events backend the same numbers as the PyTorch profiler's events do, leaves nothing
installed behind, and is replaced by a fallback (with the reason) where it cannot be built."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import make_mlp, profile_model

import memprof
from memprof.tracking import events, native, session
from memprof.tracking.events import RecorderSource

recorder = native.load()
needs_recorder = pytest.mark.skipif(
    recorder is None, reason=f"the recorder cannot be built here: {native.unavailable_reason()}"
)


@needs_recorder
def test_recorder_sees_allocations_frees_and_markers_in_order() -> None:
    source = RecorderSource(recorder)
    source.start()
    try:
        source.mark(7)
        x = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        source.mark(8)
        del x
        source.mark(9)
    finally:
        items = source.stop()
    assert not recorder.running()
    markers = [(i, value) for i, (_, ptr, value) in enumerate(items) if ptr == -1]
    assert [value for _, value in markers] == [7, 8, 9]
    (first, _), (second, _), (third, _) = markers
    allocs = [(ptr, value) for _, ptr, value in items[first + 1:second] if ptr > 0]
    assert allocs and allocs[0][1] == 4000
    ptr = allocs[0][0]
    frees = [value for _, p, value in items[second + 1:third] if p == ptr]
    assert frees == [-4000]
    times = [when for when, _, _ in items]
    assert times == sorted(times)


@needs_recorder
def test_recorder_marks_backward_nodes_once_per_run_of_nodes() -> None:
    x = torch.randn(8, 8, requires_grad=True)
    source = RecorderSource(recorder)
    source.start()
    try:
        loss = (x * 2).sin().sum()
        source.mark(1)
        loss.backward()
    finally:
        items = source.stop()
    kinds = [ptr for _, ptr, _ in items]
    marker = kinds.index(-1)
    assert -2 not in kinds[:marker]  # forward runs no autograd node
    assert -2 in kinds[marker:]
    # Nodes with no allocation between them are one event: backward has begun, nothing more.
    assert all(not (a == b == -2) for a, b in itertools.pairwise(kinds))
    # Each carries the sequence number of the node running at the next allocation (its forward
    # op's: the replay names the forward line of backward temporaries by it), or -1 (none).
    numbers = {node._sequence_nr() for node in _nodes(loss.grad_fn)}
    values = [value for _, ptr, value in items if ptr == -2]
    assert values and all(value in numbers or value == -1 for value in values)
    assert any(value in numbers for value in values)


def _nodes(root: torch.autograd.graph.Node) -> list[torch.autograd.graph.Node]:
    found, stack = [], [root]
    while stack:
        node = stack.pop()
        found.append(node)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return found


@needs_recorder
def test_nothing_stays_installed_also_when_the_body_raises() -> None:
    model = make_mlp()
    x = torch.randn(4, 64)
    with pytest.raises(ZeroDivisionError), memprof.profile(model, backend="events"):
        model(x).sum().backward()
        raise ZeroDivisionError
    assert not recorder.running()
    # torch's own profiler can start again: the thread's profiler slot is empty.
    with torch.profiler.profile(profile_memory=True) as prof:
        torch.ones(10)
    assert prof.events() is not None
    assert not torch.autograd._profiler_enabled()


@needs_recorder
@pytest.mark.parametrize("make", ["mlp", "cnn", "gpt2", "checkpoint"])
def test_recorder_and_torch_profiler_sources_give_the_same_profile(
    make: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sources differ in cost only: the same allocations reach the same replay."""
    profiles = {}
    for source in ("recorder", "torch.profiler"):
        monkeypatch.setattr(events, "PREFERRED_SOURCE", source)
        profiles[source] = profile_model(make, "events")
    a, b = profiles["recorder"], profiles["torch.profiler"]
    columns = ["parameter", "buffer", "gradient", "optimizer_state", "activation",
               "temporary_peak"]
    assert a.modules()[columns].equals(b.modules()[columns])
    assert a.peak().total_bytes == b.peak().total_bytes
    assert a.peak().by_category == b.peak().by_category


def test_without_the_recorder_auto_falls_back_to_dispatch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEMPROF_NATIVE", "0")
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(session, "AUTO_BACKEND", None)
    assert native.load() is None
    assert "MEMPROF_NATIVE=0" in native.unavailable_reason()
    model = make_mlp()
    with memprof.profile(model) as prof:
        model(torch.randn(4, 64)).sum().backward()
    assert prof.backend == "dispatch"
    # And the events backend, asked for by name, reads the PyTorch profiler's events instead.
    with memprof.profile(model, backend="events") as prof:
        model(torch.randn(4, 64)).sum().backward()
    assert prof._events is not None and prof._events.source.name == "torch.profiler"
    assert prof.peak().total_bytes > 0


@needs_recorder
def test_freeing_a_tensor_made_before_the_profile_prints_no_allocator_warning() -> None:
    """torch's CPU allocator warns (in C++, on stderr) when a block allocated before memory
    profiling is freed during it; for memprof that is an ordinary event. A fresh process: the
    allocator prints that warning only for the 1st, 1001st, ... such free."""
    code = (
        "import torch, memprof\n"
        "m = torch.nn.Linear(4, 4); x = torch.randn(100, 4)\n"
        "with memprof.profile(m, backend='events') as p:\n"
        "    del x\n"
        "    m(torch.randn(3, 4)).sum().backward()\n"
        "assert p._events.source.name == 'recorder'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert "unknown size" not in done.stderr


def test_the_profile_says_how_it_was_measured() -> None:
    model = make_mlp()
    expected = {"dispatch": "dispatch", "events": "events from recorder"}
    if recorder is None:
        expected["events"] = "events from torch.profiler"  # the fallback source
    for backend, said in expected.items():
        with memprof.profile(model, backend=backend) as prof:  # type: ignore[arg-type]
            model(torch.randn(4, 64)).sum().backward()
        assert prof.profile.meta["backend"] == said
        again = memprof.Profile.from_dict(prof.profile.to_dict())
        assert again.meta["backend"] == said


def test_a_stale_build_lock_is_cleared_and_a_fresh_one_kept(tmp_path: Path) -> None:
    # GIVEN a lock a killed build left (torch's baton would wait on it forever)
    import os as _os

    from memprof.tracking import native

    lock = tmp_path / "lock"
    lock.touch()
    old = lock.stat().st_mtime
    # WHEN it is younger than a build can take THEN it stays; once stale THEN it goes
    assert not native.clear_stale_lock(tmp_path, now=old + 60)
    assert lock.exists()
    _os.utime(lock, (old - 2 * native.STALE_LOCK_S, old - 2 * native.STALE_LOCK_S))
    assert native.clear_stale_lock(tmp_path)
    assert not lock.exists()
    assert not native.clear_stale_lock(tmp_path)  # nothing to clear


@needs_recorder
def test_module_backward_starts_are_marked_from_cpp_and_their_hooks_removed() -> None:
    """Each module's backward start is a recorder event (no Python grad_fn hook), the first
    one queues the end of backward, and the hooks leave the nodes with the profile, also when
    the body raises before the backward that would have run them."""
    model = make_mlp()
    x = torch.randn(4, 64)
    with memprof.profile(model, backend="events") as prof:
        out = model(x)
        assert recorder.backward_hooks() == len(model) + 1  # per layer, and the root
        out.sum().backward()
        del out
        assert recorder.backward_hooks() == 0  # the graph is freed: its hooks with it
        prof.step()
    rows = prof.modules().set_index("module")
    assert (rows.loc[[str(i) for i in range(len(model))], "peak_backward"] > 0).all()
    with pytest.raises(ZeroDivisionError), memprof.profile(model, backend="events"):
        kept = model(x)
        raise ZeroDivisionError
    assert recorder.backward_hooks() == 0
    kept.sum().backward()  # the graph outlived the profile: it runs with no hook of memprof's
    assert model[0].weight.grad is not None


@needs_recorder
def test_a_hook_of_an_earlier_profile_records_nothing_in_a_later_one() -> None:
    model = make_mlp()
    x = torch.randn(4, 64)
    with memprof.profile(model, backend="events") as first:
        out = model(x)
        first.step()
    with memprof.profile(model, backend="events") as second:
        out.sum().backward()  # the first profile's graph: no module stack of the second's
        second.step()
    assert second.modules()["peak_backward"].max() == 0
