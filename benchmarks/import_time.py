"""What ``import memprof`` costs on top of ``import torch``, in fresh interpreters.

    python benchmarks/import_time.py [--repeats 7]

Each repeat starts two interpreters: one that imports torch alone, and one that imports torch
and then memprof, timing each import with ``time.perf_counter`` inside the interpreter (its own
start-up is left out). Prints the best of ``--repeats`` (a busy machine only ever adds time),
memprof's cost as a ratio to torch's, how many ``memprof`` modules the import loaded, and
whether pandas or torch.compile's dynamo (which brings inductor: about as long as torch's own
import) came with it. The advisor, the report, estimate, compare and the snapshot code load on
first use, so none of them should be in the list.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

TORCH_ONLY = """
import json, time
t0 = time.perf_counter(); import torch; t1 = time.perf_counter()
print(json.dumps({"torch_s": t1 - t0}))
"""

WITH_MEMPROF = """
import json, sys, time
t0 = time.perf_counter(); import torch; t1 = time.perf_counter()
import memprof; t2 = time.perf_counter()
print(json.dumps({"torch_s": t1 - t0, "memprof_s": t2 - t1,
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] == "memprof"),
                  "pandas": "pandas" in sys.modules, "dynamo": "torch._dynamo" in sys.modules}))
"""


def _run(code: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch_alone: list[float] = []
    on_top: list[float] = []
    last: dict[str, object] = {}
    for _ in range(args.repeats):
        torch_alone.append(float(_run(TORCH_ONLY)["torch_s"]))  # type: ignore[arg-type]
        last = _run(WITH_MEMPROF)
        on_top.append(float(last["memprof_s"]))  # type: ignore[arg-type]
    modules = list(last["modules"])  # type: ignore[call-overload]
    torch_s, memprof_s = min(torch_alone), min(on_top)
    print(f"import torch alone:           {torch_s * 1e3:8.1f} ms (best of {args.repeats})")
    print(f"import memprof on top of it:  {memprof_s * 1e3:8.1f} ms "
          f"({memprof_s / torch_s:.2f}x of torch's import)")
    print(f"memprof modules loaded:       {len(modules)}")
    print(f"pandas loaded:                {last['pandas']}")
    print(f"torch._dynamo loaded:         {last['dynamo']}")
    heavy = [m for m in modules
             if m.startswith(("memprof.advisor", "memprof.report", "memprof.estimate",
                              "memprof.compare", "memprof.snapshot"))]
    if heavy:
        print(f"loaded eagerly (should load on first use): {', '.join(heavy)}")


if __name__ == "__main__":
    main()
