"""The fake runs' shortcuts give the bytes of the runs they shorten (#24: fast, byte-identical)."""

from __future__ import annotations

from typing import Any

import pytest
from workloads import gpt2_workload, mlp_workload

from memprof.advisor import Workload, changes_for, fake_prediction, read_facts
from memprof.advisor.fake_prediction import fake_peak
from memprof.advisor.workload import baseline, seeded


def _optimizer_changes(w: Workload) -> list[Any]:
    changes = changes_for(read_facts(baseline(w).profile))
    return [
        c
        for c in changes
        if c.applicable
        and c.apply is not None
        and (
            (c.technique in ("optimizer", "quantization") and "to" in c.options)
            or c.options.get("grad_scaler")
        )
    ]


def _peak(w: Workload, applies: list[Any], *, skip: bool, monkeypatch: pytest.MonkeyPatch) -> int:
    with monkeypatch.context() as m:
        m.setattr(fake_prediction, "SKIP_TRACKED_UPDATES", skip)
        with seeded():
            return fake_peak(w, applies)


@pytest.mark.parametrize("foreach", [False, True])
def test_skipping_the_optimizers_tracked_updates_keeps_every_byte(
    monkeypatch: pytest.MonkeyPatch, foreach: bool
) -> None:
    # GIVEN a small GPT-2 whose AdamW steps per tensor or with foreach, and the changes that
    # act on the optimizer (SGD, momentum, Adafactor, 8-bit AdamW, fp16 with a GradScaler)
    w = gpt2_workload()
    w.optimizer.param_groups[0]["foreach"] = foreach
    picked = _optimizer_changes(w)
    assert {c.options.get("to") for c in picked} >= {"SGD", "Adafactor", "AdamW8bit"}
    for applies in ([], *([c.apply] for c in picked)):
        # WHEN each is run with its optimizer's in-place updates skipped, and with every op
        fast = _peak(w, applies, skip=True, monkeypatch=monkeypatch)
        slow = _peak(w, applies, skip=False, monkeypatch=monkeypatch)
        # THEN the peaks are the same bytes
        assert fast == slow


def test_the_optimizer_step_skips_only_updates_of_tensors_the_ledger_tracks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN an MLP with AdamW stepping per tensor: its step updates parameters and state in
    # place, and makes tensors (sqrt, div)
    w = mlp_workload()
    from memprof.tracking import session

    ledger_dispatch = session._LedgerMode.__torch_dispatch__
    reached: list[str] = []

    def recording(self: Any, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        reached.append(func.overloadpacket.__name__)
        return ledger_dispatch(self, func, types, args, kwargs)

    monkeypatch.setattr(session._LedgerMode, "__torch_dispatch__", recording)
    # WHEN its fake run steps the optimizer with the tracked updates skipped, then with all ops
    _peak(w, [], skip=True, monkeypatch=monkeypatch)
    fast, reached[:] = set(reached), []
    _peak(w, [], skip=False, monkeypatch=monkeypatch)
    slow = set(reached)
    # THEN the in-place updates reach the ledger (and FakeTensor) only in the full run, and the
    # ops that make tensors reach it in both
    updates = {"mul_", "lerp_", "addcdiv_"}
    assert updates <= slow
    assert not updates & fast
    assert {"sqrt", "div"} <= fast & slow
