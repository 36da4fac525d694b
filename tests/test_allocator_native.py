"""The caching allocator's model in C++ (memprof/tracking/allocator_model.cpp, issue #25's
overhead) gives the Python model's figures request by request, under every option a profile's
replay can meet, and the profile's what-if with it."""

from __future__ import annotations

import random

import pytest

from memprof.allocator import CachingAllocatorModel, parse_conf
from memprof.tracking import native, reserved
from memprof.tracking.reserved import NativeModel, ReservedModel

MiB = 2**20
CONFS = [
    "",
    "expandable_segments:True",
    "max_split_size_mb:20",
    "max_split_size_mb:40,max_non_split_rounding_mb:4",
    "roundup_power2_divisions:4",
    "roundup_power2_divisions:[256:1,512:2,>:8]",
    "expandable_segments:True,roundup_power2_divisions:2",
    "expandable_segments:True,max_split_size_mb:20",
]

pytestmark = pytest.mark.skipif(native.load() is None, reason="memprof's recorder cannot build")


def _program(seed: int, n: int = 4000) -> list[tuple[str, int, int]]:
    """Requests of every size class, temporaries freed at once, keys kept a while, frees of
    unknown keys and a key requested twice without a free."""
    rng = random.Random(seed)
    live: list[int] = []
    out: list[tuple[str, int, int]] = []
    key = 0
    for _ in range(n):
        roll = rng.random()
        if live and roll < 0.4:
            out.append(("free", live.pop(rng.randrange(len(live))), 0))
            continue
        if roll < 0.42:
            out.append(("free", 10**9 + key, 0))  # never allocated
            continue
        if live and roll < 0.43:
            out.append(("malloc", live[-1], rng.randint(1, 8 * MiB)))  # the same key again
            continue
        key += 1
        size = rng.choice([
            rng.randint(1, 4096), rng.randint(1, 2 * MiB), rng.randint(1, 64 * MiB),
            rng.randint(1, 600 * MiB), 512, 1 * MiB, 10 * MiB, 20 * MiB,
        ])
        if rng.random() < 0.35:
            out.append(("malloc_free", 0, size))
        else:
            out.append(("malloc", key, size))
            live.append(key)
    return out


def _drive(model: object, program: list[tuple[str, int, int]]) -> list[tuple[int, int, bool]]:
    seen = []
    for action, key, size in program:
        if action == "malloc":
            model.malloc(key, size)  # type: ignore[attr-defined]
        elif action == "free":
            model.free(key)  # type: ignore[attr-defined]
        else:
            model.malloc_free(size)  # type: ignore[attr-defined]
        seen.append((model.reserved, model.allocated, key in model.live))  # type: ignore[attr-defined]
    return seen


@pytest.mark.parametrize("conf", CONFS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_native_model_gives_the_python_models_figures(conf: str, seed: int) -> None:
    program = _program(seed)
    python = CachingAllocatorModel(conf)
    fast = NativeModel(native.load(), parse_conf(conf))
    assert _drive(fast, program) == _drive(python, program)
    assert fast.result() == python.result()


def test_a_profiles_what_if_is_the_same_with_either_model(monkeypatch: pytest.MonkeyPatch) -> None:
    program = _program(5)
    summaries = []
    for use_native in (True, False):
        monkeypatch.setattr(reserved, "USE_NATIVE", use_native)
        model = ReservedModel.create("max_split_size_mb:20")[0]
        assert model is not None
        assert isinstance(model.model, NativeModel) is use_native
        _drive(model.model, program)
        summaries.append(model.summary())
    assert summaries[0] == summaries[1]
