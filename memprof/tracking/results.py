"""The finished profile read through the Profiler: ``prof.profile`` and the pass-through
methods (``prof.modules()``, ``prof.peak()``, ``prof.save(...)``, ...)."""

from __future__ import annotations

from typing import Any

from memprof.profile import Peak, Profile


class ProfileResults:
    """What :class:`~memprof.tracking.session.Profiler` offers once its ``with`` block ends:
    each method reads :attr:`profile`, which the block's end sets (``_result``)."""

    _result: Profile | None = None

    @property
    def profile(self) -> Profile:
        """The finished :class:`~memprof.profile.Profile` (after the ``with`` block)."""
        if self._result is None:
            raise RuntimeError("the profile is ready when the `with memprof.profile` block ends")
        return self._result

    def __repr__(self) -> str:
        """One line: the finished profile's, or how far the ``with`` block has got."""
        name = type(self).__name__
        if self._result is not None:
            return f"{name}(finished: {self._result!r})"
        if not getattr(self, "_entered", False):  # the Profiler's own state, set on entry
            return f"{name}(not started)"
        return (f"{name}(running: step {getattr(self, '_step', 0)}, "
                f"backend {getattr(self, 'backend', '?')!r})")

    def modules(self) -> Any:
        """Per-module table: see :meth:`memprof.profile.Profile.modules`."""
        return self.profile.modules()

    def peak(self) -> Peak:
        """The peak: see :meth:`memprof.profile.Profile.peak`."""
        return self.profile.peak()

    def timeline(self) -> Any:
        """Timeline table: see :meth:`memprof.profile.Profile.timeline`."""
        return self.profile.timeline()

    def steps(self) -> Any:
        """Per-step table: see :meth:`memprof.profile.Profile.steps`."""
        return self.profile.steps()

    def save(self, path: Any, *, overwrite: bool = False) -> Any:
        """Save the profile as JSON: see :meth:`memprof.profile.Profile.save`. As one rank of
        several (torchrun), ``run.json`` becomes ``run.rank{R}.json``."""
        from memprof.tracking.distributed import rank_from_env, rank_path

        return self.profile.save(rank_path(path, rank_from_env()), overwrite=overwrite)

    def report(self, path: Any, *, advice: Any = None, overwrite: bool = False) -> Any:
        """Write the HTML report: see :meth:`memprof.profile.Profile.report` (one file per
        rank, as :meth:`save`)."""
        from memprof.tracking.distributed import rank_from_env, rank_path

        return self.profile.report(rank_path(path, rank_from_env()), advice=advice,
                                   overwrite=overwrite)

    def summary(self, **kwargs: Any) -> str:
        """Plain-text summary: see :meth:`memprof.profile.Profile.summary`."""
        return self.profile.summary(**kwargs)

    def _repr_html_(self) -> str | None:
        """Jupyter's view of the finished profile (none while the block runs)."""
        return self._result._repr_html_() if self._result is not None else None
