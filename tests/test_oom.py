"""The out-of-memory post-mortem, on real CPU OOMs: a subprocess caps its own address space
(``RLIMIT_AS``, set after torch is imported, above what the interpreter already maps) and runs
a training step that cannot fit under the cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from script_runs import OOM_SCRIPT

import memprof
from memprof.advisor.oom_plan import needed_profile
from memprof.oom import OOMReport, is_oom, requested_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="RLIMIT_AS and /proc/self/status are Linux's")


API_SCRIPT = textwrap.dedent("""
    import resource, sys
    import torch
    from torch import nn
    import memprof

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 1 << 20)))
    x = torch.randn(256, 64)

    def vm_size():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024

    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + (512 << 20), resource.RLIM_INFINITY))
    prof = memprof.profile(model, backend=sys.argv[1])
    try:
        with prof:
            model(x).sum().backward()
    except RuntimeError as exc:
        caught = exc
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert "can't allocate memory" in str(caught)
    prof.profile.save(sys.argv[2])
""")

GIB = 1 << 30


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


# ------------------------------------------------------------------ unit
def test_requested_size_is_read_from_both_allocators_messages() -> None:
    cpu = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
           "memory: you tried to allocate 1073741824 bytes. Error code 12")
    cuda = ("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of "
            "79.15 GiB of which 1.06 GiB is free.")
    assert requested_bytes(cpu) == GIB
    assert requested_bytes(cuda) == int(2.5 * GIB)
    assert requested_bytes("Tried to allocate 20.00 MiB") == 20 << 20
    assert requested_bytes("something else") is None
    assert is_oom(RuntimeError(cpu))
    assert is_oom(torch.cuda.OutOfMemoryError(cuda))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("out of memory"))


def test_a_profile_that_did_not_oom_has_no_report_and_old_files_still_load(
    tmp_path: Path,
) -> None:
    model = torch.nn.Linear(4, 4)
    with memprof.profile(model) as prof:
        model(torch.randn(2, 4)).sum().backward()
    assert prof.profile.oom is None
    data = prof.profile.to_dict()
    data.pop("oom")  # as written before the field existed
    assert memprof.Profile.from_dict(data).oom is None


def test_the_needed_peak_adds_the_failed_request_to_what_was_live() -> None:
    model = torch.nn.Linear(4, 4)
    with memprof.profile(model) as prof:
        model(torch.randn(2, 4)).sum().backward()
    report = OOMReport(error="RuntimeError: x", requested_bytes=1000, module="", phase="backward",
                       step=0, live_bytes=prof.peak().total_bytes + 10,
                       by_category={"parameter": 80}, by_module={"": {"parameter": 80}})
    needed = needed_profile(prof.profile, report)
    assert needed.peak().total_bytes == report.live_bytes + 1000
    assert needed.peak().by_category["temporary"] == 1000
    assert prof.profile.peak().total_bytes < needed.peak().total_bytes  # the original is kept


def test_memprof_run_gives_back_the_address_space_a_script_capped(tmp_path: Path) -> None:
    import resource

    from memprof.commands.script_runner import Target, script_environment

    before = resource.getrlimit(resource.RLIMIT_AS)
    script = tmp_path / "capped.py"
    script.write_text("")
    # WHEN the script caps its own address space (far above what this test maps)
    with script_environment(Target(name="capped.py", is_module=False, argv=[str(script)],
                                   path=script)):
        resource.setrlimit(resource.RLIMIT_AS, (1 << 46, before[1]))
        assert resource.getrlimit(resource.RLIMIT_AS)[0] == 1 << 46
    # THEN memprof's own work after it (advice, the report) runs under the limit it had before
    assert resource.getrlimit(resource.RLIMIT_AS) == before


# ------------------------------------------------------------------ real OOMs
@pytest.mark.slow
@pytest.mark.parametrize(("phase", "asked"), [("forward", GIB), ("backward", 256 << 20)])
def test_memprof_run_keeps_the_error_and_names_the_request(
    tmp_path: Path, phase: str, asked: int
) -> None:
    # GIVEN a script whose step cannot fit under its address-space cap, and a file of the user's
    script = tmp_path / "train_oom.py"
    script.write_text(OOM_SCRIPT)
    reports = tmp_path / "reports"
    reports.mkdir()
    mine = reports / "notes.txt"
    mine.write_text("mine")
    # WHEN memprof runs it
    proc = _run(["-m", "memprof", "run", "train_oom.py", phase], tmp_path)
    # THEN the script's error and exit code are kept
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "can't allocate memory" in proc.stderr
    assert "Traceback" in proc.stderr
    # AND the summary opens with the post-mortem
    assert f"out of memory: asked for {memprof.format_bytes(asked)} in '2.0' {phase}" in proc.stdout
    # AND the partial profile loads and names the request, the module and the phase
    profile = memprof.load(reports / "train_oom.json")
    oom = profile.oom
    assert oom is not None
    assert oom.requested_bytes is not None and abs(oom.requested_bytes - asked) <= asked / 100
    assert (oom.module, oom.phase, oom.step) == ("2.0", phase, 0)
    # the 256 MiB weight of '2.0' was alive when it failed
    assert oom.by_module["2.0"]["parameter"] == 64 * (1 << 20) * 4 + (1 << 20) * 4
    assert oom.live_bytes == sum(oom.by_category.values())
    assert oom.capacity_source.startswith("RLIMIT_AS") and oom.capacity_bytes
    assert oom.budget_bytes is not None and oom.budget_bytes < oom.capacity_bytes
    assert oom.plan is not None and "explanation" in oom.plan
    assert (reports / "train_oom.html").exists(), proc.stderr[-2000:]
    html = (reports / "train_oom.html").read_text()
    assert 'id="headline-oom"' in html and "<dt>asked for</dt>" in html
    assert "<dt>fix</dt>" in html  # the card ends with the same fix as the headline
    assert mine.read_text() == "mine"
    # AND a second run refuses to replace the profile it wrote
    again = _run(["-m", "memprof", "run", "train_oom.py", phase], tmp_path)
    assert again.returncode != 0 and "already exists" in again.stderr
    assert memprof.load(reports / "train_oom.json").oom == oom
    # AND --json carries the post-mortem
    as_json = _run(["-m", "memprof", "run", "--json", "-o", "reports/again.json", "--no-html",
                    "train_oom.py", phase], tmp_path)
    assert as_json.returncode == 1
    found = json.loads(as_json.stdout)["oom"]
    assert (found["module"], found["phase"], found["requested_bytes"]) == ("2.0", phase, asked)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dispatch", "events"])
def test_memprof_profile_records_the_oom_on_both_backends(tmp_path: Path, backend: str) -> None:
    script = tmp_path / "api.py"
    script.write_text(API_SCRIPT)
    out = tmp_path / "oom.json"
    proc = _run([str(script), backend, str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    profile = memprof.load(out)
    assert profile.oom is not None
    assert profile.oom.requested_bytes == GIB
    assert (profile.oom.module, profile.oom.phase) == ("2.0", "forward")
    # the activation ReLU saved (its 256 x 64 fp32 output) was alive
    assert profile.oom.by_module["1"]["activation"] == 256 * 64 * 4
    assert profile.summary().startswith("memprof: out of memory: asked for 1.0 GiB in '2.0'")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_oom_live_bytes_match_the_allocator() -> None:
    transformers = pytest.importorskip("transformers")
    # GIVEN GPT-2 on the GPU, capped to what it holds plus 256 MiB: its forward cannot fit
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1000,
                                     n_positions=512)
    model = transformers.GPT2LMHeadModel(config).cuda()
    opt = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 1000, (64, 512), device="cuda")
    torch.cuda.synchronize()
    _free, total = torch.cuda.mem_get_info()
    cap = torch.cuda.memory_allocated() + (256 << 20)
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        prof = memprof.profile(model, opt)
        with pytest.raises(torch.cuda.OutOfMemoryError), prof:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    oom = prof.profile.oom
    # THEN the allocator's own figures were kept, and memprof's live bytes agree with them
    assert oom is not None and oom.device_allocated_bytes is not None
    assert oom.requested_bytes is not None and oom.requested_bytes > 0
    assert oom.live_bytes == pytest.approx(oom.device_allocated_bytes, rel=0.02)
    assert oom.module.startswith("transformer") or oom.module == "lm_head"
    assert oom.capacity_bytes is not None and oom.capacity_bytes <= total
    assert oom.plan is not None
