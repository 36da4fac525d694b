"""The exceptions a user can cause, each mapped to a CLI exit code."""

from __future__ import annotations


class MemprofError(Exception):
    """Base class: a problem the user can fix, shown as one line without a traceback."""

    exit_code = 1


class ProfileLoadError(MemprofError):
    """A profile file is missing, truncated, not JSON, not a profile, or from a newer memprof."""

    exit_code = 2


class ProfileActiveError(MemprofError, RuntimeError):
    """A second :func:`memprof.profile` was entered while one is active."""


class BudgetError(MemprofError, ValueError):
    """A memory budget that cannot be read ("24 gigs")."""

    exit_code = 2


class UnknownGPUError(MemprofError, KeyError):
    """A GPU name that is not in the catalog."""

    exit_code = 2

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class OutputExistsError(MemprofError, FileExistsError):
    """Refusing to overwrite an existing file without ``overwrite=True`` / ``--force``."""

    exit_code = 3


class DeviceNotAvailableError(MemprofError):
    """NVML or CUDA cannot be reached (no driver, no permission)."""

    exit_code = 4


class AllocatorConfError(MemprofError, ValueError):
    """A ``PYTORCH_CUDA_ALLOC_CONF`` string the caching allocator would refuse."""

    exit_code = 2


class EstimateError(MemprofError, ValueError):
    """An estimate that cannot run: unknown model, unbuildable config, failing factory."""

    exit_code = 2


class ExportError(MemprofError):
    """A profile that cannot be exported (it recorded no step)."""

    exit_code = 2


class RanksError(MemprofError):
    """The profiles given cannot be merged into one ranks report."""


class CommandError(MemprofError):
    """A bad command line argument the user can fix (missing script, not Python, ...)."""

    exit_code = 2  # click's usage errors exit with 2 too


class AllocatorOOM(MemprofError):
    """The caching-allocator model cannot serve a request within its capacity (``args[0]``:
    the bytes requested); :func:`memprof.allocator.replay` turns it into its ``oom`` record."""


class FakeRunError(MemprofError, RuntimeError):
    """A change that cannot be predicted by a fake run (the message says why)."""


class KernelNotMeasured(MemprofError):
    """A fake run in :func:`memprof.tracking.kernel_corrections.measuring_nothing` met a kernel
    whose memory is not measured yet: it stops, to be run again where measuring is allowed."""


class ScriptFailed(MemprofError):
    """The script raised (or exited non-zero) before its steps were measured."""


class CaptureError(MemprofError):
    """The script ran, but what a fake run needs could not be taken from it."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none): what a row's caveat or a
    one-line refusal quotes of it."""
    text = str(exc)
    return text.splitlines()[0] if text else ""
