"""The CLI as users run it: real subprocesses (``python -m memprof``) on the examples.

Each test reads as GIVEN / WHEN / THEN. Expensive runs are shared by module-scoped fixtures.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import memprof
from memprof.commands.gpus import render
from memprof.devices import GpuInfo, GpuProcess, nvml

pytestmark = pytest.mark.slow  # memprof run, report and gpus in subprocesses

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DATA = Path(__file__).resolve().parent / "data"


def _provides(module: str, name: str) -> bool:
    """Whether a part written separately (report, advisor) is installed and usable."""
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


HAVE_REPORT = _provides("memprof.report", "write_report")
HAVE_ADVISOR = _provides("memprof.advisor", "advise")
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

#: The keys ``memprof run --json`` promises (docs in memprof/commands/run.py).
RUN_KEYS = {
    "target", "module", "argv", "exit_code", "error", "profile", "report", "steps",
    "optimizer_steps", "steps_seen", "interrupted", "peak", "modules", "advice", "notes",
    "warnings", "oom",
}
F32 = 4


@dataclass
class Result:
    """A finished ``memprof`` subprocess."""

    code: int
    stdout: str
    stderr: str
    cwd: Path

    def json(self) -> dict:
        return json.loads(self.stdout)

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def memprof_cli(*args: str | Path, cwd: Path, timeout: float = 240,
                fake_advisor: str | None = None) -> Result:
    """Run ``python -m memprof ARGS`` in ``cwd`` (where reports/ will be written);
    ``fake_advisor`` ("ok" or "raise") swaps in tests/data/fake_advisor's stand-in."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    paths = [str(ROOT), env.get("PYTHONPATH")]
    if fake_advisor:
        env["MEMPROF_FAKE_ADVISOR"] = fake_advisor
        paths.insert(0, str(DATA / "fake_advisor"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    proc = subprocess.run(
        [sys.executable, "-m", "memprof", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr, cwd)


def assert_one_line_error(result: Result, code: int) -> None:
    """The bad-input contract: the given exit code, one line on stderr, no traceback."""
    assert result.code == code, result.stderr
    lines = result.error_lines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("memprof: error: ")
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory: pytest.TempPathFactory) -> Result:
    cwd = tmp_path_factory.mktemp("mlp")
    return memprof_cli("run", "--json", "--steps", "2", "--budget", "24GiB",
                       EXAMPLES / "train_mlp.py",
                       "--steps", "4", "--batch", "32", cwd=cwd)


@pytest.fixture(scope="module")
def crash_run(tmp_path_factory: pytest.TempPathFactory) -> Result:
    cwd = tmp_path_factory.mktemp("crash")
    return memprof_cli("run", "--no-html", DATA / "raise_midway.py", "2", cwd=cwd)


# ---------------------------------------------------------------- help
def test_help_lists_every_command_with_examples(tmp_path: Path) -> None:
    # GIVEN the installed CLI / WHEN asked for help / THEN each command shows an example
    top = memprof_cli("--help", cwd=tmp_path)
    assert top.code == 0
    for verb in ("run", "report", "gpus"):
        assert verb in top.stdout
        sub = memprof_cli(verb, "--help", cwd=tmp_path)
        assert sub.code == 0, sub.stderr
        assert "Examples:" in sub.stdout
        assert f"memprof {verb}" in sub.stdout.split("Examples:")[1]


def test_version(tmp_path: Path) -> None:
    result = memprof_cli("--version", cwd=tmp_path)
    assert result.code == 0
    assert memprof.__version__ in result.stdout


# ---------------------------------------------------------------- run: training
def test_run_mlp_json_has_stable_keys_and_exact_bytes(mlp_run: Result) -> None:
    # GIVEN an MLP 256-512-512-10 trained with AdamW, profiled for 2 of its 4 steps
    assert mlp_run.code == 0, mlp_run.stderr
    data = mlp_run.json()  # stdout holds only the JSON: the script's prints went to stderr
    assert set(data) == RUN_KEYS
    assert "step 3: loss" in mlp_run.stderr  # the script ran to its end
    # THEN exactly the first two steps were profiled
    assert data["steps"] == 2
    assert data["optimizer_steps"] == 4
    assert data["exit_code"] == 0 and data["error"] is None and data["interrupted"] is False
    params = (256 * 512 + 512) + (512 * 512 + 512) + (512 * 10 + 10)
    peak = data["peak"]["by_category"]
    assert peak["parameter"] == params * F32
    assert peak["gradient"] == params * F32
    # AdamW: exp_avg + exp_avg_sq per parameter, plus a 4-byte step counter per tensor
    assert peak["optimizer_state"] == 2 * params * F32 + 6 * F32
    assert data["peak"]["total_bytes"] == sum(peak.values())
    largest = data["modules"][0]
    assert largest["module"] == "2" and largest["type"] == "Linear"
    assert largest["parameter"] == (512 * 512 + 512) * F32
    assert largest["held"] == 4 * largest["parameter"] + 8  # + grad + two Adam states + steps


def test_run_writes_a_loadable_profile_with_run_metadata(mlp_run: Result) -> None:
    data = mlp_run.json()
    path = mlp_run.cwd / "reports" / "train_mlp.json"
    assert data["profile"] == str(Path("reports") / "train_mlp.json")
    profile = memprof.load(path)
    assert len(profile.steps_stats) == 2
    assert profile.peak().total_bytes == data["peak"]["total_bytes"]
    run = profile.meta["run"]
    assert run["exit_code"] == 0 and run["max_steps"] == 2
    assert run["argv"][1:] == ["--steps", "4", "--batch", "32"]
    assert profile.optimizers[0]["class"] == "AdamW"


def test_run_html_report_or_a_one_line_note(mlp_run: Result) -> None:
    html = mlp_run.cwd / "reports" / "train_mlp.html"
    if HAVE_REPORT:
        assert html.is_file() and html.stat().st_size > 0
        assert mlp_run.json()["report"] == str(Path("reports") / "train_mlp.html")
    else:
        assert not html.exists()
        assert "HTML report skipped" in mlp_run.stderr
        assert any("HTML report skipped" in n for n in mlp_run.json()["notes"])


def test_run_advice_or_a_one_line_note(mlp_run: Result) -> None:
    data = mlp_run.json()
    saved = memprof.load(mlp_run.cwd / "reports" / "train_mlp.json")
    if HAVE_ADVISOR:
        assert isinstance(data["advice"], dict) and data["advice"]
        assert saved.advice == data["advice"]  # saved with the profile for later reports
    else:
        assert data["advice"] is None and saved.advice is None
        assert any(n.startswith("advice skipped") for n in data["notes"])


@pytest.mark.parametrize("mode", ["ok", "raise"])
def test_run_prints_and_saves_advice_and_survives_a_failing_advisor(
    tmp_path: Path, mode: str
) -> None:
    # GIVEN a stand-in advisor that answers or raises
    result = memprof_cli("run", "--no-html", "--budget", "1MiB", DATA / "exit_code.py", "0",
                         cwd=tmp_path, fake_advisor=mode)
    # THEN the run succeeds either way; good advice is printed and saved with the profile
    assert result.code == 0, result.stderr
    saved = memprof.load(tmp_path / "reports" / "exit_code.json")
    if mode == "ok":
        peak = saved.peak().total_bytes
        assert f"FAKE ADVICE top=3 budget=1MiB peak={peak}" in result.stdout
        assert saved.advice is not None and saved.advice["budget"] == "1MiB"
        assert saved.advice["recommendations"][0]["saving_bytes"] == 123
    else:
        assert "Traceback" not in result.stderr
        assert "advice skipped: the advisor failed (RuntimeError: advisor exploded)" \
            in result.stderr
        assert saved.advice is None


def test_run_refuses_to_overwrite_without_force(mlp_run: Result) -> None:
    # GIVEN the profile from a first run
    path = mlp_run.cwd / "reports" / "train_mlp.json"
    before = path.read_bytes()
    # WHEN run again without --force / THEN exit 3 before the script runs, file untouched
    again = memprof_cli("run", EXAMPLES / "train_mlp.py", "--steps", "1", cwd=mlp_run.cwd)
    assert_one_line_error(again, 3)
    assert "--force" in again.stderr
    assert "loss" not in again.stdout
    assert path.read_bytes() == before
    # WHEN forced / THEN replaced
    forced = memprof_cli("run", "--force", "--no-html", "--json", EXAMPLES / "train_mlp.py",
                         "--steps", "1", cwd=mlp_run.cwd)
    assert forced.code == 0, forced.stderr
    assert forced.json()["optimizer_steps"] == 1
    steps = memprof.load(path).steps_stats
    assert steps[0].peak_by_category["optimizer_state"] > 0
    assert path.read_bytes() != before


def test_run_cnn_counts_batchnorm_buffers_and_momentum(tmp_path: Path) -> None:
    result = memprof_cli("run", "--json", "--no-html", "-o", "out/cnn.json", "--steps", "2",
                         EXAMPLES / "train_cnn.py", "--steps", "2", cwd=tmp_path)
    assert result.code == 0, result.stderr
    data = result.json()
    assert data["profile"] == str(Path("out") / "cnn.json")
    assert (tmp_path / "out" / "cnn.json").is_file()
    assert not (tmp_path / "out" / "cnn.html").exists()
    peak = data["peak"]["by_category"]
    # running_mean + running_var (C floats each) + num_batches_tracked (int64), C = 16, 32, 64
    assert peak["buffer"] == (16 + 32 + 64) * 2 * F32 + 3 * 8
    # SGD momentum: one buffer the size of each parameter
    params = (3 * 16 * 9 + 16 * 32 * 9 + 32 * 64 * 9) + 2 * (16 + 32 + 64) + (64 * 10 + 10)
    assert peak["parameter"] == params * F32
    assert peak["optimizer_state"] == params * F32
    assert peak["activation"] > 0


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed")
def test_run_gpt2_from_config_counts_tied_embedding_once(tmp_path: Path) -> None:
    result = memprof_cli("run", "--json", "--no-html", "--steps", "1",
                         EXAMPLES / "train_gpt2.py", "--steps", "2", cwd=tmp_path)
    assert result.code == 0, result.stderr
    data = result.json()
    assert data["steps"] == 1
    d, vocab, pos, layers = 128, 1000, 64, 2
    per_layer = (2 * 2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) \
        + (4 * d * d + d)
    params = vocab * d + pos * d + layers * per_layer + 2 * d  # lm_head is tied to wte
    assert data["peak"]["by_category"]["parameter"] == params * F32
    profile = memprof.load(tmp_path / "reports" / "train_gpt2.json")
    assert profile.optimizers[0]["num_parameters"] == params
    assert data["peak"]["by_category"]["activation"] > 0


# ---------------------------------------------------------------- run: other scripts
def test_run_inference_script_is_one_step(tmp_path: Path) -> None:
    # GIVEN a script with no optimizer and no backward
    result = memprof_cli("run", "--json", "--no-html", EXAMPLES / "infer.py", cwd=tmp_path)
    assert result.code == 0, result.stderr
    data = result.json()
    # THEN the whole run is one step holding parameters and no training state
    assert data["steps"] == 1
    peak = data["peak"]["by_category"]
    params = (256 * 1024 + 1024) + 2 * 1024 + (1024 * 10 + 10)
    assert peak["parameter"] == params * F32
    assert peak["gradient"] == peak["optimizer_state"] == peak["activation"] == 0
    assert peak["input"] == 32 * 256 * F32
    assert (tmp_path / "reports" / "infer.json").is_file()


def test_run_script_that_raises_keeps_partial_profile(crash_run: Result) -> None:
    # GIVEN a script that raises in its third step
    # THEN exit 1, the traceback as Python shows it (from the script's frame), profile saved
    assert crash_run.code == 1
    err = crash_run.stderr
    assert "Traceback (most recent call last):" in err
    assert "ValueError: simulated failure at step 2" in err
    first_frame = err.split("Traceback (most recent call last):\n", 1)[1].splitlines()[0]
    assert "raise_midway.py" in first_frame
    assert "runpy" not in err and "memprof/commands" not in err
    profile = memprof.load(crash_run.cwd / "reports" / "raise_midway.json")
    assert profile.meta["interrupted"] is True
    assert [s.step for s in profile.steps_stats] == [0, 1, 2]
    assert any("interrupted" in w for w in profile.warnings)
    assert profile.meta["run"]["exit_code"] == 1
    assert "ValueError: simulated failure at step 2" in crash_run.stdout  # in the summary line


def test_run_keeps_script_exit_code_and_argv(tmp_path: Path) -> None:
    result = memprof_cli("run", "--json", "--no-html", DATA / "exit_code.py", "3", "--flag", "x",
                         cwd=tmp_path)
    assert result.code == 3
    # the script's own print, moved to stderr
    seen = json.loads(next(ln for ln in result.stderr.splitlines() if ln.startswith('{"argv"')))
    assert seen == {"argv": [str(DATA / "exit_code.py"), "3", "--flag", "x"], "name": "__main__"}
    data = result.json()
    assert data["exit_code"] == 3 and data["error"] is None
    assert data["optimizer_steps"] == 1
    assert data["peak"]["by_category"]["optimizer_state"] == 2 * (16 * 16 + 16) * F32 + 2 * F32
    assert memprof.load(tmp_path / "reports" / "exit_code.json").meta["run"]["exit_code"] == 3


def test_run_module_with_dash_m(tmp_path: Path) -> None:
    # GIVEN a module importable from the current directory
    (tmp_path / "pkgdemo").mkdir()
    (tmp_path / "pkgdemo" / "__init__.py").write_text("")
    (tmp_path / "pkgdemo" / "train.py").write_text((DATA / "exit_code.py").read_text())
    # WHEN run with -m; options after the module name belong to it
    result = memprof_cli("run", "--no-html", "-m", "pkgdemo.train", "0", "--steps", "9",
                         cwd=tmp_path)
    assert result.code == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[0])
    assert seen["name"] == "__main__"
    assert seen["argv"] == [str(tmp_path / "pkgdemo" / "train.py"), "0", "--steps", "9"]
    assert "memprof run: pkgdemo.train (exit code 0)" in result.stdout
    assert (tmp_path / "reports" / "train.json").is_file()


def test_run_writes_where_memprof_started_even_if_script_chdirs(tmp_path: Path) -> None:
    result = memprof_cli("run", "--no-html", DATA / "chdir.py", "elsewhere", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert (tmp_path / "reports" / "chdir.json").is_file()
    assert not (tmp_path / "elsewhere" / "reports").exists()


# ---------------------------------------------------------------- run: bad input
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "no such script"),
        ("directory", "is a directory"),
        ("prose", "is not a Python script"),
        ("binary", "is not a Python script"),
        ("nothing", "no script given"),
        ("unknown-option", "No such option"),
        ("no-module", "no module named"),
        ("bad-budget", "24 gigs"),
        ("html-output", "looks like HTML"),
    ],
)
def test_run_bad_input_is_one_line_and_writes_nothing(
    tmp_path: Path, case: str, expected: str
) -> None:
    (tmp_path / "adir").mkdir()
    (tmp_path / "notes.txt").write_text("These are my notes, not a program.\n")
    (tmp_path / "blob.py").write_bytes(b"\x00\x01\x02binary\xff")
    script = str(DATA / "exit_code.py")
    args = {
        "missing": ["nothere.py"],
        "directory": ["adir"],
        "prose": ["notes.txt"],
        "binary": ["blob.py"],
        "nothing": [],
        "unknown-option": ["--frobnicate", script, "0"],
        "no-module": ["-m", "no_such_module_xyz"],
        "bad-budget": ["--budget", "24 gigs", script, "0"],
        "html-output": ["-o", "r.html", script, "0"],
    }[case]
    result = memprof_cli("run", *args, cwd=tmp_path)
    assert_one_line_error(result, 2)
    assert expected.lower() in result.stderr.lower()
    assert result.stdout == ""  # the script never ran
    assert not (tmp_path / "reports").exists()


# ---------------------------------------------------------------- report
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file"),
        ("this is not json", "not valid JSON"),
        ('{"schema": "memprof-profile", "version": 1, "modu', "truncated"),
        ('{"hello": 1}', "not a memprof profile"),
        ('{"schema": "memprof-profile", "version": 1, "modules": [{"x": 1}]}', "damaged"),
        ("<directory>", "is a directory"),
        ("<binary>", "cannot read it"),
    ],
)
def test_report_bad_profile_is_one_line(tmp_path: Path, content: str | None,
                                         expected: str) -> None:
    path = tmp_path / "p.json"
    if content == "<directory>":
        path.mkdir()
    elif content == "<binary>":
        path.write_bytes(b"\xff\xfe\x00garbage")
    elif content is not None:
        path.write_text(content)
    result = memprof_cli("report", path, cwd=tmp_path)
    assert_one_line_error(result, 2)
    assert expected in result.stderr
    assert not (tmp_path / "p.html").exists()


def test_report_refuses_existing_output(crash_run: Result, tmp_path: Path) -> None:
    out = tmp_path / "existing.html"
    out.write_text("keep me")
    result = memprof_cli("report", crash_run.cwd / "reports" / "raise_midway.json", "-o", out,
                         cwd=tmp_path)
    assert_one_line_error(result, 3)
    assert out.read_text() == "keep me"


def test_report_never_replaces_its_own_profile(crash_run: Result) -> None:
    profile = crash_run.cwd / "reports" / "raise_midway.json"
    before = profile.read_bytes()
    result = memprof_cli("report", profile, "-o", profile, "--force", cwd=crash_run.cwd)
    assert_one_line_error(result, 2)
    assert profile.read_bytes() == before


@pytest.mark.skipif(not HAVE_REPORT, reason="memprof.report is not installed yet")
def test_report_writes_html_from_saved_profile(crash_run: Result, tmp_path: Path) -> None:
    profile = crash_run.cwd / "reports" / "raise_midway.json"
    out = tmp_path / "crash.html"
    result = memprof_cli("report", profile, "-o", out, "--json", cwd=tmp_path)
    assert result.code == 0, result.stderr
    data = result.json()
    assert set(data) == {"profile", "report", "bytes", "steps", "peak_bytes"}
    assert data["report"] == str(out) and data["bytes"] == out.stat().st_size > 0
    assert data["steps"] == 3
    assert data["peak_bytes"] == memprof.load(profile).peak().total_bytes


# ---------------------------------------------------------------- gpus
def test_gpus_without_driver_is_one_line_exit_4(tmp_path: Path) -> None:
    if nvml().available:
        result = memprof_cli("gpus", "--json", cwd=tmp_path)
        assert result.code == 0
        data = result.json()
        assert data["available"] is True and data["gpus"]
        assert {"index", "name", "total_bytes", "used_bytes", "free_bytes", "processes"} \
            <= set(data["gpus"][0])
        return
    result = memprof_cli("gpus", cwd=tmp_path)
    assert_one_line_error(result, 4)
    assert "no NVIDIA driver" in result.stderr
    as_json = memprof_cli("gpus", "--json", cwd=tmp_path)
    assert as_json.code == 4
    assert as_json.json() == {"available": False, "reason": nvml().reason, "driver": None,
                              "cuda": None, "gpus": []}


def test_gpus_table_is_aligned_with_iec_units() -> None:
    gib = 1 << 30
    gpus = [
        GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * gib, 20 * gib, 60 * gib,
                [GpuProcess(4242, 19 * gib, "python"), GpuProcess(7, None, "")]),
        GpuInfo(1, "NVIDIA A100-SXM4-40GB", 40 * gib, 512 << 20, 40 * gib - (512 << 20)),
    ]
    text = render(gpus, {"driver": "550.54.15", "cuda": "12.4"})
    lines = text.splitlines()
    assert lines[0] == "NVIDIA driver 550.54.15, CUDA 12.4"
    header, rule, *gpu_rows = lines[2:6]
    assert header.split() == ["gpu", "name", "total", "used", "free", "used", "%"]
    assert set(rule.replace(" ", "")) == {"-"}
    assert "80.0 GiB" in gpu_rows[0] and "25.0%" in gpu_rows[0]
    assert "512.0 MiB" in gpu_rows[1] and "1.2%" in gpu_rows[1]
    # right-aligned size columns end at the same place on every row
    assert all(len(row) == len(header) for row in gpu_rows)
    assert "19.0 GiB" in text and "4242" in text
    assert any(line.rstrip().endswith("-") and " 7 " in line for line in lines)


# ---------------------------------------------------------------- the command line itself
def test_no_command_and_unknown_command_are_one_line(tmp_path: Path) -> None:
    # GIVEN no command at all: one line naming the commands, not the whole help as an error
    bare = memprof_cli(cwd=tmp_path)
    assert_one_line_error(bare, 2)
    assert bare.error_lines()[0] == (
        "memprof: error: memprof needs a command (run, report, export, advise, estimate, gpus,"
        " diff) (see memprof --help)")
    # GIVEN a misspelt command: the hint once, without "memprof: error: memprof:"
    typo = memprof_cli("gpu", cwd=tmp_path)
    assert_one_line_error(typo, 2)
    assert typo.error_lines()[0].startswith("memprof: error: No such command 'gpu'.")
    assert "'gpus'" in typo.stderr


# ---------------------------------------------------------------- in-process pieces
def test_python_dash_m_memprof_cli_works(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "memprof.cli", "--version"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and memprof.__version__ in proc.stdout


def test_optional_command_missing_or_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    import click
    from click.testing import CliRunner

    from memprof import cli

    real_import = cli.importlib.import_module

    def fake_import(name: str) -> object:
        if name == "memprof.commands.advise":
            raise ModuleNotFoundError("No module named 'memprof.commands.advise'", name=name)
        if name == "memprof.commands.estimate":
            raise ModuleNotFoundError("No module named 'scipy'", name="scipy")
        return real_import(name)

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    group = click.Group("memprof")
    cli._register(group)
    # GIVEN advise absent and estimate broken: advise is left out, estimate explains itself
    assert "advise" not in group.commands
    assert {"run", "report", "gpus", "estimate"} <= set(group.commands)
    result = CliRunner().invoke(group, ["estimate", "gpt2", "--batch", "4"])
    assert result.exit_code == 1
    assert "memprof estimate is unavailable: No module named 'scipy'" in result.output

    def broken_required(name: str) -> object:
        raise ModuleNotFoundError("No module named 'pandas'", name="pandas")

    monkeypatch.setattr(cli.importlib, "import_module", broken_required)
    with pytest.raises(ModuleNotFoundError):  # a required command never hides its bug
        cli._register(click.Group("memprof"))


def test_table_aligns_numbers_right_and_text_left() -> None:
    from memprof.commands.common import size, table

    rows = [["a", size(1536)], ["longer", size(3 << 30)], ["x", size(None)]]
    lines = table(["name", "bytes"], rows).splitlines()
    assert lines == [
        "name      bytes",
        "------  -------",
        "a       1.5 KiB",
        "longer  3.0 GiB",
        "x             -",
    ]


def test_output_path_checks(tmp_path: Path) -> None:
    from memprof.commands.common import CommandError, output_path
    from memprof.errors import OutputExistsError

    (tmp_path / "file").write_text("x")
    assert output_path(tmp_path / "new" / "a.json", force=False, what="profile").name == "a.json"
    with pytest.raises(OutputExistsError):
        output_path(tmp_path / "file", force=False, what="profile")
    assert output_path(tmp_path / "file", force=True, what="profile").exists()
    with pytest.raises(CommandError, match="is a directory"):
        output_path(tmp_path, force=True, what="profile")
    with pytest.raises(CommandError, match="is not a directory"):
        output_path(tmp_path / "file" / "a.json", force=True, what="profile")
