"""Device truth: every NVML failure is "not available"; CUDA numbers when a GPU is lent."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from models import make_mlp, train_step

import memprof
from memprof import devices


class _NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(_NVMLError):
    pass


class NVMLError_NoPermission(_NVMLError):
    pass


def _fake_pynvml(monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> None:
    GiB = 2**30
    proc = types.SimpleNamespace(pid=4242, usedGpuMemory=3 * GiB)
    module = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlSystemGetDriverVersion=lambda: b"550.54.15",
        nvmlSystemGetCudaDriverVersion=lambda: 12040,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"handle{i}",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(
            total=80 * GiB, used=5 * GiB, free=75 * GiB),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [proc],
        nvmlDeviceGetName=lambda h: "NVIDIA H100 80GB HBM3",
    )
    for name, value in overrides.items():
        setattr(module, name, value)
    monkeypatch.setitem(__import__("sys").modules, "pynvml", module)


def _raise(exc: type[BaseException]) -> Any:
    def call(*args: Any) -> Any:
        raise exc("boom")
    return call


def test_real_pynvml_without_a_driver_is_not_available() -> None:
    view = devices.Nvml().process_view()
    if view["available"]:
        pytest.skip("this machine has an NVIDIA driver")
    assert view["reason"]
    assert devices.Nvml().gpus() == []


@pytest.mark.parametrize(
    ("error", "reason"),
    [(NVMLError_LibraryNotFound, "no NVIDIA driver"), (NVMLError_NoPermission, "permission")],
)
def test_init_failures_become_reasons(monkeypatch: pytest.MonkeyPatch,
                                      error: type[Exception], reason: str) -> None:
    _fake_pynvml(monkeypatch, nvmlInit=_raise(error))
    nv = devices.Nvml()
    assert nv.available is False
    assert reason in (nv.reason or "")
    assert nv.process_view() == {"available": False, "reason": nv.reason}


def test_a_working_driver_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pynvml(monkeypatch)
    view = devices.Nvml().process_view(pid=4242)
    assert view["available"] is True
    assert view["driver"] == "550.54.15"
    assert view["cuda"] == "12.4"
    assert view["process_used_bytes"] == 3 * 2**30
    assert view["devices"][0]["total_bytes"] == 80 * 2**30


def test_unsupported_queries_degrade_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pynvml(
        monkeypatch,
        nvmlDeviceGetComputeRunningProcesses=_raise(_NVMLError),
        nvmlSystemGetCudaDriverVersion=_raise(_NVMLError),
    )
    nv = devices.Nvml()
    gpus = nv.gpus()
    assert len(gpus) == 1 and gpus[0].processes == []
    assert gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert nv.driver_versions() == {"driver": "550.54.15", "cuda": None}


def test_cpu_profile_records_why_cuda_is_missing() -> None:
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.profile(model, optimizer) as prof:
        train_step(model, optimizer, torch.randn(4, 64))
        prof.step()
    device = prof.profile.device
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert device.kind == "cpu"
    assert device.cuda["available"] is False and device.cuda["reason"]
    assert device.nvml["available"] in (True, False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tracked_peak_matches_the_allocator() -> None:
    from models import make_gpt2

    model = make_gpt2().cuda()
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 128, (8, 32), device="cuda")
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    torch.cuda.synchronize()
    with memprof.profile(model, optimizer) as prof:
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            torch.cuda.synchronize()
            prof.step()
    step = prof.profile.steps_stats[-1]
    assert step.device_max_allocated is not None
    assert abs(step.peak_bytes - step.device_max_allocated) <= 0.01 * step.device_max_allocated
    assert prof.profile.device.kind == "cuda"
    assert prof.profile.device.cuda["reserved"] >= step.device_max_allocated
