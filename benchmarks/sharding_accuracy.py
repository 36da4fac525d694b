"""Sharding rows (ZeRO-1/2/3, FSDP) per zoo model: fake-run and analytic predictions against
the simulation, and the simulation's spread over repeats (#24 item 5).

For each model the advisor's sharding rows are predicted (fake runs as rank 0 of a fake process
group, and the analytic formulas of a file-only profile), then each applicable row is simulated
``--repeats`` times on real tensors (same process, same fake process group). Printed per row:
predicted (fake), analytic, simulated (first repeat), error of each against it, and the spread
of the repeats (max - min bytes: 0 when the measurement is repeatable). CPU only, bytes exact.
The simulations profile with the events backend (every allocation, CPU kernel scratch too; see
memprof.advisor.sharded_steps); each model's unchanged step is printed by both backends first.

    python benchmarks/sharding_accuracy.py      # convnext, gpt2, resnet-bn, llama-gqa, bert, clip
    python benchmarks/sharding_accuracy.py --models gpt2 --ranks 2 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import zoo
from memprof.advisor import changes_for, read_facts
from memprof.advisor.fake_prediction import fake_peak
from memprof.advisor.workload import baseline, copy_state, run, seeded, simulate

DEFAULT_MODELS = ("convnext", "gpt2", "resnet-bn", "llama-gqa", "bert", "clip")


def error_pct(predicted: int, actual: int) -> float:
    return 100.0 * (predicted - actual) / actual


def model_rows(name: str, ranks: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    w = zoo.by_name(name).build()
    with seeded():
        ref = baseline(w)
    with seeded():  # the simulations' backend: is it exact on the unsharded step?
        dispatch = run(w, copy_state(w), backend="dispatch").peak_bytes
    print(f"{name}: baseline {ref.peak_bytes:,} B (events), {dispatch:,} B (dispatch)", flush=True)
    facts = read_facts(ref.profile)
    rows = []
    for c in changes_for(facts):
        if c.technique != "sharding" or c.apply is None or c.options.get("ranks") not in ranks:
            continue
        start = time.process_time()
        with seeded():
            fake = fake_peak(w, [c.apply])
        fake_cpu = time.process_time() - start
        measured = []
        for _ in range(repeats):
            with seeded():
                measured.append(simulate(w, [c.apply], ref).peak_bytes)
        sim = measured[0]
        rows.append(
            {
                "model": name,
                "stage": c.options["stage"],
                "ranks": c.options["ranks"],
                "baseline": ref.peak_bytes,
                "fake": fake,
                "analytic": c.predicted_peak,
                "simulated": sim,
                "spread": max(measured) - min(measured),
                "fake_err": error_pct(fake, sim),
                "analytic_err": error_pct(int(c.predicted_peak or 0), sim),
                "fake_cpu_s": fake_cpu,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--ranks", default="2,4", help="world sizes (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3, help="simulations per row")
    args = parser.parse_args(argv)
    ranks = tuple(int(r) for r in args.ranks.split(","))
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        rows.extend(model_rows(name.strip(), ranks, args.repeats))
    head = (
        f"{'model':<10} {'stage':<14} {'N':>2} {'baseline':>11} {'fake':>11} "
        f"{'analytic':>11} {'simulated':>11} {'spread':>7} {'fake %':>7} {'anal. %':>8} "
        f"{'fake cpu s':>10}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['model']:<10} {r['stage']:<14} {r['ranks']:>2} {r['baseline']:>11,} "
            f"{r['fake']:>11,} {r['analytic']:>11,} {r['simulated']:>11,} {r['spread']:>7,} "
            f"{r['fake_err']:>+7.2f} {r['analytic_err']:>+8.2f} {r['fake_cpu_s']:>10.2f}"
        )
    if rows:
        fake = [abs(r["fake_err"]) for r in rows]
        analytic = [abs(r["analytic_err"]) for r in rows]
        print(
            f"\n{len(rows)} rows; fake run |error| median {statistics.median(fake):.2f}% "
            f"worst {max(fake):.2f}%; analytic median {statistics.median(analytic):.2f}% "
            f"worst {max(analytic):.2f}%; largest spread over {args.repeats} repeats "
            f"{max(r['spread'] for r in rows):,} B"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
