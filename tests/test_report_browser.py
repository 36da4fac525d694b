"""The HTML report in a real headless Chromium (Playwright): it loads, draws, stays offline."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from memprof.profile import Profile
from memprof.report import write_report
from memprof.units import format_bytes
from tests.test_report import XSS, Evil, profile_of

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

pytestmark = pytest.mark.browser


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


class Opened:
    """A report opened with every request routed: only the file itself may load."""

    def __init__(self, browser: Any, path: Path) -> None:
        self.url = path.resolve().as_uri()
        self.page = browser.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error"
                     else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", self._dialog)
        self.page.route("**/*", self._route)
        self.page.goto(self.url)
        self.page.wait_for_function("document.body.dataset.chartsReady !== undefined",
                                    timeout=30_000)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _route(self, route: Any) -> None:
        self.requests.append(route.request.url)
        if route.request.url == self.url:
            route.continue_()
        else:
            route.abort()


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
