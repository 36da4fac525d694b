"""``MemprofCallback`` for Lightning (``lightning.pytorch.Trainer``).

Example::

    from memprof.integrations.lightning import MemprofCallback

    trainer = lightning.Trainer(max_steps=10, callbacks=[MemprofCallback(steps=3)])
    trainer.fit(model, loader)
    # default_root_dir/memprof_steps1-3.json and .html; the peak is logged as memprof/*

Steps are numbered as ``trainer.global_step`` counts them once done (the first optimizer step
is 1). The profile and its report go into ``output_dir`` (else the Trainer's
``default_root_dir``) under a name no file has yet (``_2``, ... otherwise, and a ``.rank{R}``
tag under torchrun). The peak and its categories (``memprof/peak_bytes``,
``memprof/peak_<category>_bytes``, ...) are logged with ``LightningModule.log_dict`` at the
last profiled step, so they reach the Trainer's loggers and ``trainer.callback_metrics``, and
are kept in :attr:`MemprofCallback.history`. If training raises, ``on_exception`` closes the
profile (partial) and removes every hook.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from memprof.integrations._window import StepWindow, log_entry
from memprof.profile import Profile


class MemprofCallback(Callback):
    """Profile the chosen steps of ``Trainer.fit`` with memprof.

    ``steps``: how many steps from the first (``3``: steps 1-3) or which steps (``[5, 6]``).
    ``output_dir``: where the profile and report go [default: the Trainer's default_root_dir].
    ``html``: write the HTML report too; ``advise``: run the advisor (predictions only);
    ``prediction``: ``"fake"`` predicts each change by a fake run of the model, batch and loss
    taken from the first profiled step (the first module ``training_step`` calls must hold
    every parameter the optimizer steps, else it falls back with the reason), ``"analytic"``
    from the profile alone.
    """

    def __init__(self, steps: int | Iterable[int] = 3, output_dir: str | os.PathLike[str] |
                 None = None, *, html: bool = True, advise: bool = True,
                 prediction: str = "fake") -> None:
        self._window = StepWindow(steps, framework="lightning", html=html, advise=advise,
                                  prediction=prediction)
        self.output_dir = None if output_dir is None else Path(output_dir)
        #: The files written: {".json": path, ".html": path}.
        self.paths: dict[str, Path] = {}
        #: What was logged, one dict per profile (with its ``step``).
        self.history: list[dict[str, float]] = []

    @property
    def profile(self) -> Profile | None:
        """The profile of the chosen steps, once they have run."""
        return self._window.profile

    @property
    def notes(self) -> list[str]:
        """Why the report or the advice was not written, if they were not."""
        return list(self._window.notes)

    # --------------------------------------------------------------- Lightning events
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        self._window.begin(int(trainer.global_step) + 1, pl_module,
                           optimizers[0] if len(optimizers) == 1 else None)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._window.end(int(trainer.global_step)):
            entry = self._output(trainer)
            if entry:
                pl_module.log_dict(entry, on_step=True, on_epoch=False, prog_bar=False,
                                   logger=trainer.logger is not None, batch_size=1)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._window.close():  # training ended before the last chosen step
            self._output(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._window.close(exception):
            self._output(trainer)

    def _output(self, trainer: Any) -> dict[str, float]:
        root = getattr(trainer, "default_root_dir", None) or "memprof"
        self.paths = self._window.write(self.output_dir or Path(root))
        profile = self._window.profile
        entry = log_entry(profile) if profile is not None else {}
        if entry:
            self.history.append({**entry, "step": float(trainer.global_step)})
        return entry


__all__ = ["MemprofCallback"]
