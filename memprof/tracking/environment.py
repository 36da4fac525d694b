"""The versions that explain a profile."""

from __future__ import annotations

import platform
import sys

import torch

from memprof._version import __version__


def environment() -> dict[str, str]:
    """Versions that explain a profile: memprof, torch, Python, CUDA, the command line."""
    return {
        "memprof": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": str(torch.version.cuda or "none"),
        "command": " ".join(sys.argv),
    }
