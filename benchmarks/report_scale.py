"""Scale of the HTML report: 10,000 modules and 1,000 steps.

Builds a Profile from the dataclasses directly (a 1,250-block model, 8 modules per block, each
step with 256 timeline samples: the profiler's default), writes the report, and prints the file
size (target: at most 8 MB) and the time headless Chromium takes to load it and draw every chart
(target: at most 3 s), measured through Playwright, next to peers in the same run: plotly.js
alone on an empty page (the floor), and plotly.py's own ``write_html`` of the raw timeline.

    python benchmarks/report_scale.py
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from memprof.categories import CATEGORIES
from memprof.profile import DeviceInfo, ModuleStats, Peak, Profile, StepStats, TensorAtPeak
from memprof.report import write_report
from memprof.units import format_bytes

BLOCKS = 1250  # 8 modules per block; the list is cut at 10,000 with the root
STEPS = 1000
SAMPLES = 256
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def build_modules(rng: random.Random) -> list[ModuleStats]:
    """Root, then per block: the block, attn (+q, k, v, out), mlp (+fc): 8 per block."""
    d = 1024
    mods = [ModuleStats("", "Net", 0, None, {"parameter": 0}, 0, 0, 1, 0)]
    for b in range(BLOCKS):
        block = f"blocks.{b}"
        mods.append(ModuleStats(block, "Block", 1, "", {}, 0, 0, 1, 0))
        mods.append(ModuleStats(f"{block}.attn", "Attention", 2, block,
                                {"activation": 4 * d * 512 * 4}, 0, 0, 1, 0))
        for name in ("q", "k", "v", "out"):
            w = d * d * 4
            mods.append(ModuleStats(
                f"{block}.attn.{name}", "Linear", 3, f"{block}.attn",
                {"parameter": w, "gradient": w, "optimizer_state": 2 * w,
                 "activation": rng.choice([0, d * 512 * 4])}, 0, 0, 1, 0))
        mods.append(ModuleStats(f"{block}.mlp", "MLP", 2, block, {}, 0, 0, 1, 0))
        w = 4 * d * d * 4
        mods.append(ModuleStats(f"{block}.mlp.fc", "Linear", 3, f"{block}.mlp",
                                {"parameter": w, "gradient": w, "optimizer_state": 2 * w,
                                 "activation": 4 * d * 512 * 4}, 0, 0, 1, 0))
    return mods[:10_000]


def build_profile() -> Profile:
    rng = random.Random(0)
    mods = build_modules(rng)
    params = sum(m.own.get("parameter", 0) for m in mods)
    tl: dict[str, list[Any]] = {k: [] for k in ("step", "seq", "time_s", "phase", "module",
                                                *CATEGORIES)}
    steps = []
    best: tuple[int, int] = (0, 0)
    for s in range(STEPS):
        peak = 0
        for j in range(SAMPLES):
            frac = j / SAMPLES
            phase = "forward" if frac < 0.4 else "backward" if frac < 0.85 else "optimizer"
            act = int(params * 0.8 * (frac / 0.4 if frac < 0.4 else max(0.0, (0.85 - frac) / 0.45)))
            values = {"parameter": params, "buffer": 0,
                      "gradient": int(params * min(1.0, max(0.0, (frac - 0.4) / 0.45))),
                      "optimizer_state": 2 * params, "activation": act,
                      "temporary": rng.randrange(0, 64 << 20), "input": 8 << 20, "other": 0}
            tl["step"].append(s)
            tl["seq"].append(s * 100_000 + j)
            tl["time_s"].append(round(j * 0.0015, 6))
            tl["phase"].append(phase)
            tl["module"].append(mods[1 + (j * 37) % (len(mods) - 1)].name)
            for c in CATEGORIES:
                tl[c].append(values[c])
            total = sum(values.values())
            if total > peak:
                peak, peak_row = total, len(tl["step"]) - 1
            if total > best[0]:
                best = (total, len(tl["step"]) - 1)
        by_cat = {c: tl[c][peak_row] for c in CATEGORIES}
        steps.append(StepStats(s, peak, tl["phase"][peak_row], tl["module"][peak_row], by_cat,
                               3 * params, 3 * params, SAMPLES * 0.0015))
    row = best[1]
    by_cat = {c: tl[c][row] for c in CATEGORIES}
    by_module = {m.name: {c: v for c, v in m.own.items() if v} for m in mods if m.own}
    peak_info = Peak(best[0], tl["step"][row], tl["phase"][row], tl["module"][row], by_cat,
                     by_module, [TensorAtPeak("activation", mods[7].name, 8 << 20, [512, 4096],
                                              "float32", "forward")] * 20)
    return Profile(mods, steps, peak_info, tl, DeviceInfo("cpu", "synthetic"),
                   {"memprof": "bench", "torch": "n/a", "python": sys.version.split()[0]})


def _timed(page: Any, url: str, ready: str) -> float:
    """Seconds from navigation until ``ready`` (a JS expression) holds."""
    page.goto("about:blank")
    start = time.perf_counter()
    page.goto(url)
    page.wait_for_function(ready, timeout=120_000)
    return time.perf_counter() - start


def render_seconds(path: Path) -> tuple[float, float]:
    """(cold, warm): seconds from navigation until every chart is drawn.

    Cold is the first open in a fresh browser (V8 compiles plotly.js's 4.8 MB); warm is the
    same file opened again (Chromium's code cache), as when a user reopens a report.
    """
    from playwright.sync_api import sync_playwright

    ready = "document.body.dataset.chartsReady !== undefined"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        cold = _timed(page, path.resolve().as_uri(), ready)
        warm = _timed(page, path.resolve().as_uri(), ready)
        browser.close()
    return cold, warm


def peer_seconds(path: Path, html: str) -> float:
    """Cold render of a page written by plotly.py itself (``write_html``), in a fresh browser."""
    from playwright.sync_api import sync_playwright

    path.write_text(html, encoding="utf-8")
    ready = "document.querySelectorAll('.js-plotly-plot .main-svg').length > 0"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        seconds = _timed(browser.new_page(), path.resolve().as_uri(), ready)
        browser.close()
    return seconds


def peers(profile: Profile, tmp: Path) -> list[tuple[str, float, int]]:
    """(name, cold render seconds, file bytes) of the obvious ways to draw the same data with
    plotly.py: the profile's whole timeline as a stacked area, and plotly.js alone."""
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    out = []
    alone = f"<script>{get_plotlyjs()}</script><div class='js-plotly-plot'>" \
            "<svg class='main-svg'></svg></div>"
    out.append(("plotly.js alone (no data)", peer_seconds(tmp / "alone.html", alone),
                len(alone.encode())))
    data = profile.timeline_data
    x = list(range(len(data["step"])))
    fig = go.Figure([go.Scatter(x=x, y=data[c], name=c, stackgroup="live", mode="lines")
                     for c in CATEGORIES if any(data[c])])
    html = fig.to_html(include_plotlyjs=True, full_html=True)
    out.append(("plotly write_html: whole timeline, stacked", peer_seconds(tmp / "naive.html",
                                                                          html),
                len(html.encode())))
    return out


def main() -> None:
    start = time.perf_counter()
    profile = build_profile()
    built = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scale.html"
        start = time.perf_counter()
        write_report(profile, path)
        written = time.perf_counter() - start
        size = path.stat().st_size
        cold, warm = render_seconds(path)
        others = peers(profile, Path(tmp))
    print(f"profile: {len(profile.modules_stats):,} modules, {len(profile.steps_stats):,} steps, "
          f"{len(profile.timeline_data['step']):,} timeline samples (built in {built:.1f} s)")
    print(f"write_report: {written:.2f} s")
    print(f"file size:      {size / 1e6:.2f} MB ({format_bytes(size)})   target <= 8 MB   "
          f"{'OK' if size <= 8e6 else 'OVER'}")
    print(f"Chromium render, cold: {cold:.2f} s   warm (reopened): {warm:.2f} s   "
          f"target <= 3 s   {'OK' if cold <= 3 else 'OVER cold'}, {'OK' if warm <= 3 else 'OVER'}"
          " warm")
    print("peers, same run (cold render in a fresh browser; ratio = memprof's cold / peer's):")
    for name, seconds, nbytes in others:
        print(f"  {name:<45} {seconds:6.2f} s  {nbytes / 1e6:6.2f} MB   "
              f"memprof/peer {cold / seconds:.2f}x")


if __name__ == "__main__":
    main()
