"""What memprof.advisor.capture takes from a script as it runs: a fake-run Workload whose
unchanged step peaks where the script's measured step does, and nothing left behind."""

from __future__ import annotations

import gc
import runpy
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import script_runs
import torch
from torch.nn.modules import module as module_hooks
from torch.optim.optimizer import _global_optimizer_post_hooks
from torch.utils._python_dispatch import _get_current_dispatch_mode

from memprof.advisor.capture import CaptureError, ScriptCapture
from memprof.advisor.fake_prediction import fake_peak
from memprof.advisor.script import ScriptSimulator
from memprof.advisor.workload import _logits

pytestmark = pytest.mark.slow  # runs scripts and fake runs of what they captured

SCRIPT = Path(__file__).parent / "data" / "train_lm.py"


def runner(*argv: str) -> Callable[[], None]:
    return script_runs.runner(*argv, script=SCRIPT)


@pytest.fixture(scope="module")
def captured() -> tuple[ScriptCapture, int]:
    hooks = (len(module_hooks._global_forward_pre_hooks), len(module_hooks._global_forward_hooks),
             len(_global_optimizer_post_hooks))
    backward = torch.Tensor.backward
    capture = ScriptCapture()
    reference = ScriptSimulator(runner(), steps=2).reference(capture=capture)
    # nothing of the capture stays installed
    assert torch.Tensor.backward is backward
    assert _get_current_dispatch_mode() is None
    assert hooks == (len(module_hooks._global_forward_pre_hooks),
                     len(module_hooks._global_forward_hooks), len(_global_optimizer_post_hooks))
    return capture, reference.peak_bytes


def test_the_loss_is_the_scripts_own(captured: tuple[ScriptCapture, int]) -> None:
    capture, _ = captured
    assert capture.error is None and capture.loss is not None
    names = [op.func.__name__ for op in capture.loss.ops]
    # the label shift, the cast (a no-op on fp32 logits, not on a change's bf16 ones) and the
    # cross-entropy, as the script wrote them; nothing else it did (its loss.item())
    assert names.count("__getitem__") == 2 and names.count("reshape") == 2
    assert "float" in names and "cross_entropy" in names
    assert "item" not in names
    # the targets come from outside the model: kept as a shape and dtype
    (target,) = capture.loss.externals.values()
    assert target.shape == (4, 64) and target.dtype == torch.int64
    # the script's logits variable outlives the backward, and the replay holds it as long
    assert any(ref.kind == "root" for ref in capture.loss.held)


def test_unchanged_fake_run_peaks_as_the_script(captured: tuple[ScriptCapture, int]) -> None:
    capture, measured = captured
    workload = capture.workload()
    fake = fake_peak(workload)
    assert abs(fake - measured) / measured < 0.01
    # the copies are fake: the capture holds no real storage of the script
    assert all(p.untyped_storage().device.type == "meta" or "Fake" in type(p).__name__
               for p in workload.model.parameters())


def test_the_script_model_dies_once_the_capture_is_released() -> None:
    capture = ScriptCapture()
    ScriptSimulator(runner(), steps=1).reference(capture=capture)
    root = capture._root
    assert root is not None
    capture.workload()
    # the fake copy's class holds the script's globals, its real model among them ...
    capture.release()
    gc.collect()
    # ... until the capture lets the copy go
    assert root() is None
    with pytest.raises(CaptureError, match="released"):
        capture.workload()


def test_gradient_accumulation_is_refused_with_the_reason() -> None:
    capture = ScriptCapture()
    ScriptSimulator(runner("--accumulate", "2"), steps=1).reference(capture=capture)
    with pytest.raises(CaptureError, match="called its model 2 times"):
        capture.workload()


def test_logits_of_a_model_output_without_logits() -> None:
    clip = pytest.importorskip("transformers.models.clip.modeling_clip")
    out = clip.CLIPOutput(loss=torch.ones(()), logits_per_image=torch.ones(2, 3),
                          logits_per_text=torch.ones(3, 2))
    assert _logits(out).shape == (2, 3)


def test_zero_grad_between_forward_and_backward_is_replayed() -> None:
    # GIVEN examples/train_cnn.py, which calls zero_grad(set_to_none=True) after its forward:
    # the gradients are alive in the next forward, gone in its backward
    script = Path(__file__).parent.parent / "examples" / "train_cnn.py"

    def run() -> None:
        saved = sys.argv[:]
        sys.argv = [str(script)]
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = saved

    capture = ScriptCapture()
    reference = ScriptSimulator(run, steps=2).reference(capture=capture)
    assert capture.grads_at_backward is False
    assert capture.grads_at_forward is True
    # WHEN the unchanged step runs on fake tensors (gradients kept between steps, as the
    # profile says, and freed where the script frees them)
    from memprof.advisor import advise

    advice = advise(reference.profile, fake_model=capture.workload(), simulate=False)
    # THEN it peaks where the script did
    fake = advice.extra["fake_baseline_peak_bytes"]
    assert abs(fake - reference.peak_bytes) / reference.peak_bytes < 0.005


def _captured_mlp(batch: int) -> ScriptCapture:
    script = Path(__file__).parent.parent / "examples" / "train_mlp.py"

    def run() -> None:
        saved = sys.argv[:]
        sys.argv = [str(script), "--batch", str(batch), "--hidden", "64", "--steps", "2"]
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = saved

    capture = ScriptCapture()
    ScriptSimulator(run, steps=2).reference(capture=capture)
    return capture


def test_batch_rows_resize_the_losss_target_too() -> None:
    # GIVEN examples/train_mlp.py, whose loss takes a target made outside the model (#24)
    from memprof.advisor.batch_rows import advice_rows

    workload = _captured_mlp(8).workload()
    base = fake_peak(workload)
    # WHEN the batch rows resize the captured step to twice and half the batch
    rows = advice_rows(workload, None, base, None, fake={})
    # THEN each is predicted by a fake run (the target resized with the inputs), not an error
    assert [row.applicable for row in rows] == [True, True], rows[0].reason
    double, half = rows
    assert double.options == {"batch": 16} and double.predicted_by == "fake run"
    # and peaks where a fake run of the script captured at that batch does
    assert double.predicted_peak_bytes == fake_peak(_captured_mlp(16).workload())
    assert half.predicted_peak_bytes == fake_peak(_captured_mlp(4).workload())
    assert double.predicted_saving_bytes is not None and double.predicted_saving_bytes < 0


def test_an_outside_tensor_whose_batch_dimension_cannot_be_told_gives_the_reason() -> None:
    from memprof.advisor.capture import _TensorMeta
    from memprof.errors import FakeRunError

    def meta(*shape: int) -> _TensorMeta:
        return _TensorMeta.of(torch.empty(shape, dtype=torch.int64))

    # a target leading with the batch is resized; a class weight is kept
    assert meta(8, 3).at_batch(8, 16).shape == (16, 3)
    assert meta(8, 3).at_batch(8, 16).stride == (3, 1)
    assert meta(10).at_batch(8, 16).shape == (10,)
    # a flattened batch (8 x 5 rows) or a batch in another dimension cannot be resized safely
    with pytest.raises(FakeRunError, match=r"shape \[40\] .* cannot be told"):
        meta(40).at_batch(8, 16)
    with pytest.raises(FakeRunError, match="cannot be told"):
        meta(5, 8).at_batch(8, 4)


def test_a_fake_run_starts_without_the_last_runs_step(captured: tuple[ScriptCapture, int]) -> None:
    """The replayed step holds the script's variables (its logits and loss, so their graph and
    gradients) until its next call: held across runs, the next run freed them while profiled
    and read the last run's gradients as its own (autocast bf16 after the shared optimizer
    run: +924,160 B, the model's gradients, in one process)."""
    from memprof.advisor.fake_prediction import fake_peaks
    from memprof.advisor.mixed_precision import _apply_autocast

    capture, _ = captured
    workload = capture.workload()
    autocast = _apply_autocast(torch.bfloat16)
    # GIVEN the same change run after a plain fake run and after the shared optimizer run
    fake_peak(workload)
    after_plain = fake_peak(workload, [autocast])
    fake_peaks(workload, [])
    assert workload.step_fn._held == []  # type: ignore[union-attr]  # nothing kept after a run
    after_shared = fake_peak(workload, [autocast])
    # THEN it peaks the same
    assert after_shared == after_plain
