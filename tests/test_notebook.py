"""Notebook views: ``Profile._repr_html_`` and ``Advice._repr_html_`` say what the profile and
the advice say, escape what users named, and draw the per-layer chart in a real browser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from models import make_mlp
from report_inputs import XSS, Evil, profile_of

import memprof
from memprof.report import notebook
from memprof.units import format_bytes


@pytest.fixture(scope="module")
def mlp() -> memprof.Profile:
    return profile_of(make_mlp(), torch.randn(32, 64))


def figure_of(fragment: str) -> dict:  # type: ignore[type-arg]
    found = re.search(r'<script type="application/json" id="[^"]+">(.*?)</script>', fragment,
                      re.S)
    assert found is not None
    return json.loads(found.group(1))  # type: ignore[no-any-return]


def test_profile_view_has_the_headline_categories_and_layers(
    mlp: memprof.Profile, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notebook, "_plotly_sent", False)
    html = mlp._repr_html_()
    peak = mlp.peak()
    assert f'data-bytes="{peak.total_bytes}"' in html
    assert format_bytes(peak.total_bytes) in html
    for cat, nbytes in peak.by_category.items():
        if nbytes:
            assert format_bytes(nbytes) in html, cat
    # the per-layer chart: the module holding the most comes first, with its parameter bytes
    figure = figure_of(html)
    params = next(t for t in figure["data"] if t["name"] == "parameters")
    frame = mlp.modules().set_index("module")
    assert params["y"][0] == "0"  # Linear(64, 128): the largest layer
    assert params["x"][0] == frame.loc["0", "parameter"] == 4 * (64 * 128 + 128)
    # a fragment, not a page; plotly.js inlined once per process
    assert "<html" not in html and "<body" not in html
    assert html.count("Plotly=") + html.count("plotly.js v") >= 1
    again = mlp._repr_html_()
    assert len(again) < len(html) / 20 and "window.Plotly" in again
    ids = {re.search(r'id="(memprof-\d+)"', h).group(1) for h in (html, again)}  # type: ignore[union-attr]
    assert len(ids) == 2  # two outputs never share chart ids


def test_profile_view_escapes_module_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notebook, "PLOTLYJS", "never")
    html = profile_of(Evil(), torch.randn(8, 16))._repr_html_()
    assert XSS not in html and "<img src=x" not in html


def test_profiler_shows_its_profile_once_closed() -> None:
    model = torch.nn.Linear(4, 2)
    with memprof.profile(model) as prof:
        assert prof._repr_html_() is None
        model(torch.randn(2, 4)).sum().backward()
        prof.step()
    assert "memprof-profile" in (prof._repr_html_() or "")


def test_advice_view_is_its_table(mlp: memprof.Profile) -> None:
    advice = memprof.advise(mlp, budget="64KiB")
    html = advice._repr_html_()
    table = advice.table()
    shown = table[table["applicable"]].head(5)
    for _, row in shown.iterrows():
        assert row["technique"] in html
        assert format_bytes(row["predicted_peak_bytes"]) in html
    assert f"baseline step peak {format_bytes(advice.baseline_peak_bytes)}" in html
    assert html.count("<tr>") == len(table) + 1  # a header row and one row per recommendation


@pytest.mark.browser
@pytest.mark.slow
def test_profile_view_draws_in_chromium(mlp: memprof.Profile, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from browser import ARGS, CHROMIUM

    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    monkeypatch.setattr(notebook, "_plotly_sent", False)
    # two outputs in one page, as a notebook shows them: the second relies on the first's plotly
    page_html = f"<!DOCTYPE html><html><body>{mlp._repr_html_()}{mlp._repr_html_()}</body></html>"
    path = tmp_path / "notebook.html"
    path.write_text(page_html, encoding="utf-8")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.resolve().as_uri())
            page.wait_for_function(
                "document.querySelectorAll('.memprof-layers.js-plotly-plot').length === 2",
                timeout=30_000)
            assert errors == []
        finally:
            browser.close()


def test_a_profile_with_no_step_says_so() -> None:
    with memprof.profile(schedule=lambda step: memprof.StepAction.SKIP) as prof:
        torch.nn.Linear(2, 2)(torch.ones(1, 2))
        prof.step()
    html = prof.profile._repr_html_()
    assert "no step profiled" in html and "memprof-layers" not in html
