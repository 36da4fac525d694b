"""The allocator model's shortcuts (issue #25, overhead): a request freed at once
(``malloc_free``) and the what-if model's batched requests give the figures of a plain replay."""

from __future__ import annotations

import random

import pytest

from memprof.allocator import CachingAllocatorModel
from memprof.tracking import reserved
from memprof.tracking.reserved import ReservedModel

MiB = 2**20
CONFS = [
    "",
    "expandable_segments:True",
    "max_split_size_mb:20",
    "roundup_power2_divisions:4",
    "max_split_size_mb:40,max_non_split_rounding_mb:4",
]


def _program(seed: int, n: int = 3000) -> list[tuple[int, int]]:
    """Requests ``(key, bytes)`` and frees ``(key, -1)``: small and large sizes, many freed at
    once (a temporary), others kept a while."""
    rng = random.Random(seed)
    live: list[int] = []
    out: list[tuple[int, int]] = []
    key = 0
    for _ in range(n):
        if live and rng.random() < 0.45:
            out.append((live.pop(rng.randrange(len(live))), -1))
            continue
        key += 1
        size = rng.choice(
            [rng.randint(1, 4096), rng.randint(1, 2 * MiB), rng.randint(1, 64 * MiB), 512, 1 * MiB]
        )
        out.append((key, size))
        if rng.random() < 0.4:
            out.append((key, -1))  # a temporary: freed by the next event
        else:
            live.append(key)
    return out


def _run(model: CachingAllocatorModel, program: list[tuple[int, int]], *, pairs: bool) -> None:
    i = 0
    while i < len(program):
        key, size = program[i]
        if size < 0:
            model.free(key)
        elif pairs and i + 1 < len(program) and program[i + 1] == (key, -1):
            model.malloc_free(size)
            i += 1
        else:
            model.malloc(key, size)
        i += 1


@pytest.mark.parametrize("conf", CONFS)
@pytest.mark.parametrize("seed", [0, 1])
def test_malloc_free_gives_the_figures_of_a_malloc_and_a_free(conf: str, seed: int) -> None:
    program = _program(seed)
    plain, short = CachingAllocatorModel(conf), CachingAllocatorModel(conf)
    _run(plain, program, pairs=False)
    _run(short, program, pairs=True)
    assert short.result() == plain.result()
    assert (short.reserved, short.allocated) == (plain.reserved, plain.allocated)


def test_malloc_free_with_garbage_collection_runs_in_full() -> None:
    program = _program(2, 1000)
    conf = "garbage_collection_threshold:0.3"  # reclaims above 0.3 * 0.9 * 512 MiB
    plain = CachingAllocatorModel(conf, capacity=512 * MiB, memory_fraction=0.9)
    short = CachingAllocatorModel(conf, capacity=512 * MiB, memory_fraction=0.9)
    _run(plain, program, pairs=False)
    _run(short, program, pairs=True)
    assert short.result() == plain.result()


def test_the_what_if_model_in_batches_equals_one_fed_request_by_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reserved, "SHADOW_BATCH", 500)  # several batches, and a rest
    program = _program(3)
    model = ReservedModel.create("")[0]
    assert model is not None
    _run(model.model, program, pairs=True)
    direct = CachingAllocatorModel("expandable_segments:True")
    _run(direct, program, pairs=False)
    what_if = model.summary()["what_if"]["expandable_segments:True"]
    assert what_if == direct.result().to_dict()
    main = CachingAllocatorModel("")
    _run(main, program, pairs=False)
    assert model.summary()["replay"] == main.result().to_dict()
