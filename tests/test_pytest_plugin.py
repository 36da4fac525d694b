"""The pytest plugin (``@pytest.mark.memprof_limit``), run on inner test files with pytester."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _shared_recorder_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytester gives the inner run its own HOME: keep memprof's compiled C++ recorder cache
    where the outer run has it (else each inner run compiles it again, up to a minute)."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        from torch.utils import cpp_extension

        outer = Path(cpp_extension._get_build_directory("memprof", verbose=False)).parent
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(outer))

#: A step with a known peak: Linear(512, 512) weights (1 MiB + 2 KiB of bias), their
#: gradients (as much again), and a 64 x 512 batch and output (128 KiB each).
INNER = """
import pytest
import torch
from torch import nn


def step():
    torch.manual_seed(0)
    model = nn.Linear(512, 512)
    model(torch.randn(64, 512)).sum().backward()


@pytest.mark.memprof_limit("1 MiB")
def test_over():
    step()


@pytest.mark.memprof_limit("64 MiB")
def test_under():
    step()


def test_unmarked():
    step()


@pytest.mark.memprof_limit("1 MiB")
def test_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        step()


@pytest.mark.memprof_limit("1 KiB")
def test_own_failure_is_kept():
    assert 1 == 2, "the test's own assertion"
"""


def test_over_the_limit_fails_and_names_the_holder(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=3)
    out = result.stdout.str()
    # the weights (1 MiB) and their gradient are the largest holders, both in the Linear ('')
    result.stdout.fnmatch_lines([
        "*_ test_over _*",
        "memprof_limit: peak 2.* MiB exceeds the limit 1.0 MiB (step 0, backward); most held "
        "at the peak: parameter of '(root)' (1.0 MiB), gradient of '(root)' (1.0 MiB), *",
    ])
    assert "test_under" not in out.split("short test summary info")[-1]
    assert "FAILED test_inner.py::test_fake - Failed: memprof_limit: peak" in out
    assert "FAILED test_inner.py::test_own_failure_is_kept - AssertionError" in out


def test_the_peak_is_measured_not_made_up(pytester: pytest.Pytester) -> None:
    # GIVEN limits just under and just over the step's exact peak
    pytester.makepyfile(test_edge="""
import pytest, torch
from torch import nn

PARAMS = (512 * 512 + 512) * 4

def step():
    model = nn.Linear(512, 512)
    x = torch.randn(64, 512)
    model(x).sum().backward()

@pytest.mark.memprof_limit(2 * PARAMS)  # weights and their gradients alone reach it
def test_params_and_grads_exceed():
    step()

@pytest.mark.memprof_limit(2 * PARAMS + 4 * 64 * 512 * 4)
def test_everything_fits():
    step()
""")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    assert "FAILED test_edge.py::test_params_and_grads_exceed" in result.stdout.str()


@pytest.mark.parametrize("limit", ['"lots"', "-5", '"64 MiB", "extra"', "2.5"])
def test_a_bad_limit_is_a_usage_error(pytester: pytest.Pytester, limit: str) -> None:
    pytester.makepyfile(test_bad=f"""
import pytest

@pytest.mark.memprof_limit({limit})
def test_x():
    pass
""")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_bad.py::test_x: memprof_limit *64 MiB*"])
    assert "Traceback" not in result.stderr.str()


def test_marker_arguments() -> None:
    from memprof.pytest_plugin import limit_of

    assert limit_of(pytest.mark.memprof_limit("64 MiB").mark, "t") == (64 << 20, "dispatch")
    assert limit_of(pytest.mark.memprof_limit(1000, backend="events").mark, "t") == (
        1000, "events")
    with pytest.raises(pytest.UsageError, match="backend must be one of"):
        limit_of(pytest.mark.memprof_limit("1 MiB", backend="gpu").mark, "t")
    with pytest.raises(pytest.UsageError, match="takes one limit"):
        limit_of(pytest.mark.memprof_limit().mark, "t")


def test_unmarked_tests_do_not_import_memprof_or_torch(pytester: pytest.Pytester) -> None:
    # GIVEN a run with no marked test, in a fresh interpreter where the plugin is loaded
    pytester.makepyfile(test_light="""
import sys

def test_nothing_heavy_was_imported():
    assert "memprof" in str(sys.modules.get("memprof_pytest"))
    assert "torch" not in sys.modules and "memprof" not in sys.modules
""")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
