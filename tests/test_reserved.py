"""Reserved memory in profiles, estimates, budgets, advice and the report (issue #14)."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest
import torch
from torch import nn

import memprof
from memprof import allocator
from memprof.advisor import read_budget
from memprof.gpus import CUDA_CONTEXT_BYTES, lookup, usable_bytes

MiB = 2**20


def _floats(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes // 4, dtype=torch.float32)


def _program() -> None:
    """5 MiB, then 30 MiB, free the 5 MiB, then 8 MiB: by the allocator's rules 50 MiB are
    reserved by default (20 MiB + 30 MiB segments; the 8 MiB reuses the 20 MiB one) and 60 MiB
    with expandable segments (20 MiB pages: 20, 40, then a third page for the 8 MiB)."""
    a = _floats(5 * MiB)
    b = _floats(30 * MiB)
    del a
    c = _floats(8 * MiB)
    del b, c


def _large_segments(segments: list[int]) -> list[int]:
    return [s for s in segments if s > 2 * MiB]  # the small pool holds stray scalars


@pytest.mark.parametrize("backend", ["events", "dispatch"])
def test_a_profile_replays_its_allocations_through_the_allocator(backend: str) -> None:
    with memprof.profile(backend=backend) as prof:
        _program()
        prof.step()
    replay = prof.profile.allocator["replay"]
    assert _large_segments(replay["segments"]) == [30 * MiB, 20 * MiB]
    small = replay["reserved_peak_bytes"] - 50 * MiB
    assert small in (0, 2 * MiB)
    expandable = prof.profile.allocator["what_if"]["expandable_segments:True"]
    assert expandable["reserved_peak_bytes"] - small == 60 * MiB
    # The step's row and the timeline carry the predicted reserved bytes.
    assert prof.profile.steps_stats[0].predicted_reserved == replay["reserved_peak_bytes"]
    timeline = prof.profile.timeline()
    assert timeline["reserved_predicted"].max() == replay["reserved_peak_bytes"]
    assert (timeline["reserved_predicted"] >= timeline["total"]).all()


def test_the_replay_equals_replaying_the_same_requests_by_hand() -> None:
    with memprof.profile(backend="dispatch") as prof:
        _program()
        prof.step()
    events = [("alloc", 1, 5 * MiB), ("alloc", 2, 30 * MiB), ("free", 1, 0),
              ("alloc", 3, 8 * MiB), ("free", 2, 0), ("free", 3, 0)]
    by_hand = allocator.replay(events)
    got = prof.profile.allocator["replay"]
    assert _large_segments(got["segments"]) == by_hand.segments
    assert got["reserved_peak_bytes"] - by_hand.reserved_peak_bytes in (0, 2 * MiB)


def test_the_run_s_allocator_options_are_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with memprof.profile(backend="dispatch") as prof:
        _program()
        prof.step()
    data = prof.profile.allocator
    assert data["conf"] == "expandable_segments:True"
    assert list(data["what_if"]) == ["expandable_segments:True,expandable_segments:False"]
    assert _large_segments(data["replay"]["segments"]) == [60 * MiB]


def test_the_typed_summary_reads_and_writes_the_profile_s_allocator_keys(tmp_path: object) -> None:
    # GIVEN a profile whose allocator replay was saved and loaded again
    with memprof.profile(backend="dispatch") as prof:
        _program()
        prof.step()
    path = f"{tmp_path}/p.json"
    prof.profile.save(path)
    loaded = memprof.load(path)
    # WHEN it is read as the typed record
    summary = loaded.allocator_summary()
    # THEN its figures are the stored ones and it writes the same keys back
    assert summary is not None
    assert summary.replay.reserved_peak_bytes == loaded.allocator["replay"]["reserved_peak_bytes"]
    assert summary.replay.fragmentation_bytes == loaded.allocator["replay"]["fragmentation_bytes"]
    expandable = summary.what_if["expandable_segments:True"]
    assert _large_segments(expandable.segments) == [60 * MiB]  # one segment, grown in pages
    assert summary.to_dict() == loaded.allocator == prof.profile.allocator
    assert allocator.AllocatorSummary.from_dict(None) is None
    assert allocator.AllocatorSummary.from_dict({"conf": ""}) is None


def test_profile_allocator_is_the_typed_record_and_reads_as_its_dict(tmp_path: object) -> None:
    # GIVEN a profile with an allocator replay (before: Profile.allocator was a plain dict)
    with memprof.profile(backend="dispatch") as prof:
        _program()
        prof.step()
    summary = prof.profile.allocator
    # THEN it is the typed record, and indexing it gives the file's dict, key for key
    assert isinstance(summary, allocator.AllocatorSummary)
    assert summary.replay.reserved_peak_bytes == summary["replay"]["reserved_peak_bytes"] > 0
    assert summary.what_if["expandable_segments:True"].segments == (
        summary["what_if"]["expandable_segments:True"]["segments"])
    assert json.loads(json.dumps(summary)) == prof.profile.to_dict()["allocator"]
    assert summary == summary.to_dict()
    with pytest.raises(TypeError, match="read-only"):
        summary["conf"] = "expandable_segments:True"  # type: ignore[index]
    # AND it stays typed through a file, a copy, a pickle, and a Profile made from the dict
    loaded = memprof.load(prof.profile.save(f"{tmp_path}/p.json"))
    assert isinstance(loaded.allocator, allocator.AllocatorSummary)
    assert loaded.allocator == summary
    for again in (copy.deepcopy(summary), pickle.loads(pickle.dumps(summary))):
        assert isinstance(again, allocator.AllocatorSummary) and again == summary
    from_dict = dataclasses.replace(prof.profile, allocator=summary.to_dict())  # type: ignore[arg-type]
    assert isinstance(from_dict.allocator, allocator.AllocatorSummary)
    assert from_dict.allocator.replay == summary.replay


def test_a_bad_allocator_conf_is_a_warning_not_a_failed_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:maybe")
    with memprof.profile(backend="dispatch") as prof:
        _program()
        prof.step()
    assert prof.profile.allocator is None
    assert any("reserved memory not modelled" in w for w in prof.profile.warnings)


def test_the_replay_can_be_turned_off_and_old_profiles_still_load(tmp_path: object) -> None:
    from memprof.tracking.session import Profiler

    with Profiler(model_reserved=False) as prof:
        _program()
        prof.step()
    assert prof.profile.allocator is None
    assert prof.profile.steps_stats[0].predicted_reserved is None
    assert "reserved_predicted" not in prof.profile.timeline()
    data = prof.profile.to_dict()
    del data["allocator"]  # as a profile from before the replay existed
    again = memprof.Profile.from_dict(data)
    assert again.allocator is None


def _trained_profile() -> memprof.Profile:
    model = nn.Sequential(nn.Linear(512, 3000), nn.ReLU(), nn.Linear(3000, 512))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(64, 512)
    with memprof.profile(model, opt) as prof:
        for _ in range(2):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            prof.step()
    return prof.profile


def test_budgets_keep_the_replay_s_cache_instead_of_a_fixed_share() -> None:
    profile = _trained_profile()
    replay = profile.allocator["replay"]
    cached = replay["reserved_peak_bytes"] - replay["allocated_peak_bytes"]
    assert cached > 0
    advice = memprof.advise(profile, budget="RTX 4090")
    gpu = lookup("RTX 4090")
    assert advice.extra["usable_bytes"] == gpu.driver_bytes - CUDA_CONTEXT_BYTES - cached
    assert "its replay of this run" in advice.extra["budget"]
    # A text budget loses the context and the replay's cache; an integer keeps the 5% share.
    resolved = read_budget(10**9, cached_bytes=cached)
    assert resolved is not None and resolved[0] == int(10**9 * 0.95)
    text = read_budget("RTX 4090", cached_bytes=cached)
    assert text is not None and text[0] == usable_bytes(gpu.driver_bytes, cached_bytes=cached)
    # Without a replay (an older profile) the fixed 5% reserve stays.
    older = dataclasses.replace(profile, allocator=None)
    assert memprof.advise(older, budget="RTX 4090").extra["usable_bytes"] == usable_bytes(
        gpu.driver_bytes)


def test_the_advisor_has_an_allocator_row_from_the_replay() -> None:
    profile = _trained_profile()
    table = memprof.advise(profile).table()
    row = table[table["technique"] == "allocator"].iloc[0]
    replay = profile.allocator["replay"]
    what_if = profile.allocator["what_if"]["expandable_segments:True"]
    assert row["options"] == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert row["baseline_reserved_bytes"] == replay["reserved_peak_bytes"]
    assert row["predicted_reserved_bytes"] == what_if["reserved_peak_bytes"]
    assert row["predicted_saving_bytes"] == (
        replay["reserved_peak_bytes"] - what_if["reserved_peak_bytes"])
    assert row["predicted_peak_bytes"] == profile.peak().total_bytes  # tensors unchanged
    older = dataclasses.replace(profile, allocator=None)
    old_table = memprof.advise(older).table()
    assert not old_table[old_table["technique"] == "allocator"].iloc[0]["applicable"]


def test_the_allocator_row_says_why_it_is_not_simulated_on_cpu_and_fake_runs() -> None:
    from memprof.advisor import Workload

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))
    opt = torch.optim.AdamW(model.parameters())
    w = Workload(model, opt, (torch.randn(16, 64), torch.randint(0, 8, (16,))), steps=2)
    with memprof.profile(model, opt) as prof:
        for _ in range(2):
            torch.nn.functional.cross_entropy(model(w.batch[0]), w.batch[1]).backward()
            opt.step()
            opt.zero_grad()
            prof.step()
    simulated = memprof.advise(prof.profile, workload=w)
    faked = memprof.advise(prof.profile, fake_model=w, simulate=False)
    for advice in (simulated, faked):
        row = next(r for r in advice.rows if r["technique"] == "allocator")
        assert row["measured_peak_bytes"] is None
        assert "CUDA caching allocator" in row["not_simulated"]
    # a simulated row has nothing to explain
    assert all(r["not_simulated"] is None for r in simulated.rows
               if r["measured_peak_bytes"] is not None)


def test_estimate_reports_reserved_and_its_verdict_counts_it() -> None:
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024))

    profile = memprof.estimate(build, batch=torch.randn(32, 1024), device="cuda", gpu="T4")
    info = profile.meta["estimate"]
    replay = profile.allocator["replay"]
    assert info["reserved_bytes"] == replay["reserved_peak_bytes"]
    assert info["reserved_bytes"] >= profile.peak().total_bytes
    assert info["device_total_bytes"] == info["reserved_bytes"] + CUDA_CONTEXT_BYTES
    fit = info["fit"]
    cached = replay["reserved_peak_bytes"] - replay["allocated_peak_bytes"]
    assert fit["reserve"] == "allocator replay"
    assert fit["usable_bytes"] == lookup("T4").driver_bytes - CUDA_CONTEXT_BYTES - cached
    assert fit["needed_bytes"] == profile.peak().total_bytes + cached + CUDA_CONTEXT_BYTES


def test_the_report_draws_reserved_and_explains_the_gap(tmp_path: object) -> None:
    from pathlib import Path

    profile = _trained_profile()
    path = memprof.report(profile, Path(str(tmp_path)) / "r.html")
    html = path.read_text(encoding="utf-8")
    assert "reserved (allocator replay)" in html
    assert 'id="reserved-note"' in html
    assert "cached in" in html
    assert "reserved (caching-allocator replay)" in profile.summary()
