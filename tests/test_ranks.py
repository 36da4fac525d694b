"""Multi-rank runs: torchrun with 2 CPU ranks over gloo, each rank profiled into its own file,
and one report over the ranks.

GIVEN / WHEN / THEN; the torchrun runs are shared by module-scoped fixtures (about 20 s each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import memprof
from memprof.report.ranks import RanksError, imbalance, rank_rows
from memprof.tracking.distributed import RankInfo, rank_from_env, rank_of_name, rank_path

pytestmark = pytest.mark.slow  # torchrun with 2 ranks (about 20 s each run)

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

DATA = Path(__file__).resolve().parent / "data"
MEMPROF = [sys.executable, "-m", "memprof"]
#: Linear(64, 128) and Linear(128, 8), float32: weights and biases.
LAYERS = {"0": (64, 128), "2": (128, 8)}


def _bytes(fan_in: int, fan_out: int) -> int:
    return 4 * (fan_in * fan_out + fan_out)


def torchrun(script: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc-per-node 2 --no-python memprof run SCRIPT`` on a free port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--no-python",
           *MEMPROF, "run", *extra, str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    cwd = tmp_path_factory.mktemp("ddp")
    return cwd, torchrun(DATA / "train_ddp.py", cwd)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    cwd = tmp_path_factory.mktemp("fsdp")
    return cwd, torchrun(DATA / "train_fsdp2.py", cwd, "--no-html")


# ------------------------------------------------------------------ naming
def test_rank_comes_from_the_launchers_environment() -> None:
    assert rank_from_env({}) is None
    assert rank_from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == RankInfo(1, 4, 1)
    assert rank_from_env({"RANK": "4", "WORLD_SIZE": "4"}) is None  # out of range
    assert rank_from_env({"RANK": "x", "WORLD_SIZE": "2"}) is None


def test_rank_path_tags_the_name_only_with_several_ranks() -> None:
    two = RankInfo(1, 2, 1)
    assert rank_path("reports/t.json", two) == Path("reports/t.rank1.json")
    assert rank_path("reports/t.rank1.json", two) == Path("reports/t.rank1.json")
    assert rank_path("reports/t.json", RankInfo(0, 1, 0)) == Path("reports/t.json")
    assert rank_path("reports/t.json", None) == Path("reports/t.json")
    assert rank_of_name("a/t.rank12.html") == 12 and rank_of_name("t.json") is None


def test_profiler_save_writes_this_ranks_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN the environment torchrun gives rank 1 of 2
    import torch

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    model = torch.nn.Linear(4, 2)
    with memprof.profile(model) as prof:
        model(torch.randn(3, 4)).sum().backward()
        prof.step()
    # WHEN the script saves "run.json" THEN rank 1's file is run.rank1.json, with its rank
    written = prof.save(tmp_path / "run.json")
    assert written == tmp_path / "run.rank1.json" and not (tmp_path / "run.json").exists()
    meta = memprof.load(written).meta["distributed"]
    assert (meta["rank"], meta["world_size"], meta["local_rank"]) == (1, 2, 1)


# ------------------------------------------------------------------ DDP
def test_ddp_ranks_write_their_own_files_with_exact_bytes(ddp_run: tuple[Path, Any]) -> None:
    cwd, done = ddp_run
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        profile = memprof.load(cwd / "reports" / f"train_ddp.rank{rank}.json")
        assert (cwd / "reports" / f"train_ddp.rank{rank}.html").exists()
        meta = profile.meta["distributed"]
        assert (meta["rank"], meta["world_size"], meta["backend"]) == (rank, 2, "gloo")
        frame = profile.modules().set_index("module")
        for name, dims in LAYERS.items():  # DDP wraps the model: its layers are module.N
            assert frame.loc[f"module.{name}", "parameter"] == _bytes(*dims)
            assert frame.loc[f"module.{name}", "gradient"] == _bytes(*dims)
        # DDP's one bucket is a flat copy of every gradient (gradient_as_bucket_view=False)
        (bucket,) = meta["engine"]
        assert bucket["kind"] == "ddp_buckets" and bucket["extra"] is True
        assert bucket["nbytes"] == sum(_bytes(*d) for d in LAYERS.values())
        # the bucket is alive at the peak (built in step 0), named by its size
        named = [a for a in meta["at_peak"] if a["nbytes"] == bucket["nbytes"]]
        assert named and named[0]["candidates"] == ["ddp_buckets of (root)"]
    assert not (cwd / "reports" / "train_ddp.json").exists()


def test_report_merges_the_ranks(ddp_run: tuple[Path, Any]) -> None:
    # GIVEN both ranks' profiles WHEN memprof report gets the two files
    cwd, _ = ddp_run
    files = [cwd / "reports" / f"train_ddp.rank{r}.json" for r in (0, 1)]
    done = subprocess.run([*MEMPROF, "report", *map(str, files), "--json"], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    peaks = [memprof.load(f).peak().total_bytes for f in files]
    # THEN one report, each rank's own peak, and the imbalance from those peaks
    assert Path(out["report"]) == cwd / "reports" / "train_ddp.ranks.html"
    assert [r["rank"] for r in out["ranks"]] == [0, 1]
    assert [r["peak_bytes"] for r in out["ranks"]] == peaks
    assert out["imbalance"]["ratio"] == pytest.approx(max(peaks) / min(peaks))
    assert out["imbalance"]["over_mean"] == round(max(peaks) - sum(peaks) / 2)
    # AND again: the existing report is not replaced without --force
    again = subprocess.run([*MEMPROF, "report", str(cwd / "reports" / "train_ddp.rank0.json"),
                            str(files[1])], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr


def test_a_folder_of_two_runs_is_refused_in_one_line(ddp_run: tuple[Path, Any],
                                                      tmp_path: Path) -> None:
    cwd, _ = ddp_run
    for r in (0, 1):
        for run in ("a", "b"):
            (tmp_path / f"{run}.rank{r}.json").write_bytes(
                (cwd / "reports" / f"train_ddp.rank{r}.json").read_bytes())
    done = subprocess.run([*MEMPROF, "report", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "several runs (a, b)" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_rank_given_twice_is_an_error(ddp_run: tuple[Path, Any]) -> None:
    cwd, _ = ddp_run
    profile = memprof.load(cwd / "reports" / "train_ddp.rank0.json")
    with pytest.raises(RanksError, match="rank 0 is given twice"):
        rank_rows([("a", profile), ("b", profile)])
    rows = rank_rows([("b", memprof.load(cwd / "reports" / "train_ddp.rank1.json")),
                      ("a", profile)])
    assert [r.rank for r in rows] == [0, 1]
    assert imbalance(rows).ratio == pytest.approx(
        max(r.peak_bytes for r in rows) / min(r.peak_bytes for r in rows))


def test_advice_on_a_ddp_rank_uses_its_world_size(ddp_run: tuple[Path, Any]) -> None:
    cwd, _ = ddp_run
    profile = memprof.load(cwd / "reports" / "train_ddp.rank0.json")
    rows = memprof.advise(profile).table()
    sharding = rows[rows["technique"] == "sharding"]
    ranks = {str(o) for o in sharding["options"]}
    assert any("ranks=2" in o or "'ranks': 2" in o for o in ranks), ranks


# ------------------------------------------------------------------ FSDP2
def test_fsdp2_ranks_count_their_local_shards(fsdp_run: tuple[Path, Any]) -> None:
    cwd, done = fsdp_run
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        profile = memprof.load(cwd / "reports" / f"train_fsdp2.rank{rank}.json")
        frame = profile.modules().set_index("module")
        engine = profile.meta["distributed"]["engine"]
        for name, (fan_in, fan_out) in LAYERS.items():
            # fully_shard splits dim 0 over 2 ranks: half the rows of the weight and the bias
            shard = 4 * ((fan_out // 2) * fan_in + fan_out // 2)
            assert frame.loc[name, "parameter"] == shard
            assert frame.loc[name, "gradient"] == shard
            kinds = {e["kind"]: e["nbytes"] for e in engine if e["module"] == name}
            assert kinds["fsdp_sharded"] == shard
            assert kinds["fsdp_unsharded"] == _bytes(fan_in, fan_out)
            assert kinds["fsdp_all_gather"] == 2 * shard  # no padding: the rows split evenly
            assert kinds["fsdp_reduce_scatter"] == 2 * shard
        # what is alive at the peak and has a unit's buffer size is named after that unit
        named = profile.meta["distributed"]["at_peak"]
        assert named
        for found in named:
            units = {c.rsplit(" of ", 1)[1] for c in found["candidates"]}
            assert len(units) == 1 and found["nbytes"] == _bytes(*LAYERS[units.pop()])
        advice = memprof.advise(profile).table()
        sharding = advice[advice["technique"] == "sharding"]
        assert len(sharding) == 1 and "already sharded by FSDP2" in str(
            sharding.iloc[0].to_dict())


# ------------------------------------------------------------------ exits
def test_a_rank_that_exits_early_keeps_its_exit_code(tmp_path: Path) -> None:
    # GIVEN rank 1 stops with exit code 5 without training (once rank 0's profile is saved:
    # torchrun then SIGTERMs the other ranks, and one killed before its save has no file;
    # CI lost rank 0's so once) WHEN both run under torchrun
    done = torchrun(DATA / "train_early_exit.py", tmp_path, "--no-html")
    # THEN nothing waits on it: torchrun reports the failure, and each rank's profile is there
    assert done.returncode != 0
    assert "exitcode  : 5" in done.stderr or "exit code 5" in done.stderr.lower() \
        or "exitcode: 5" in done.stderr.replace(" ", ""), done.stderr[-2000:]
    ranks = {r: memprof.load(tmp_path / "reports" / f"train_early_exit.rank{r}.json")
             for r in (0, 1)}
    assert ranks[1].meta["run"]["exit_code"] == 5
    assert ranks[0].meta["run"]["exit_code"] == 0
    assert ranks[0].meta["run"]["optimizer_steps"] == 2


# ------------------------------------------------------------------ browser
@pytest.mark.browser
def test_ranks_report_renders_both_ranks_in_chromium(ddp_run: tuple[Path, Any],
                                                      tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from browser import ARGS, CHROMIUM, Opened

    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    cwd, _ = ddp_run
    from memprof.report.ranks import write_ranks_report

    files = [cwd / "reports" / f"train_ddp.rank{r}.json" for r in (0, 1)]
    profiles = [(str(f), memprof.load(f)) for f in files]
    path = write_ranks_report(profiles, tmp_path / "ranks.html")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            opened = Opened(b, path)
            page = opened.page
            assert opened.errors == [] and opened.requests == [path.resolve().as_uri()]
            assert page.evaluate("document.body.dataset.chartsReady") == "1"
            # the chart has one bar per rank in each category trace
            xs = page.evaluate("document.getElementById('chart-ranks').data.map(t => t.x)")
            assert xs and all(x == ["rank 0", "rank 1"] for x in xs)
            cells = page.evaluate("Array.from(document.querySelectorAll('#rank-peaks tbody tr'))"
                                  ".map(r => r.cells[2].textContent)")
            assert cells == [memprof.format_bytes(p.peak().total_bytes) for _, p in profiles]
            assert page.locator("#rank-engine").count() == 1
            # each rank's ZeRO/FSDP rows, from the advice memprof run saved, at world size 2
            sharding = [tuple(r) for r in page.evaluate(
                "Array.from(document.querySelectorAll('#rank-sharding tbody tr'))"
                ".map(r => [r.cells[0].textContent, r.cells[2].textContent])")]
            assert {rank for rank, _ in sharding} == {"0", "1"}
            assert ("0", "2") in sharding and ("1", "2") in sharding
        finally:
            b.close()


# ------------------------------------------------------------------ DDP options
BUCKET_VIEW_RUN = """
import json, os, sys
import torch
import torch.distributed as dist
from torch import nn
import memprof

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
model = nn.parallel.DistributedDataParallel(
    nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8)),
    gradient_as_bucket_view=True)
opt = torch.optim.AdamW(model.parameters())
with memprof.profile(model, opt) as prof:
    for _ in range(2):
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
        opt.zero_grad()
        prof.step()
dist.destroy_process_group()
print(json.dumps({"engine": prof.profile.meta["distributed"]["engine"],
                  "warnings": prof.profile.warnings}), flush=True)
os._exit(0)  # see the test's docstring
"""


def test_ddp_gradient_as_bucket_view_is_flagged(tmp_path: Path) -> None:
    """DDP whose gradients are views of its buckets (one rank over gloo), in a subprocess that
    leaves without running destructors: in a long test process the gloo process group's
    destructor, run with the GIL held when the DDP module is freed, once waited for ever on its
    worker thread, which was freeing a finished allreduce whose thread-local state held a Python
    object and so needed the GIL (a torch race at teardown, seen in CI on 51aab5d)."""
    # GIVEN DDP whose gradients are views of its buckets
    done = subprocess.run([sys.executable, "-c", BUCKET_VIEW_RUN, str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # THEN the bucket is named, counted as gradient, and the profile says what it cannot show
    (bucket,) = result["engine"]
    assert bucket["extra"] is False and bucket["nbytes"] == sum(
        _bytes(*d) for d in LAYERS.values())
    assert any("gradient_as_bucket_view=True" in w for w in result["warnings"])


def test_a_rank_report_names_its_rank_and_engine(ddp_run: tuple[Path, Any]) -> None:
    from memprof.report import render_report

    cwd, _ = ddp_run
    profile = memprof.load(cwd / "reports" / "train_ddp.rank1.json")
    html = render_report(profile)
    assert "1 of 2 (gloo)" in html
    assert "engine: ddp_buckets" in html and memprof.format_bytes(37408) in html
