"""The caching-allocator replay: one hand-built sequence per rule of CUDACachingAllocator.cpp.

Each expected figure follows from the allocator's rules (see memprof/allocator.py), not from a
run of the model.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memprof import allocator
from memprof.errors import AllocatorConfError

MiB = 2**20
EXPANDABLE = "expandable_segments:True"


def allocs(*sizes: int, start: int = 0) -> list[tuple[str, int, int]]:
    return [("alloc", start + i, size) for i, size in enumerate(sizes)]


def frees(*keys: int) -> list[tuple[str, int, int]]:
    return [("free", key, 0) for key in keys]


# ------------------------------------------------------------------ segment sizes
@pytest.mark.parametrize(
    ("nbytes", "default", "expandable"),
    [
        (1, 2 * MiB, 2 * MiB),  # small pool: a 2 MiB segment; expandable: one 2 MiB page
        (512, 2 * MiB, 2 * MiB),
        (MiB, 2 * MiB, 2 * MiB),  # 1 MiB is still small
        (MiB + 1, 20 * MiB, 20 * MiB),  # large pool, under 10 MiB: a 20 MiB segment / page
        (5 * MiB, 20 * MiB, 20 * MiB),
        (10 * MiB, 10 * MiB, 20 * MiB),  # 10 MiB and up: its own segment, 2 MiB rounding
        (30 * MiB, 30 * MiB, 40 * MiB),  # expandable: two 20 MiB pages of the large pool
        (31 * MiB, 32 * MiB, 40 * MiB),
    ],
)
def test_one_request_reserves_its_segment(nbytes: int, default: int, expandable: int) -> None:
    assert allocator.replay(allocs(nbytes)).reserved_peak_bytes == default
    assert allocator.replay(allocs(nbytes), conf=EXPANDABLE).reserved_peak_bytes == expandable


def test_requests_round_to_512_byte_blocks() -> None:
    result = allocator.replay(allocs(1, 513, 1000))
    assert result.allocated_peak_bytes == 512 + 1024 + 1024
    assert result.reserved_peak_bytes == 2 * MiB  # all three share one small segment


def test_ten_4mib_tensors_fill_two_20mib_segments_then_an_8mib_request_needs_a_third() -> None:
    ten = allocs(*[4 * MiB] * 10)
    assert allocator.replay(ten).reserved_peak_bytes == 40 * MiB
    # Freeing every other one leaves five 4 MiB holes that cannot merge: 8 MiB fits none.
    events = ten + frees(0, 2, 4, 6, 8) + allocs(8 * MiB, start=100)
    result = allocator.replay(events)
    assert result.reserved_peak_bytes == 60 * MiB
    assert result.segments == [20 * MiB] * 3
    assert result.allocated_at_reserved_peak_bytes == 28 * MiB
    assert result.fragmentation_bytes == 32 * MiB
    assert result.largest_free_block_bytes == 12 * MiB  # the new segment's unused rest
    # Expandable segments: the same two pages, then one more 20 MiB page at the end.
    assert allocator.replay(events, conf=EXPANDABLE).reserved_peak_bytes == 60 * MiB


def test_freed_neighbours_merge_so_a_larger_request_reuses_the_segment() -> None:
    events = allocs(4 * MiB, 4 * MiB, 4 * MiB) + frees(0, 1) + allocs(8 * MiB, start=10)
    assert allocator.replay(events).reserved_peak_bytes == 20 * MiB


def test_best_fit_takes_the_smallest_block_that_fits() -> None:
    # Two full 20 MiB segments, then holes of 6 MiB (in A) and 4 MiB (in B). A 4 MiB request
    # must take the 4 MiB hole: taken from the 6 MiB one, the 6 MiB request after it would
    # need a third segment (60 MiB).
    events = (
        allocs(6 * MiB, 14 * MiB - 512)  # segment A: [6 | 14] (512 B left over: not split)
        + allocs(4 * MiB, 16 * MiB, start=10)  # segment B: [4 | 16]
        + frees(0, 10)
        + allocs(4 * MiB, 6 * MiB, start=20)
    )
    result = allocator.replay(events)
    assert result.reserved_peak_bytes == 40 * MiB
    assert result.allocated_end_bytes == 40 * MiB


def test_large_blocks_split_only_when_more_than_1mib_remains() -> None:
    # A 12 MiB segment serving an 11.5 MiB request keeps 0.5 MiB: not split, all 12 MiB count.
    events = allocs(12 * MiB) + frees(0) + allocs(11 * MiB + MiB // 2, start=1)
    result = allocator.replay(events)
    assert result.allocated_end_bytes == 12 * MiB
    # Small blocks always split (512 B or more left); here a 1 MiB request in a 2 MiB segment.
    assert allocator.replay(allocs(MiB)).allocated_peak_bytes == MiB


def test_max_split_size_keeps_oversize_blocks_for_oversize_requests() -> None:
    # A cached 64 MiB block would serve a 30 MiB request by default (split); with
    # max_split_size_mb:40 blocks >= 40 MiB are not handed to smaller requests.
    events = allocs(64 * MiB) + frees(0) + allocs(30 * MiB, start=1)
    assert allocator.replay(events).reserved_peak_bytes == 64 * MiB
    assert allocator.replay(events, conf="max_split_size_mb:40").reserved_peak_bytes == 94 * MiB
    assert allocator.parse_conf("max_split_size_mb:20").max_split_size == 20 * MiB
    # An oversize request takes an oversize block up to 20 MiB larger, unsplit.
    near = allocs(64 * MiB) + frees(0) + allocs(50 * MiB, start=1)
    result = allocator.replay(near, conf="max_split_size_mb:40")
    assert result.reserved_peak_bytes == 64 * MiB
    assert result.allocated_end_bytes == 64 * MiB
    far = allocs(80 * MiB) + frees(0) + allocs(50 * MiB, start=1)
    assert allocator.replay(far, conf="max_split_size_mb:40").reserved_peak_bytes == 130 * MiB


def test_roundup_power2_divisions() -> None:
    # 1.2 GiB with 4 divisions between 1 GiB and 2 GiB rounds up to 1.25 GiB.
    size = int(1.2 * 1024 * MiB)
    result = allocator.replay(allocs(size), conf="roundup_power2_divisions:4")
    assert result.allocated_peak_bytes == 1280 * MiB
    # A list: [256, 512) MiB in 2 divisions; the first entry also covers the intervals below
    # it; ">" every interval after the last one named (here 8 from 512 MiB on).
    conf = "roundup_power2_divisions:[256:2,>:8]"
    assert allocator.replay(allocs(300 * MiB), conf=conf).allocated_peak_bytes == 384 * MiB
    assert allocator.replay(allocs(100 * MiB), conf=conf).allocated_peak_bytes == 128 * MiB
    assert allocator.replay(allocs(520 * MiB), conf=conf).allocated_peak_bytes == 576 * MiB
    # 0 divisions: no power-of-two rounding in that interval.
    zero = "roundup_power2_divisions:[256:0,>:0]"
    assert allocator.replay(allocs(300 * MiB), conf=zero).allocated_peak_bytes == 300 * MiB
    # Powers of two are kept as they are.
    assert allocator.replay(allocs(512 * MiB), conf=conf).allocated_peak_bytes == 512 * MiB


def test_expandable_segments_grow_one_segment_instead_of_caching_a_too_small_one() -> None:
    # 5 MiB then, once it is freed, 25 MiB: by default the cached 20 MiB segment is too small
    # and a 26 MiB one is added (46 MiB); an expandable segment maps one more 20 MiB page.
    events = allocs(5 * MiB) + frees(0) + allocs(25 * MiB, start=1)
    assert allocator.replay(events).reserved_peak_bytes == 46 * MiB
    result = allocator.replay(events, conf=EXPANDABLE)
    assert result.reserved_peak_bytes == 40 * MiB
    assert result.segments == [40 * MiB]


def test_out_of_memory_frees_the_cache_and_retries() -> None:
    # 60 MiB device: a cached 40 MiB segment must be released for a 50 MiB request.
    events = allocs(40 * MiB) + frees(0) + allocs(50 * MiB, start=1)
    result = allocator.replay(events, capacity=60 * MiB)
    assert result.oom is None
    assert result.cache_flushes == 1
    assert result.reserved_end_bytes == 50 * MiB
    assert result.reserved_peak_bytes == 50 * MiB  # never 90 MiB: the device had 60
    # A request that cannot fit even in an empty device is an out-of-memory.
    too_big = allocs(40 * MiB) + allocs(30 * MiB, start=1)
    result = allocator.replay(too_big, capacity=60 * MiB)
    assert result.oom == {"event": 1, "requested_bytes": 30 * MiB,
                          "reserved_bytes": 40 * MiB, "allocated_bytes": 40 * MiB}


def test_a_split_segment_is_not_released_on_out_of_memory() -> None:
    # The 20 MiB segment still holds a live 2 MiB block: it cannot go back to the driver.
    events = allocs(2 * MiB, 2 * MiB) + frees(1) + allocs(50 * MiB, start=5)
    result = allocator.replay(events, capacity=60 * MiB)
    assert result.oom is not None and result.oom["requested_bytes"] == 50 * MiB


def test_garbage_collection_frees_aged_blocks_above_the_threshold() -> None:
    # 100 MiB device at fraction 1.0, threshold 0.5: once 60 MiB is reserved, taking a new
    # segment first frees cached unsplit large blocks.
    events = allocs(30 * MiB, 30 * MiB) + frees(0, 1) + allocs(40 * MiB, start=5)
    conf = "garbage_collection_threshold:0.5"
    plain = allocator.replay(events, conf=conf)  # no fraction set: no garbage collection
    assert plain.reserved_end_bytes == 100 * MiB
    collected = allocator.replay(events, conf=conf, capacity=100 * MiB, memory_fraction=1.0)
    assert collected.reserved_end_bytes == 40 * MiB


def test_memory_fraction_caps_the_device() -> None:
    events = allocs(40 * MiB) + allocs(40 * MiB, start=1)
    result = allocator.replay(events, capacity=100 * MiB, memory_fraction=0.5)
    assert result.oom is not None and result.oom["event"] == 1


def test_expandable_segment_unmaps_its_free_tail_on_out_of_memory() -> None:
    # Small pool grown to 6 MiB of pages, then freed; a large request needs those pages back.
    small = allocs(*[MiB] * 6)
    events = small + frees(*range(6)) + allocs(56 * MiB, start=10)
    result = allocator.replay(events, conf=EXPANDABLE, capacity=60 * MiB)
    assert result.oom is None
    assert result.reserved_end_bytes == 60 * MiB


# --------------------------------------------------------------------- configuration
def test_conf_parsing() -> None:
    conf = allocator.parse_conf(
        "expandable_segments:True, max_split_size_mb:128,garbage_collection_threshold:0.6,"
        "roundup_power2_divisions:[64:4,>:2]"
    )
    assert conf.expandable_segments is True
    assert conf.max_split_size == 128 * MiB
    assert conf.garbage_collection_threshold == 0.6
    assert conf.roundup_power2_divisions[6] == 4 and conf.roundup_power2_divisions[0] == 4
    assert conf.roundup_power2_divisions[7:] == (2,) * 9
    assert allocator.parse_conf("").expandable_segments is False
    assert "release_lock_on_cudamalloc" in allocator.parse_conf(
        "release_lock_on_cudamalloc:True").ignored


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("expandable_segments", "expected option:value"),
        ("expandable_segments:yes", "True or False"),
        ("max_split_size_mb:19", "too small"),
        ("max_split_size_mb:abc", "integer"),
        ("garbage_collection_threshold:1.5", "between 0.0 and 1.0"),
        ("roundup_power2_divisions:3", "power of 2"),
        ("roundup_power2_divisions:[100:2]", "power of 2"),
        ("no_such_option:1", "unknown option"),
        ("backend:cudaMallocAsync", "not modelled"),
    ],
)
def test_bad_conf_is_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(AllocatorConfError, match=message):
        allocator.parse_conf(text)


def test_bad_event_action() -> None:
    with pytest.raises(ValueError, match="alloc' or 'free'"):
        allocator.replay([("malloc", 1, 10)])


# ------------------------------------------------------------------------ properties
@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(1, 64 * MiB)), min_size=1, max_size=120),
    st.sampled_from(["", EXPANDABLE, "max_split_size_mb:32", "roundup_power2_divisions:4"]),
)
def test_reserved_covers_allocated_and_everything_returns(
    ops: list[tuple[bool, int]], conf: str
) -> None:
    events: list[tuple[str, int, int]] = []
    live: list[int] = []
    for i, (free_one, size) in enumerate(ops):
        if free_one and live:
            events.append(("free", live.pop(size % len(live)), 0))
        else:
            events.append(("alloc", i, size))
            live.append(i)
    model = allocator.CachingAllocatorModel(conf)
    for action, key, size in events:
        if action == "alloc":
            model.malloc(key, size)
        else:
            model.free(key)
        assert model.allocated <= model.reserved
    for key in live:
        model.free(key)
    result = model.result()
    assert result.allocated_end_bytes == 0
    assert result.allocated_peak_bytes <= result.reserved_peak_bytes
    assert sum(result.segments) == result.reserved_peak_bytes
