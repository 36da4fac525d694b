"""The largest batch (or sequence length) that fits, by fake-run bisection: against a real CPU
bisection under the same limit, in advise, and in ``memprof estimate --max-batch``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from workloads import gpt2_workload, mlp_workload

from memprof.advisor import Workload, advise, max_batch
from memprof.advisor.workload import baseline, seeded

pytestmark = pytest.mark.slow  # bisections of the batch size by simulation


def real_largest(workload: Workload, limit: int, *, along: str, start: int,
                 cap: int) -> max_batch.Largest:
    """The same search, each size measured by a real CPU run."""

    def measure(n: int) -> tuple[bool, int]:
        with seeded():
            peak = baseline(max_batch.resized(workload, n, along=along)).peak_bytes
        return peak <= limit, peak

    return max_batch.search(measure, limit, start=start, cap=cap)


def test_search_doubles_then_bisects_and_stops_on_failures() -> None:
    found = max_batch.search(lambda n: (100 * n + 50 <= 1000, 100 * n + 50), 1000, start=4)
    assert found.size == 9 and found.peak_bytes == 950
    assert sorted(found.tried) == [4, 8, 9, 10, 12, 16]
    none = max_batch.search(lambda n: (False, n), 0)
    assert none.size == 0 and none.describe() == "batch 1 does not fit"

    def failing(n: int) -> tuple[bool, int]:
        if n > 20:
            raise IndexError("position out of range")
        return True, n

    stopped = max_batch.search(failing, 10**9, cap=1000)
    assert stopped.size == 20 and stopped.stopped and "IndexError" in stopped.stopped


def test_mlp_largest_batch_matches_a_real_cpu_bisection() -> None:
    """GIVEN a limit between two batch sizes' real peaks, WHEN fake runs and real CPU runs are
    bisected under it, THEN the fake answer equals the real one or is one below."""
    workload = mlp_workload()  # batch 128
    with seeded():
        limit = baseline(max_batch.resized(workload, 700, along="batch")).peak_bytes + 1000
    fake = max_batch.largest_for_workload(workload, limit, start=128, cap=4096)
    real = real_largest(workload, limit, along="batch", start=128, cap=4096)
    assert 600 < real.size < 800
    assert fake.size in (real.size, real.size - 1)
    assert fake.peak_bytes is not None and fake.peak_bytes <= limit


def test_gpt2_longest_sequence_matches_a_real_cpu_bisection() -> None:
    workload = gpt2_workload(seq=128, batch=2, layers=1)
    with seeded():
        limit = baseline(max_batch.resized(workload, 90, along="sequence")).peak_bytes + 500
    fake = max_batch.largest_for_workload(workload, limit, along="sequence", start=16, cap=128)
    real = real_largest(workload, limit, along="sequence", start=16, cap=128)
    assert 80 < real.size < 110
    assert fake.size in (real.size, real.size - 1)


def test_advise_has_a_largest_batch_row_found_by_fake_runs() -> None:
    workload = mlp_workload()
    with seeded():
        ref = baseline(workload)
    budget = int(ref.peak_bytes * 2)
    advice = advise(ref.profile, budget=budget, fake_model=workload, simulate=False)
    row = next(r for r in advice.rows if r["options"].get("found_by") == "fake runs")
    assert row["applicable"] and row["predicted_by"] == "fake run"
    size = row["options"]["largest_batch_that_fits"]
    assert size > 128  # twice the baseline's memory holds more than its batch
    assert row["predicted_peak_bytes"] <= advice.extra["usable_bytes"]


TINY = textwrap.dedent("""
    import transformers

    def tiny_gpt2():
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32,
            bos_token_id=0, eos_token_id=0))
""")


def test_cli_max_batch_estimates_the_largest_batch_that_fits(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from memprof.estimate import build_spec, estimate

    (tmp_path / "tinymodels.py").write_text(TINY)
    result = subprocess.run(
        [sys.executable, "-m", "memprof.cli", "estimate", "tinymodels:tiny_gpt2", "--seq-len",
         "16", "--gpu", "1GiB", "--max-batch", "--json"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    size = data["largest"]["size"]
    assert data["batch_size"] == size and data["fit"]["fits"]
    sys.path.insert(0, str(tmp_path))
    try:
        spec = build_spec("tinymodels:tiny_gpt2")
        over = estimate(spec, batch=lambda: spec.make_batch(size + 1, 16), gpu="1GiB")
    finally:
        sys.path.remove(str(tmp_path))
    assert not over.meta["estimate"]["fit"]["fits"]  # one more does not fit
    missing = subprocess.run(
        [sys.executable, "-m", "memprof.cli", "estimate", "tinymodels:tiny_gpt2",
         "--max-batch"], capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
    assert missing.returncode != 0 and "--max-batch needs --gpu" in missing.stderr
