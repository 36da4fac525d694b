"""The ``zero_grad(set_to_none=True)`` row: gradients kept between steps (``set_to_none=False``)
and what freeing them saves.

GIVEN a loop that keeps its gradients zeroed between steps, WHEN the advisor predicts the step
with them set to None (gone in the forward, back as the backward produces them), THEN the
simulated step agrees within the issue's 5%, in a Workload and in an unchanged script; a loop
that already frees them, or that accumulates gradients, gets the row as not applicable."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from script_runs import runner
from torch import nn
from workloads import cnn_workload, gpt2_workload, mlp_workload

import memprof
from memprof.advisor import Workload, advise, changes_for, read_facts
from memprof.advisor.core import Change
from memprof.advisor.script import ScriptSimulator
from memprof.advisor.workload import baseline, seeded
from memprof.advisor.zero_grad import OPTIONS, free_gradients_transform, gradient_use
from memprof.categories import CATEGORIES

pytestmark = pytest.mark.slow  # runs of a training script per change


def params_workload() -> Workload:
    """Parameter-heavy, small batch: the forward's peak carries the kept gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    return Workload(model, opt, (torch.randn(8, 512), torch.randn(8, 512)), steps=2)


def row_of(changes: list[Change]) -> Change:
    return next(c for c in changes if c.options == OPTIONS)


def advice_row(profile: memprof.Profile, workload: Workload | None = None) -> dict:
    table = advise(profile, workload=workload).table()
    rows = [r for r in table.to_dict(orient="records") if r["options"] == OPTIONS]
    assert len(rows) == 1
    return rows[0]


@pytest.mark.parametrize(
    "factory", [params_workload, mlp_workload, cnn_workload, gpt2_workload],
    ids=["params", "mlp", "cnn", "gpt2"],
)
def test_prediction_matches_the_simulated_step(factory: Callable[[], Workload]) -> None:
    kept = dataclasses.replace(factory(), set_to_none=False)
    with seeded():
        reference = baseline(kept)
    # the Workload as a user would write it (set_to_none=True, the default): the advisor
    # mirrors the profiled loop, which kept its gradients, so the baseline measures the same
    row = advice_row(reference.profile, factory())
    assert row["applicable"]
    assert row["predicted_saving_bytes"] > 0
    assert row["error_pct"] is not None and row["error_pct"] <= 5.0, row
    assert row["quality"]["output_drift"] == 0.0


def test_the_forward_sheds_every_kept_gradient() -> None:
    """The fractions produced per module, and the forward's samples without any gradient."""
    w = dataclasses.replace(params_workload(), set_to_none=False)
    with seeded():
        reference = baseline(w)
    facts = read_facts(reference.profile)
    use = gradient_use(facts)
    weights = sum(p.numel() * 4 for p in w.model.parameters())
    assert use.kept and use.backward_passes == 1
    assert use.total == weights
    # the first module reached in backward has produced nothing yet; the last, all but its own
    assert use.produced["3"] == 0.0
    last_own = (512 * 512 + 512) * 4
    assert use.produced["0"] == pytest.approx((weights - last_own) / weights)
    transform = free_gradients_transform(use)
    forward = [s for s in facts.samples if s["phase"] == "forward"]
    kept_forward = [s for s in forward if s["gradient"] == weights]
    assert kept_forward and all(transform(s)["gradient"] == 0 for s in forward)
    total = sum(transform(kept_forward[0])[c] for c in CATEGORIES)
    assert total == sum(kept_forward[0][c] for c in CATEGORIES) - weights


def test_not_applicable_when_gradients_are_already_freed() -> None:
    with seeded():
        reference = baseline(mlp_workload())
    row = row_of(changes_for(read_facts(reference.profile)))
    assert not row.applicable and "already freed" in row.reason


def test_not_applicable_with_gradient_accumulation() -> None:
    w = mlp_workload()
    x, y = w.batch
    with memprof.profile(w.model, w.optimizer) as prof:
        for _ in range(2):
            for half in (slice(0, 64), slice(64, 128)):
                nn.functional.cross_entropy(w.model(x[half]), y[half]).backward()
            w.optimizer.step()
            w.optimizer.zero_grad(set_to_none=False)
            prof.step()
    row = row_of(changes_for(read_facts(prof.profile)))
    assert not row.applicable and "accumulate over 2 backward passes" in row.reason


def test_without_a_clean_step_the_module_order_predicts() -> None:
    """Profiling starts after a first step: every profiled step begins with gradients, so the
    fractions come from the modules' own gradients in backward order."""
    w = dataclasses.replace(params_workload(), set_to_none=False)
    model, opt = w.model, w.optimizer
    assert opt is not None
    x, y = w.batch
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    with memprof.profile(model, opt) as prof:
        for _ in range(2):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            prof.step()
    facts = read_facts(prof.profile)
    use = gradient_use(facts)
    assert "backward order" in use.source
    row = advice_row(prof.profile, params_workload())
    assert row["applicable"] and row["error_pct"] <= 5.0, row


def test_the_row_frees_the_gradients_of_an_unchanged_script() -> None:
    sim = ScriptSimulator(runner("--keep-grads"), steps=2)
    reference = sim.reference()
    row = row_of(changes_for(read_facts(reference.profile)))
    assert row.applicable and row.predicted_peak is not None
    measured = sim.measure([row], reference)
    assert not isinstance(measured, str), measured
    assert abs(row.predicted_peak - measured.peak_bytes) <= 0.05 * measured.peak_bytes
    forward = measured.profile.timeline()
    forward = forward[(forward.phase == "forward") & (forward.step == forward.step.max())]
    assert forward["gradient"].max() == 0
