"""The README's quick start, run as a newcomer runs it: a real subprocess in an empty folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import memprof

pytestmark = pytest.mark.slow  # the quick start, run in a subprocess

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(QUICKSTART.parent.parent)}
    return subprocess.run([sys.executable, str(QUICKSTART), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_quickstart_walks_the_whole_loop_and_keeps_existing_files(tmp_path: Path) -> None:
    # WHEN the quick start runs in an empty folder
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    profile_path = tmp_path / "reports" / "quickstart.json"
    report_path = tmp_path / "reports" / "quickstart.html"
    # THEN it wrote the profile, with its advice, and the report next to it
    profile = memprof.load(profile_path)
    assert profile.advice is not None and profile.advice["plan"] is not None
    assert "<!DOCTYPE html>" in report_path.read_text(encoding="utf-8")[:200]
    # AND it printed the peak the profile holds, the fit verdict and predicted savings
    assert f"peak {memprof.format_bytes(profile.peak().total_bytes)}" in out
    assert "It fits on T4 (16.0 GiB)" in out and "headroom" in out
    saving_lines = [line for line in out.splitlines() if ": saves " in line]
    assert 1 <= len(saving_lines) <= 5
    # AND it ends by naming the report and the next commands
    assert "Report: reports/quickstart.html" in out
    tail = out[out.index("Next:"):]
    assert "memprof advise reports/quickstart.json" in tail and "--simulate" in tail
    # WHEN it runs again THEN it refuses, in one line, before profiling, and keeps the files
    written = profile_path.read_bytes()
    again = _run(tmp_path)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "--force" in again.stderr
    assert again.stdout == "" and profile_path.read_bytes() == written
