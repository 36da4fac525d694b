"""Installs a stand-in ``memprof.advisor`` in a ``memprof run`` subprocess (tests only).

MEMPROF_FAKE_ADVISOR=ok returns advice; =raise makes the advisor fail. It checks how the CLI
wires the advisor in, not what the advisor says.
"""

import os
import sys
import types

_MODE = os.environ.get("MEMPROF_FAKE_ADVISOR")

if _MODE:

    class Advice:
        def __init__(self, peak: int, budget: object) -> None:
            self.peak = peak
            self.budget = budget

        def to_dict(self) -> dict:
            return {"budget": self.budget, "peak_bytes": self.peak,
                    "recommendations": [{"technique": "fake", "saving_bytes": 123}]}

        def summary(self, *, top: int = 5) -> str:
            return f"FAKE ADVICE top={top} budget={self.budget} peak={self.peak}"

    def advise(profile: object, *, budget: object = None, workload: object = None) -> Advice:
        if _MODE == "raise":
            raise RuntimeError("advisor exploded")
        return Advice(profile.peak().total_bytes, budget)  # type: ignore[attr-defined]

    class Workload:  # memprof/__init__.py imports it with advise
        pass

    module = types.ModuleType("memprof.advisor")
    module.Advice = Advice  # type: ignore[attr-defined]
    module.Workload = Workload  # type: ignore[attr-defined]
    module.advise = advise  # type: ignore[attr-defined]
    sys.modules["memprof.advisor"] = module
