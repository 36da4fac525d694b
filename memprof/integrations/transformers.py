"""``MemprofCallback`` for the Hugging Face ``transformers.Trainer``.

Example::

    from memprof.integrations.transformers import MemprofCallback

    trainer = Trainer(model, args, train_dataset=data, callbacks=[MemprofCallback(steps=3)])
    trainer.train()
    # output_dir/memprof_steps1-3.json and .html; trainer.state.log_history has memprof/* keys

Steps are numbered as the Trainer numbers them (``state.global_step`` once the step is done:
the first optimizer step is 1); with gradient accumulation a step is one optimizer step and all
its micro-batches. The profile is written into ``output_dir`` (the callback's, else the
Trainer's ``args.output_dir``) under a name no file has yet (``_2``, ``_3`` ... otherwise, and a
``.rank{R}`` tag under torchrun), and its peak and categories are appended to
``state.log_history`` (keys ``memprof/peak_bytes``, ``memprof/peak_<category>_bytes``,
``memprof/peak_step``, ``memprof/profiled_steps``) and passed to the next ``on_log``, so
reporters such as TensorBoard or W&B get them too.

The Trainer has no callback for a failed ``train()``: if training raises inside the profiled
window, the profiler stays open until :meth:`MemprofCallback.close` or the next ``train()``
(which closes it first, so no hook outlives the callback by more than that).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from memprof.integrations._window import StepWindow, log_entry
from memprof.profile import Profile


class MemprofCallback(TrainerCallback):
    """Profile the chosen steps of ``Trainer.train()`` with memprof.

    ``steps``: how many steps from the first (``3``: steps 1-3) or which steps (``[5, 6]``).
    ``output_dir``: where the profile and report go [default: the Trainer's output_dir].
    ``html``: write the HTML report too; ``advise``: run the advisor (predictions only, so
    the report has its recommendations); ``prediction``: ``"fake"`` predicts each change by a
    fake run of the model, batch and loss taken from the first profiled step (a step of
    several forwards, gradient accumulation, falls back with the reason), ``"analytic"`` from
    the profile alone.
    """

    def __init__(self, steps: int | Iterable[int] = 3, output_dir: str | os.PathLike[str] |
                 None = None, *, html: bool = True, advise: bool = True,
                 prediction: str = "fake") -> None:
        self._window = StepWindow(steps, framework="transformers", html=html, advise=advise,
                                  prediction=prediction)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self._pending: dict[str, float] = {}
        #: The files written: {".json": path, ".html": path}.
        self.paths: dict[str, Path] = {}

    @property
    def profile(self) -> Profile | None:
        """The profile of the chosen steps, once they have run."""
        return self._window.profile

    @property
    def notes(self) -> list[str]:
        """Why the report or the advice was not written, if they were not."""
        return list(self._window.notes)

    def close(self) -> None:
        """Close a profile left open by a ``train()`` that raised (it is kept, partial)."""
        if self._window.close(RuntimeError("training stopped inside the profiled steps")):
            self._output(None, None)

    # --------------------------------------------------------------- Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._window.begin(state.global_step + 1, kwargs.get("model"), kwargs.get("optimizer"))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._window.end(state.global_step):
            self._output(args, state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._window.close():  # training ended before the last chosen step
            self._output(args, state)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs is not None and self._pending:
            logs.update(self._pending)
            self._pending = {}

    def _output(self, args: Any, state: Any) -> None:
        directory = self.output_dir or Path(getattr(args, "output_dir", None) or "memprof")
        self.paths = self._window.write(directory)
        profile = self._window.profile
        entry = log_entry(profile) if profile is not None else {}
        if state is not None and entry:
            state.log_history.append({**entry, "step": state.global_step})
        self._pending = entry


__all__ = ["MemprofCallback"]
