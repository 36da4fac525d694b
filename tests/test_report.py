"""The HTML report, without a browser: content, escaping, safety of the write, figure shapes."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch
from report_inputs import XSS, Evil, profile_of
from torch import nn

import memprof
from memprof.categories import CATEGORIES
from memprof.errors import OutputExistsError
from memprof.profile import DeviceInfo, ModuleStats, Peak, Profile, StepStats
from memprof.report import figures, headline, render_report, write_report
from memprof.report.page import context
from memprof.units import format_bytes


@pytest.fixture(scope="module")
def mlp_profile() -> Profile:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 10))
    return profile_of(model, torch.randn(32, 64))


def test_report_is_one_offline_file(mlp_profile: Profile, tmp_path: Path) -> None:
    # GIVEN a real profile WHEN its report is written
    out = write_report(mlp_profile, tmp_path / "r.html")
    html = out.read_text(encoding="utf-8")
    # THEN plotly.js is inlined exactly once and nothing is loaded from elsewhere
    assert html.count("plotly.js v") == 1
    assert "<script src" not in html and "<link" not in html
    assert "default-src 'none'" in html
    # and the headline carries the profile's peak
    peak = mlp_profile.peak()
    assert f'data-bytes="{peak.total_bytes}"' in html
    assert format_bytes(peak.total_bytes) in html


def test_headline_uses_the_profile_without_advice(mlp_profile: Profile) -> None:
    head = headline.build(mlp_profile, None)
    peak = mlp_profile.peak()
    assert head.peak_bytes == peak.total_bytes
    dominant = max(peak.by_category, key=lambda c: peak.by_category[c])
    assert head.dominant == dominant
    assert head.dominant_pct == pytest.approx(100 * peak.by_category[dominant] / peak.total_bytes)
    assert f"{head.dominant_pct:.0f}% of the peak" in head.sentence
    assert head.fix_source == "profile" and "memprof advise" in head.sentence
    assert f"step {peak.step}, {peak.phase}" in head.where


def test_headline_and_advisor_section_use_the_advice(mlp_profile: Profile) -> None:
    base = mlp_profile.peak().total_bytes
    advice = {
        "recommendations": [
            {"technique": "mixed precision", "options": {"dtype": "bf16"}, "applicable": True,
             "baseline_peak_bytes": base, "predicted_peak_bytes": base - 3000,
             "predicted_saving_bytes": 3000, "measured_peak_bytes": base - 2500},
            {"technique": "checkpointing", "options": "blocks 3-10", "applicable": True,
             "baseline_peak_bytes": base, "predicted_saving_bytes": 9000},
            {"technique": "sgd", "applicable": False, "predicted_saving_bytes": 10**9},
        ],
        "plan": {"budget": "1.0 GiB", "usable_bytes": 2**30, "baseline_peak_bytes": base,
                 "fits": True, "changes": [], "predicted_peak_bytes": base,
                 "explanation": "fits as is"},
    }
    head = headline.build(mlp_profile, advice)
    # the largest applicable saving wins; the inapplicable row does not
    assert head.fix_source == "advice"
    assert "checkpointing (blocks 3-10) saves about 8.8 KiB (predicted)" in head.sentence
    html = render_report(mlp_profile, advice=advice)
    assert 'id="chart-advice"' in html and "Budget plan" in html and "1.0 GiB" in html
    fig = context(mlp_profile, advice=advice)["charts"]["chart-advice"]
    # applicable rows only, the largest saving first (a measured one counts as measured)
    measured = fig["data"][1]["x"]
    assert measured == [None, 2500]


def test_no_advice_says_how_to_get_it(mlp_profile: Profile) -> None:
    html = render_report(mlp_profile)
    assert 'id="advice-missing"' in html and "memprof advise" in html
    assert 'id="chart-advice"' not in html


def test_user_strings_are_escaped(tmp_path: Path) -> None:
    profile = profile_of(Evil(), torch.randn(8, 16))
    profile.environment["command"] = "train.py --name '</script><b>x</b>'"
    html = write_report(profile, tmp_path / "evil.html").read_text(encoding="utf-8")
    assert XSS not in html
    assert "<img src=x" not in html
    assert "<b>x</b>" not in html
    # our three script elements (plotly, data, drawing) and no other
    assert html.count("<script") == 3
    # plotly text fields carry the escaped name, which plotly shows as the literal text
    layers = context(profile)["charts"]["chart-layers"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in layers["data"][0]["y"]


def test_existing_file_is_not_overwritten(mlp_profile: Profile, tmp_path: Path) -> None:
    target = tmp_path / "r.html"
    target.write_text("keep me", encoding="utf-8")
    with pytest.raises(OutputExistsError):
        write_report(mlp_profile, target)
    assert target.read_text(encoding="utf-8") == "keep me"
    write_report(mlp_profile, target, overwrite=True)
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_failed_write_leaves_nothing_behind(
    mlp_profile: Profile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "r.html"
    target.write_text("old", encoding="utf-8")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(mlp_profile, target, overwrite=True)
    assert target.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


def test_figures_are_valid_plotly(mlp_profile: Profile) -> None:
    charts = context(mlp_profile)["charts"]
    assert {"chart-timeline", "chart-layers", "chart-hierarchy"} <= set(charts)
    for fig in charts.values():
        go.Figure(fig)  # raises on any property plotly does not know


def test_hierarchy_values_are_inclusive(mlp_profile: Profile) -> None:
    fig = figures.hierarchy_figure(mlp_profile)
    assert fig is not None
    trace = fig["data"][0]
    frame = mlp_profile.modules()
    held = ["parameter_total", "buffer_total", "gradient_total", "optimizer_state_total",
            "activation_total"]
    root = frame[frame["module"] == ""].iloc[0]
    assert trace["values"][trace["parents"].index("")] == int(root[held].sum())


def test_hover_text_is_iec(mlp_profile: Profile) -> None:
    fig = figures.timeline_figure(mlp_profile)
    assert fig is not None
    total = next(t for t in fig["data"] if t["name"] == "total")
    assert total["text"] == [format_bytes(v) for v in total["y"]]
    assert max(total["y"]) == mlp_profile.peak().total_bytes


def synthetic(steps: int, samples: int, modules: int) -> Profile:
    """A profile built from the dataclasses directly (shape of a long run)."""
    mods = [ModuleStats("", "Net", 0, None, {"parameter": 0}, 0, 0, 1, 0)]
    mods += [ModuleStats(f"l{i}", "Linear", 1, "", {"parameter": 4096 * (i + 1),
                                                     "activation": 100}, 0, 0, 1, 0)
             for i in range(modules)]
    tl: dict[str, list] = {k: [] for k in ("step", "seq", "time_s", "phase", "module",
                                           *CATEGORIES)}
    for s in range(steps):
        for j in range(samples):
            tl["step"].append(s)
            tl["seq"].append(j)
            tl["time_s"].append(j * 1e-3)
            tl["phase"].append("forward" if j < samples // 2 else "backward")
            tl["module"].append(f"l{j % modules}")
            for c in CATEGORIES:
                tl[c].append(1000 + (j * 7919 + s * 104729) % 5000 if c == "activation" else 10)
    totals = [sum(tl[c][i] for c in CATEGORIES) for i in range(len(tl["step"]))]
    top = max(range(len(totals)), key=totals.__getitem__)
    by_cat = {c: tl[c][top] for c in CATEGORIES}
    peak = Peak(totals[top], tl["step"][top], tl["phase"][top], tl["module"][top], by_cat,
                {"l0": by_cat}, [])
    stats = [StepStats(s, 0, "forward", "l0", by_cat, 0, 0, samples * 1e-3) for s in range(steps)]
    return Profile(mods, stats, peak, tl, DeviceInfo("cpu", "CPU"), {"torch": "x"})


def test_timeline_is_decimated_and_keeps_the_peak() -> None:
    profile = synthetic(steps=200, samples=256, modules=5)
    fig = figures.timeline_figure(profile)
    assert fig is not None
    total = next(t for t in fig["data"] if t["name"] == "total")
    assert len(total["y"]) <= figures.TIMELINE_POINTS + 2 * 200
    assert max(total["y"]) == profile.peak().total_bytes
    marker = next(t for t in fig["data"] if t["name"] == "peak")
    assert marker["y"] == [profile.peak().total_bytes]


def test_hierarchy_groups_small_modules() -> None:
    profile = synthetic(steps=1, samples=8, modules=50)
    fig = figures.hierarchy_figure(profile, limit=10)
    assert fig is not None
    trace = fig["data"][0]
    root = trace["ids"][trace["parents"].index("")]
    children = [v for v, p in zip(trace["values"], trace["parents"], strict=True) if p == root]
    # the drawn children and the "… n more" box add up to the root: nothing is lost
    assert sum(children) == trace["values"][trace["ids"].index(root)]
    assert any(label.startswith("… ") for label in trace["labels"])


def test_profile_without_steps_still_renders() -> None:
    profile = Profile([], [], None, {}, DeviceInfo("cpu", "CPU"), {})
    html = render_report(profile)
    assert "no step was profiled" in html
    assert context(profile)["charts"] == {}


def test_axis_ticks_are_iec() -> None:
    from memprof.report.style import byte_axis

    axis = byte_axis(3 * 2**30)
    assert axis["ticktext"][:4] == ["0 B", "1 GiB", "2 GiB", "3 GiB"]
    assert axis["tickvals"][1] == 2**30
    assert byte_axis(110_000, bottom=-220_000)["ticktext"][0] == "-300 KiB"


def test_several_roots_get_one_labelled_box_above_them() -> None:
    from memprof.report.figures import hierarchy_figure

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    loss_fn = torch.nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.profile() as prof:
        loss_fn(model(torch.randn(4, 8)), torch.randn(4, 8)).backward()
        optimizer.step()
        prof.step()
    trace = hierarchy_figure(prof.profile)["data"][0]  # type: ignore[index]
    assert trace["parents"].count("") == 1
    assert trace["labels"][trace["ids"].index("all")] == "all modules"
    top = trace["values"][trace["ids"].index("all")]
    assert top == sum(v for v, p in zip(trace["values"], trace["parents"], strict=True)
                      if p == "all")


def test_a_long_start_up_is_compressed_on_the_time_axis_and_said() -> None:
    # GIVEN step 0 of a `memprof run` profile: 3 s of imports before the first forward
    profile = synthetic(steps=3, samples=40, modules=4)
    tl = profile.timeline_data
    lead = 3.0
    for i, s in enumerate(tl["step"]):
        if s == 0:
            tl["time_s"][i] += lead
    tl["phase"][0] = "other"
    tl["time_s"][0] = 0.0
    first = profile.steps_stats[0]
    profile.steps_stats[0] = dataclasses.replace(first, duration_s=first.duration_s + lead)
    # WHEN the timeline is drawn
    fig = figures.timeline_figure(profile)
    assert fig is not None
    total = next(t for t in fig["data"] if t["name"] == "total")
    # THEN the first forward of step 0 sits within 10% of its real work, not 3 s in
    work = 40 * 1e-3
    first_forward = total["x"][1]
    assert first_forward == pytest.approx(figures.LEAD_IN_KEPT * work, rel=0.05)
    # the other steps keep their real lengths, laid after the compressed one
    boundaries = next(t for t in fig["data"] if t["name"] == "step boundary")["x"]
    starts = [x for x in boundaries if x is not None][::2]
    assert starts[1] - starts[0] == pytest.approx(work, rel=1e-3)
    # and the chart and the page say so, with the real seconds
    assert "start-up compressed" in fig["layout"]["xaxis"]["title"]["text"]
    note = figures.lead_in_note(profile)
    assert note is not None and "step 0: 3.00 s before its first module call" in note
    assert "timeline-note" in render_report(profile)


def test_ordinary_steps_are_drawn_to_scale() -> None:
    profile = synthetic(steps=3, samples=40, modules=4)
    assert figures.lead_in_note(profile) is None
    fig = figures.timeline_figure(profile)
    assert fig is not None and "annotations" not in fig["layout"]
