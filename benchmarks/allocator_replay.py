"""How fast memprof replays allocation events through its caching-allocator model.

Target (issue #14): 1,000,000 events in under 2 s here. The peer in the same run is a plain
reference implementation of the same default rules (free blocks in a list, a linear scan for
the best fit, neighbours found by address): it must reach the same reserved and allocated
peaks, which also checks memprof's sorted-pool bookkeeping against an independent one.

    python benchmarks/allocator_replay.py [--events 1000000] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import time

from memprof import allocator
from memprof.allocator import LARGE_BUFFER, MIN_BLOCK, MIN_LARGE_ALLOC, ROUND_LARGE, SMALL_BUFFER
from memprof.allocator import SMALL_SIZE as SMALL
from memprof.units import format_bytes

SIZES = (512, 4096, 65536, 2**20, 3 * 2**20, 12 * 2**20, 40 * 2**20)


def training_like_events(count: int, seed: int) -> list[tuple[str, int, int]]:
    """Allocations of mixed sizes and frees of random live ones, at most ~400 alive."""
    rng = random.Random(seed)
    live: list[tuple[int, int]] = []
    out: list[tuple[str, int, int]] = []
    key = 0
    while len(out) < count:
        if live and (rng.random() < 0.5 or len(live) > 400):
            k, size = live.pop(rng.randrange(len(live)))
            out.append(("free", k, size))
        else:
            key += 1
            size = int(rng.choice(SIZES) * rng.uniform(0.5, 1.5))
            live.append((key, size))
            out.append(("alloc", key, size))
    return out


def reference_replay(events: list[tuple[str, int, int]]) -> tuple[int, int]:
    """The default rules, written plainly: (reserved peak, allocated peak)."""
    # A block: [address, size, small, allocated, segment id]; segments: id -> ordered blocks.
    segments: dict[int, list[list[int]]] = {}
    live: dict[int, list[int]] = {}
    reserved = allocated = reserved_peak = allocated_peak = 0
    next_segment = 0
    for action, key, nbytes in events:
        if action == "free":
            block = live.pop(key, None)
            if block is None:
                continue
            allocated -= block[1]
            block[3] = 0
            blocks = segments[block[4]]
            i = blocks.index(block)
            if i + 1 < len(blocks) and not blocks[i + 1][3]:
                block[1] += blocks.pop(i + 1)[1]
            if i > 0 and not blocks[i - 1][3]:
                blocks[i - 1][1] += blocks.pop(i)[1]
            continue
        size = max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)
        small = size <= SMALL
        best: list[int] | None = None
        for blocks in segments.values():
            for candidate in blocks:
                if candidate[3] or candidate[2] != small or candidate[1] < size:
                    continue
                if best is None or (candidate[1], candidate[0]) < (best[1], best[0]):
                    best = candidate
        if best is None:
            if small:
                segment_size = SMALL_BUFFER
            elif size < MIN_LARGE_ALLOC:
                segment_size = LARGE_BUFFER
            else:
                segment_size = -(-size // ROUND_LARGE) * ROUND_LARGE
            address = next_segment << 42
            best = [address, segment_size, small, 0, next_segment]
            segments[next_segment] = [best]
            next_segment += 1
            reserved += segment_size
            reserved_peak = max(reserved_peak, reserved)
        remaining = best[1] - size
        if (small and remaining >= MIN_BLOCK) or (not small and remaining > SMALL):
            blocks = segments[best[4]]
            rest = [best[0] + size, remaining, small, 0, best[4]]
            blocks.insert(blocks.index(best) + 1, rest)
            best[1] = size
        best[3] = 1
        live[key] = best
        allocated += best[1]
        allocated_peak = max(allocated_peak, allocated)
    return reserved_peak, allocated_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--reference-events", type=int, default=100_000,
                        help="events for the (slow) reference implementation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    events = training_like_events(args.events, args.seed)
    print(f"{len(events):,} events ({sum(a == 'alloc' for a, _, _ in events):,} allocations)")
    for conf in ("", "expandable_segments:True", "max_split_size_mb:64",
                 "roundup_power2_divisions:4"):
        started = time.perf_counter()
        result = allocator.replay(events, conf=conf)
        seconds = time.perf_counter() - started
        verdict = "ok" if seconds < 2.0 else "OVER the 2 s target"
        print(f"  memprof  {conf or '(default)':28s} {seconds:5.2f} s  ({verdict})  reserved "
              f"{format_bytes(result.reserved_peak_bytes)}, allocated "
              f"{format_bytes(result.allocated_peak_bytes)}, {len(result.segments)} segments")

    head = events[: args.reference_events]
    started = time.perf_counter()
    ours = allocator.replay(head)
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    ref_reserved, ref_allocated = reference_replay(head)
    ref_s = time.perf_counter() - started
    same = (ours.reserved_peak_bytes, ours.allocated_peak_bytes) == (ref_reserved, ref_allocated)
    print(f"first {len(head):,} events, default rules:")
    print(f"  memprof    {ours_s:6.2f} s  reserved {format_bytes(ours.reserved_peak_bytes)}")
    print(f"  reference  {ref_s:6.2f} s  reserved {format_bytes(ref_reserved)} "
          f"(linear-scan peer)")
    print(f"  memprof / reference time: {ours_s / ref_s:.3f}x; same peaks: {same}")
    if not same:
        raise SystemExit("the reference and memprof disagree")


if __name__ == "__main__":
    main()
