"""The HTML report in a real headless Chromium (Playwright): it loads, draws, stays offline."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from browser import ARGS, CHROMIUM, Opened
from report_inputs import XSS, Evil, fitting_advice, profile_of, with_oom
from torch import nn

from memprof.profile import Profile
from memprof.report import write_report
from memprof.units import format_bytes

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # reports opened in headless Chromium


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists()
                              else shutil.which("chromium"), args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def mlp_profile() -> Profile:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 10))
    return profile_of(model, torch.randn(32, 64))


@pytest.fixture(scope="module")
def opened(browser: Any, mlp_profile: Profile, tmp_path_factory: pytest.TempPathFactory) -> Opened:
    base = mlp_profile.peak().total_bytes
    advice = {"recommendations": [
        {"technique": "checkpointing", "applicable": True, "baseline_peak_bytes": base,
         "predicted_saving_bytes": 4096, "measured_peak_bytes": base - 4000}]}
    path = write_report(mlp_profile, tmp_path_factory.mktemp("r") / "r.html", advice=advice)
    return Opened(browser, path)


def test_page_loads_without_errors_or_network(opened: Opened) -> None:
    assert opened.errors == []
    assert opened.requests == [opened.url]


def test_every_chart_is_drawn(opened: Opened) -> None:
    ids = opened.page.eval_on_selector_all(".chart", "els => els.map(e => e.id)")
    assert set(ids) == {"chart-timeline", "chart-layers", "chart-hierarchy", "chart-advice"}
    assert opened.page.evaluate("document.body.dataset.chartsReady") == str(len(ids))
    for chart in ids:
        drawn = opened.page.eval_on_selector(
            f"#{chart}", "e => [e.querySelectorAll('.main-svg').length, "
            "e.querySelectorAll('.trace, .slice, .bars .point, .scatterlayer path').length]")
        assert drawn[0] >= 1 and drawn[1] >= 1, (chart, drawn)


def test_headline_numbers_equal_the_profile(opened: Opened, mlp_profile: Profile) -> None:
    peak = mlp_profile.peak()
    page = opened.page
    assert page.get_attribute("#headline-peak", "data-bytes") == str(peak.total_bytes)
    assert page.inner_text("#headline-peak") == format_bytes(peak.total_bytes)
    assert page.inner_text("#headline-device") == mlp_profile.device.name
    assert f"step {peak.step}, {peak.phase}" in page.inner_text("#headline-where")
    sentence = page.inner_text("#headline-sentence")
    assert "checkpointing saved 3.9 KiB (measured)" in sentence
    # the peak marker on the timeline says the same number
    marker = page.eval_on_selector("#chart-timeline",
                                   "e => e.data.find(t => t.name == 'peak').y[0]")
    assert marker == peak.total_bytes


def test_module_named_script_shows_as_text(browser: Any, tmp_path: Path) -> None:
    path = write_report(profile_of(Evil(), torch.randn(8, 16)), tmp_path / "evil.html")
    opened = Opened(browser, path)
    assert opened.dialogs == []
    assert opened.errors == []
    assert opened.requests == [opened.url]  # the <img src=x> name did not load anything
    assert opened.page.evaluate("document.scripts.length") == 3
    assert XSS in opened.page.inner_text("#peak-modules")
    svg_text = opened.page.eval_on_selector("#chart-layers", "e => e.textContent")
    assert XSS in svg_text


def test_real_advice_renders(browser: Any, mlp_profile: Profile, tmp_path: Path) -> None:
    advisor = pytest.importorskip("memprof.advisor", reason="the advisor is not available")
    advice = advisor.advise(mlp_profile, budget="1MiB")
    opened = Opened(browser, write_report(mlp_profile, tmp_path / "a.html", advice=advice))
    assert opened.errors == [] and opened.requests == [opened.url]
    assert opened.page.eval_on_selector("#chart-advice", "e => e.querySelectorAll('.point').length")
    assert "Budget plan" in opened.page.inner_text("#advisor")
    assert opened.page.get_attribute("#headline-sentence", "data-source") == "advice"


# ------------------------------------------------------------------ OOM card and advisor
#: Where the screenshots go (MEMPROF_SCREENSHOTS=DIR keeps them for a person to look at).
def _shots(tmp_path: Path) -> Path:
    import os

    folder = Path(os.environ.get("MEMPROF_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _overflowing(page: Any) -> list[str]:
    """Elements whose right edge passes the window's, and the page's own sideways scroll (a
    wide table of modules may scroll inside its own box: that box must fit)."""
    return page.evaluate("""() => {
        const width = document.documentElement.clientWidth;
        const out = [];
        if (document.documentElement.scrollWidth > width) out.push('page scrolls sideways');
        for (const e of document.querySelectorAll('main *')) {
            if (e.parentElement.closest('.scroll')) continue;  // scrolls in its own box
            const r = e.getBoundingClientRect();
            if (r.width && r.right > width + 1) out.push(e.tagName + '#' + e.id + '.' +
                e.className + ' ' + Math.round(r.right));
        }
        return out;
    }""")


@pytest.mark.parametrize("width", [1280, 760])
def test_oom_report_gives_one_recommendation_in_words_within_the_window(
    browser: Any, mlp_profile: Profile, tmp_path: Path, width: int
) -> None:
    from memprof.report.advice_view import recommend

    # GIVEN a run that died of an out-of-memory error: the post-mortem's plan is checkpointing
    # 2 of 4 blocks, while the advice's largest single-GPU saving is 4 of 4 blocks
    profile = with_oom(mlp_profile)
    said = recommend(profile.advice, profile.oom)
    assert said is not None and "2 of 4 blocks" in said.text
    path = write_report(profile, tmp_path / "oom.html")
    # WHEN it is opened in a window of this width
    opened = Opened(browser, path)
    page = opened.page
    page.set_viewport_size({"width": width, "height": 900})
    page.wait_for_timeout(300)  # plotly's responsive relayout
    shots = _shots(tmp_path)
    page.screenshot(path=str(shots / f"oom-top-{width}.png"))
    page.locator("#advisor").screenshot(path=str(shots / f"oom-advisor-{width}.png"))
    assert opened.errors == [] and opened.requests == [opened.url]
    # THEN the card says what was asked, where, what was alive, the capacity and the fix
    card = page.inner_text("#headline-oom")
    for label in ("asked for", "where", "alive", "capacity", "fix"):
        assert label in card
    assert "24.0 MiB" in card and "'h.2.mlp', forward, step 1" in card
    # AND the fix, the headline and the advisor give the same one recommendation
    assert page.inner_text("#oom-fix") == said.text
    assert said.text in page.inner_text("#headline-sentence")
    assert said.text in page.inner_text("#advice-best")
    for place in ("#headline-oom", "#headline-sentence", "#advice-best"):
        assert "4 of 4 blocks" not in page.inner_text(place)
    body = page.inner_text("body")
    assert "Best single change" not in body
    # AND no key of the advice file shows, and no Details box of raw keys
    assert not re.search(r"\b[a-z]+_(bytes|pct|ratio)\b", body), \
        re.findall(r"\b[a-z]+_(?:bytes|pct|ratio)\b", body)
    assert "version" not in page.inner_text("#advisor")
    assert "Details" not in page.inner_text("#advisor")
    # AND every caveat is shown whole, in a table that fits the window
    chosen = page.eval_on_selector_all("#advice-table tr.chosen", "rs => rs.map(r => r.innerText)")
    assert len(chosen) == 1 and "2 of 4 blocks" in chosen[0] and "recommended" in chosen[0]
    table = page.inner_text("#advice-table")
    assert "caveat of checkpointing" in table and "caveat of sharding" in table
    over = _overflowing(page)
    assert over == [], over[:40]


def test_a_step_that_fits_opens_the_advisor_with_its_headroom(
    browser: Any, mlp_profile: Profile, tmp_path: Path
) -> None:

    base = mlp_profile.peak().total_bytes
    path = write_report(mlp_profile, tmp_path / "fits.html",
                        advice=fitting_advice(base, 14 << 30, largest=512))
    opened = Opened(browser, path)
    page = opened.page
    page.locator("#advisor").screenshot(path=str(_shots(tmp_path) / "fits-advisor.png"))
    fit = page.inner_text("#advice-fit")
    assert fit.startswith("It fits on T4 (16.0 GiB)") and "headroom" in fit and "512" in fit
    assert page.inner_text("#headline-sentence").startswith("It fits on T4")
    first = page.inner_text("#advice-table tbody tr:first-child td:first-child")
    assert first.startswith("checkpointing")  # one GPU's changes before ZeRO over 8 GPUs
    over = _overflowing(page)
    assert over == [], over[:40]


def test_hierarchy_labels_are_dark_on_light_boxes(opened: Opened) -> None:
    colours = opened.page.evaluate("""() => {
        const el = document.getElementById('chart-hierarchy');
        const trace = el.data[0];
        const text = [...el.querySelectorAll('.slicetext')].map(t =>
            getComputedStyle(t).fill || t.style.fill);
        return {scale: trace.marker.colorscale, text: text};
    }""")
    # the fills run from near-white to a light blue, and the labels are drawn dark
    assert all(_luminance(c) > 0.6 for _, c in colours["scale"])
    assert colours["text"] and all(_luminance(c) < 0.3 for c in colours["text"])


def _luminance(colour: str) -> float:
    """Relative brightness (0 black, 1 white) of '#rrggbb' or 'rgb(r, g, b)'."""
    if colour.startswith("#"):
        r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    else:
        r, g, b = (int(float(v)) for v in re.findall(r"[\d.]+", colour)[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255
