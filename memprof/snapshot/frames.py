"""The synthetic frames memprof writes into a snapshot, and how to read them back.

A real snapshot's frames are the Python and C++ stack of each allocation, innermost first.
memprof knows the module, phase and category of an allocation rather than its stack, so it
writes them as frames with filenames in angle brackets (memory_viz shows them like any frame):

- ``{"filename": "<memprof module>", "line": 0, "name": "h.0.mlp (forward)"}``
- ``{"filename": "<memprof category>", "line": 0, "name": "activation"}``

and, where the profile recorded it, the user's source line as an ordinary frame before them.
"""

from __future__ import annotations

import re
from typing import Any

MODULE_FILE = "<memprof module>"
CATEGORY_FILE = "<memprof category>"
_MODULE_NAME = re.compile(r"^(?P<module>.*) \((?P<phase>[a-z_]+)\)$")
_SOURCE = re.compile(r"^(?P<file>.+):(?P<line>\d+) in (?P<name>.+)$")

Frame = dict[str, Any]


def module_frame(module: str, phase: str) -> Frame:
    """The frame naming ``module`` and the phase it ran in."""
    return {"filename": MODULE_FILE, "line": 0, "name": f"{module} ({phase})"}


def category_frame(category: str) -> Frame:
    """The frame naming a memprof category."""
    return {"filename": CATEGORY_FILE, "line": 0, "name": category}


def source_frame(source: str) -> Frame | None:
    """A ``file:line in function`` string (TensorAtPeak.source) as a frame; None if empty."""
    match = _SOURCE.match(source) if source else None
    if match is None:
        return None
    return {"filename": match["file"], "line": int(match["line"]), "name": match["name"]}


def frames_for(category: str, module: str, phase: str, source: str = "") -> list[Frame]:
    """Innermost first, as torch orders them: the source line, the module, the category."""
    frames = [module_frame(module, phase), category_frame(category)]
    where = source_frame(source)
    return [where, *frames] if where is not None else frames


def read_memprof_frames(frames: list[Frame]) -> tuple[str | None, str | None, str | None]:
    """``(category, module, phase)`` from memprof's own frames; None for what is absent."""
    category = module = phase = None
    for frame in frames:
        filename = frame.get("filename")
        if filename == CATEGORY_FILE and category is None:
            category = str(frame.get("name", ""))
        elif filename == MODULE_FILE and module is None:
            match = _MODULE_NAME.match(str(frame.get("name", "")))
            if match is not None:
                module, phase = match["module"], match["phase"]
    return category, module, phase
