"""PyTorch's own formats: memory_viz snapshots (export, import, torch's reader) and Chrome traces.

Snapshots are built here to the format ``torch.cuda.memory._snapshot`` documents (segments with
blocks; device_traces of alloc / free_requested / free_completed events with frames), since no
GPU is at hand; torch's own reader (``torch.cuda._memory_viz``) checks what memprof writes.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from models import make_mlp

import memprof
from memprof.categories import CATEGORIES
from memprof.errors import ProfileLoadError
from memprof.snapshot.chrome_trace import to_trace
from memprof.snapshot.memory_viz import to_snapshot, write_snapshot


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def mlp_profile() -> memprof.Profile:
    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    with memprof.profile(model, optimizer, backend="dispatch") as prof:
        for _ in range(2):
            model(torch.randn(32, 64)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            prof.step()
    return prof.profile


def _frame(filename: str, line: int, name: str) -> dict[str, Any]:
    return {"filename": filename, "line": line, "name": name}


class SnapshotBuilder:
    """A snapshot in ``_dump_snapshot``'s format: one segment, a trace, frames per event."""

    def __init__(self, base: int = 0x7000_0000, size: int = 1 << 20) -> None:
        self.base, self.size = base, size
        self.trace: list[dict[str, Any]] = []
        self.live: dict[int, tuple[int, list[dict[str, Any]]]] = {}
        self.clock = 1_000

    def alloc(self, offset: int, size: int, frames: list[dict[str, Any]], **extra: Any) -> int:
        addr = self.base + offset
        self.clock += 10
        self.trace.append({"action": "alloc", "addr": addr, "size": size, "stream": 0,
                           "frames": frames, "time_us": self.clock, **extra})
        self.live[addr] = (size, frames)
        return addr

    def free(self, addr: int) -> None:
        size, frames = self.live.pop(addr)
        for action in ("free_requested", "free_completed"):
            self.clock += 1
            self.trace.append({"action": action, "addr": addr, "size": size, "stream": 0,
                               "frames": frames, "time_us": self.clock})

    def snapshot(self) -> dict[str, Any]:
        blocks, cursor = [], self.base
        for addr in sorted(self.live):
            size, frames = self.live[addr]
            if addr > cursor:
                blocks.append({"address": cursor, "size": addr - cursor, "requested_size": 0,
                               "state": "inactive", "frames": []})
            blocks.append({"address": addr, "size": size, "requested_size": size,
                           "state": "active_allocated", "frames": frames})
            cursor = addr + size
        if cursor < self.base + self.size:
            blocks.append({"address": cursor, "size": self.base + self.size - cursor,
                           "requested_size": 0, "state": "inactive", "frames": []})
        active = sum(size for size, _ in self.live.values())
        return {"segments": [{"device": 0, "address": self.base, "total_size": self.size,
                              "allocated_size": active, "active_size": active,
                              "requested_size": active, "stream": 0, "segment_type": "large",
                              "blocks": blocks}],
                "device_traces": [self.trace]}


def _write(path: Path, data: Any) -> Path:
    path.write_bytes(pickle.dumps(data))
    return path


# ----------------------------------------------------------------------------- export
def test_export_blocks_at_the_peak_add_up_to_the_profile(mlp_profile: memprof.Profile) -> None:
    # GIVEN a real profile WHEN it is exported THEN the live blocks are the peak, exactly
    snap = to_snapshot(mlp_profile)
    peak = mlp_profile.peak()
    active = [b for s in snap["segments"] for b in s["blocks"] if b["state"] == "active_allocated"]
    assert sum(b["requested_size"] for b in active) == peak.total_bytes
    for seg in snap["segments"]:
        assert sum(b["size"] for b in seg["blocks"]) == seg["total_size"]
        addrs = [b["address"] for b in seg["blocks"]]
        assert addrs == sorted(addrs) and addrs[0] == seg["address"]
    # the trace replays to the same live set: every live block was allocated and not freed
    live: dict[int, int] = {}
    for event in snap["device_traces"][0]:
        if event["action"] == "alloc":
            assert event["addr"] not in live
            live[event["addr"]] = event["size"]
        elif event["action"] == "free_completed":
            del live[event["addr"]]
    assert live == {b["address"]: b["size"] for b in active}
    # the largest tensors are blocks of their own, named by module and category
    names = {(b["frames"][-1]["name"], b["frames"][-2]["name"]) for b in active
             if "memprof_tensor" in b}
    for t in peak.top_tensors:
        assert (t.category, f"{t.module} ({t.phase})") in names


@pytest.mark.slow  # torch's reader runs in a subprocess
def test_torchs_reader_accepts_the_export(mlp_profile: memprof.Profile, tmp_path: Path) -> None:
    # GIVEN the pickle memprof writes WHEN torch's own reader runs on it (a subprocess)
    path = write_snapshot(mlp_profile, tmp_path / "snap.pickle")
    for action in ("stats", "trace"):
        proc = subprocess.run([sys.executable, "-m", "torch.cuda._memory_viz", action, str(path)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        if action == "stats":
            stats = proc.stdout
    # THEN its totals are the profile's peak (segments needs flamegraph.pl from the network:
    # call it in a subprocess with a formatter that returns the folded lines instead)
    from torch.cuda._memory_viz import _format_size

    assert f"total_allocated: {_format_size(mlp_profile.peak().total_bytes)}" in stats
    code = ("import pickle,sys; from torch.cuda._memory_viz import segments, trace_plot; "
            "d = pickle.load(open(sys.argv[1], 'rb')); "
            "print(sum(int(l.rsplit(' ', 1)[1]) for l in segments(d, lambda s: s).splitlines() "
            "if ';active_allocated;' in l and '<gaps>' not in l)); trace_plot(d)")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) == mlp_profile.peak().total_bytes


@pytest.mark.slow  # memprof export runs in subprocesses
def test_export_cli_refuses_to_overwrite_and_reports_bad_input(
        mlp_profile: memprof.Profile, tmp_path: Path) -> None:
    profile_path = mlp_profile.save(tmp_path / "p.json")
    out = tmp_path / "t.json"
    out.write_text("keep")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "memprof", "export", *args],
                              capture_output=True, text=True, timeout=120)

    proc = cli(str(profile_path), "--format", "chrome-trace", "-o", str(out))
    assert proc.returncode != 0 and out.read_text() == "keep"
    assert len(proc.stderr.strip().splitlines()) == 1 and "already exists" in proc.stderr
    proc = cli(str(profile_path), "--format", "chrome-trace", "-o", str(out), "--force", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["bytes"] == out.stat().st_size
    json.loads(out.read_text())
    proc = cli(str(tmp_path / "missing.json"), "--format", "memory-viz")
    assert proc.returncode == 2 and "no such file" in proc.stderr
    assert "Traceback" not in proc.stderr


# -------------------------------------------------------------------------- round trip
def test_round_trip_export_then_import(mlp_profile: memprof.Profile, tmp_path: Path) -> None:
    again = memprof.load_snapshot(write_snapshot(mlp_profile, tmp_path / "s.pickle"))
    peak, back = mlp_profile.peak(), again.peak()
    assert back.total_bytes == peak.total_bytes
    assert back.by_category == peak.by_category
    assert back.by_module == peak.by_module
    assert back.top_tensors == peak.top_tensors
    assert again.timeline()["total"].max() == peak.total_bytes
    assert again.meta["snapshot"]["unattributed_bytes"] == 0


def test_report_reads_a_snapshot(mlp_profile: memprof.Profile, tmp_path: Path) -> None:
    snap = write_snapshot(mlp_profile, tmp_path / "s.pickle")
    proc = subprocess.run([sys.executable, "-m", "memprof", "report", str(snap), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["peak_bytes"] == mlp_profile.peak().total_bytes
    assert Path(out["report"]).stat().st_size > 0


# ------------------------------------------------------------------------------ import
def test_import_finds_the_peak_in_the_trace_and_attributes_forward_frames(
        tmp_path: Path) -> None:
    # GIVEN a history: weights (no module frames), an activation made in a user's forward,
    # a temporary freed again, then a smaller allocation after the peak
    b = SnapshotBuilder()
    user = _frame("/home/u/model.py", 42, "forward")
    call = _frame("/usr/lib/python3/site-packages/torch/nn/modules/module.py", 1750, "_call_impl")
    cpp = _frame("??", 0, "c10::cuda::CUDACachingAllocator::malloc")
    weights = b.alloc(0, 4096, [cpp, _frame("/home/u/train.py", 10, "<module>")])
    act = b.alloc(4096, 8192, [cpp, _frame("/x/site-packages/torch/nn/functional.py", 1, "gelu"),
                               user, call])
    tmp = b.alloc(12288, 2048, [cpp, user, call], category="temporary")
    b.free(tmp)
    b.alloc(12288, 512, [cpp])
    path = _write(tmp_path / "s.pickle", b.snapshot())
    # WHEN it is read
    profile = memprof.load_snapshot(path)
    peak = profile.peak()
    # THEN the peak is after the temporary, before its free, and each block is attributed
    assert peak.total_bytes == 4096 + 8192 + 2048
    assert peak.by_category["temporary"] == 2048 and peak.by_category["other"] == 4096 + 8192
    assert peak.by_module["forward (model.py)"] == {"other": 8192, "temporary": 2048}
    assert peak.by_module["(outside modules)"] == {"other": 4096}
    assert {t.source for t in peak.top_tensors} >= {"/home/u/model.py:42 in forward",
                                                   "/home/u/train.py:10 in <module>"}
    meta = profile.meta["snapshot"]
    assert meta["unattributed_bytes"] == 4096
    assert meta["uncategorised_bytes"] == 4096 + 8192
    assert any("'other'" in n for n in profile.warnings)
    assert profile.steps_stats[0].end_bytes == 4096 + 8192 + 512
    assert weights and act


def test_import_counts_blocks_alive_before_the_trace(tmp_path: Path) -> None:
    # GIVEN a block alive before history began (in segments, never allocated in the trace)
    b = SnapshotBuilder()
    b.live[b.base] = (1024, [])
    a = b.alloc(1024, 2048, [])
    b.free(a)
    profile = memprof.load_snapshot(_write(tmp_path / "s.pickle", b.snapshot()))
    assert profile.peak().total_bytes == 1024 + 2048
    assert profile.timeline()["total"].tolist()[0] == 1024


def test_import_without_history_takes_the_dump_as_the_peak(tmp_path: Path) -> None:
    b = SnapshotBuilder()
    b.alloc(0, 4096, [])
    data = b.snapshot()
    data.pop("device_traces")
    profile = memprof.load_snapshot(_write(tmp_path / "s.pickle", data))
    assert profile.peak().total_bytes == 4096
    assert any("no allocation history" in n for n in profile.warnings)


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path("/nonexistent-dir-memprof/pwned"),))


@pytest.mark.parametrize("payload, message", [
    (pickle.dumps({"segments": [_Evil()]}), "refusing to load"),
    (b"\x80\x04garbage", "not a memory snapshot"),
    (pickle.dumps({"no": "segments"}), "no 'segments' list"),
    (pickle.dumps({"segments": [{"blocks": [{"state": "active_allocated"}]}]}),
     "damaged memory snapshot"),
])
def test_import_rejects_code_and_garbage(tmp_path: Path, payload: bytes, message: str) -> None:
    path = tmp_path / "bad.pickle"
    path.write_bytes(payload)
    with pytest.raises(ProfileLoadError, match=message):
        memprof.load_snapshot(path)


# ------------------------------------------------------------------------- chrome trace
def test_chrome_trace_has_counters_and_nested_slices(mlp_profile: memprof.Profile) -> None:
    trace = json.loads(json.dumps(to_trace(mlp_profile)))
    events = trace["traceEvents"]
    for e in events:
        assert e["ph"] in ("C", "X", "M") and isinstance(e["pid"], int)
        if e["ph"] == "X":
            assert e["dur"] >= 0 and e["ts"] >= 0 and isinstance(e["tid"], int)
    counters = [e for e in events if e["ph"] == "C"]
    assert len(counters) == len(mlp_profile.timeline())
    assert max(sum(e["args"].values()) for e in counters) == mlp_profile.timeline()["total"].max()
    assert set(counters[0]["args"]) == set(CATEGORIES)
    assert [e["ts"] for e in counters] == sorted(e["ts"] for e in counters)
    steps = [e for e in events if e["ph"] == "X" and e["cat"] == "step"]
    assert [e["name"] for e in steps] == [f"step {s.step}" for s in mlp_profile.steps_stats]
    phases = {e["name"] for e in events if e["ph"] == "X" and e["cat"] == "phase"}
    assert {"forward", "backward", "optimizer"} <= phases
    # a child module's slice lies inside its parent's (same track: properly nested)
    modules = [e for e in events if e["ph"] == "X" and e["cat"] == "module"]
    children = [e for e in modules if e["args"]["module"] == "0"]
    roots = [e for e in modules if e["args"]["module"] == ""]
    assert children and roots
    for child in children:
        assert any(r["ts"] <= child["ts"] and child["ts"] + child["dur"] <= r["ts"] + r["dur"]
                   + 1e-3 for r in roots)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_snapshot_from_dump_snapshot(tmp_path: Path) -> None:  # pragma: no cover
    # GIVEN a snapshot torch itself recorded around one training step
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    try:
        model = make_mlp().cuda()
        optimizer = torch.optim.AdamW(model.parameters())
        torch.cuda.reset_peak_memory_stats()
        model(torch.randn(256, 64, device="cuda")).pow(2).mean().backward()
        optimizer.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        path = tmp_path / "real.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    # WHEN memprof reads it THEN its peak is the allocator's (block sizes) and forward frames
    # of the user's file name modules only if there are any (nn.Sequential has none)
    profile = memprof.load_snapshot(path)
    assert profile.peak().total_bytes == peak
    assert profile.meta["snapshot"]["events"] > 0
