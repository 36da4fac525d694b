"""Importing the fine-tuning libraries without their start-up noise.

peft imports transformers, which imports torchao: torchao logs a warning per kernel library
built for GPUs this machine lacks, and torch one per enum torchao registers. None of it is
about the user's run: a first ``memprof advise`` printed it in the middle of its answer, and
the command line keeps its stderr to its own one-line errors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

#: The loggers whose warnings an import of peft or torchao emits.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_import() -> Iterator[None]:
    """Only errors of :data:`NOISY_LOGGERS` are shown inside; their levels are restored after."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
