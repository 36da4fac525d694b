"""An estimate's options are one record, checked when made (issue #28): the keyword arguments
of ``estimate``/``estimate_step`` become an ``EstimateOptions`` before any model is built."""

from __future__ import annotations

import re

import pytest
import torch

from memprof.errors import EstimateError
from memprof.estimate import EstimateOptions, estimate, estimate_step


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": "fp8"}, "unknown dtype 'fp8'; choose from bf16, fp16, fp32"),
        ({"optimizer": "lion"}, "unknown optimizer 'lion'"),
        ({"device": "tpu"}, "unknown device 'tpu'; choose from cuda, cpu"),
        ({"mixed_precision": "fp8", "dtype": "fp32"}, "unknown mixed_precision 'fp8'"),
        ({"mixed_precision": "bf16", "dtype": "fp16"}, "mixed precision keeps fp32 weights"),
        ({"steps": 0}, "steps must be at least 1 (got 0)"),
    ],
)
def test_a_bad_option_is_refused_before_the_model_is_built(
    options: dict[str, object], message: str
) -> None:
    built: list[int] = []

    def factory() -> torch.nn.Module:
        built.append(1)
        return torch.nn.Linear(2, 2)

    with pytest.raises(EstimateError, match=re.escape(message)):
        estimate_step(factory, batch=torch.zeros(1, 2), **options)
    with pytest.raises(EstimateError):
        estimate(factory, batch=torch.zeros(1, 2), **options)
    assert built == []


def test_an_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="dtyp"):
        estimate_step(lambda: torch.nn.Linear(2, 2), batch=torch.zeros(1, 2), dtyp="fp32")


def test_the_options_say_what_the_step_runs() -> None:
    default = EstimateOptions()
    assert (default.parameter_dtype, default.autocast_dtype) == (torch.bfloat16, None)
    assert (default.round_to, default.step_optimizer) == (512, "adamw")
    mixed = EstimateOptions(dtype="fp32", mixed_precision="fp16", device="cpu", inference=True)
    assert (mixed.parameter_dtype, mixed.autocast_dtype) == (torch.float32, torch.float16)
    assert (mixed.round_to, mixed.step_optimizer) == (1, "none")
    # the mixed-precision name as dtype is accepted too (fp32 weights all the same)
    assert EstimateOptions(dtype="bf16", mixed_precision="bf16").parameter_dtype == torch.float32
