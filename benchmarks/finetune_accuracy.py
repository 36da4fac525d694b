"""Fine-tuning rows (LoRA, QLoRA, activation offloading): fake run and analytic vs simulation.

For each zoo model: the baseline is measured, then every applicable row of the chosen
techniques is predicted by a fake run (the change applied to a fake copy), predicted
analytically (the row's own timeline rewrite) and simulated for real on a copy of the model
(peft, torchao, ``save_on_cpu`` on this machine's CPU). Target: the fake run within 3% of the
simulation. ``benchmarks/advisor_accuracy.py --techniques`` measures through a simulator only,
without the model at hand, so its predictions there are analytic: this script runs the fake
ones.

Run from the repository root::

    python benchmarks/finetune_accuracy.py                          # gpt2, llama-gqa, bert, roberta
    python benchmarks/finetune_accuracy.py --models t5 --techniques lora,qlora
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.zoo import by_name
from memprof.advisor import changes_for
from memprof.advisor.core import read_facts
from memprof.advisor.fake_prediction import fake_peak
from memprof.advisor.workload import baseline, seeded, simulate

TARGET_PCT = 3.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,llama-gqa,bert,roberta")
    parser.add_argument("--techniques", default="lora,qlora,offload")
    args = parser.parse_args()
    techniques = set(args.techniques.split(","))
    warnings.filterwarnings("ignore")
    misses = 0
    print(f"{'model':10} {'row':58} {'baseline':>10} {'fake':>10} {'simulated':>10} "
          f"{'fake err':>8} {'analytic err':>12}")
    for name in args.models.split(","):
        workload = by_name(name).build()
        with seeded():
            ref = baseline(workload)
        for change in changes_for(read_facts(ref.profile)):
            if change.technique not in techniques or not change.applicable:
                continue
            opts = ", ".join(f"{k}={v}" for k, v in change.options.items()
                             if k not in ("modules", "targets"))
            row = f"{change.technique} ({opts})"[:58]
            if change.apply is None:
                print(f"{name:10} {row:58} not simulated: {'; '.join(change.caveats)[-80:]}")
                continue
            started = time.perf_counter()
            with seeded():
                fake = fake_peak(workload, [change.apply])
                measured = simulate(workload, [change.apply], ref).peak_bytes
            err = 100 * (fake - measured) / measured
            analytic = change.predicted_peak
            an = f"{100 * (analytic - measured) / measured:+.1f}%" if analytic else "-"
            misses += abs(err) > TARGET_PCT
            print(f"{name:10} {row:58} {ref.peak_bytes:>10} {fake:>10} {measured:>10} "
                  f"{err:>+7.2f}% {an:>12}  ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"rows whose fake run missed the {TARGET_PCT}% target: {misses}")
    return 1 if misses else 0


if __name__ == "__main__":
    raise SystemExit(main())
