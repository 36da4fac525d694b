"""A failure of the user's code (model factory, batch, the step under fake tensors) as one
:class:`~memprof.errors.EstimateError` line, with what to do where the cause is known."""

from __future__ import annotations

import contextlib
import re
import traceback
from collections.abc import Iterator

from memprof.errors import EstimateError, MemprofError


@contextlib.contextmanager
def user_code(what: str) -> Iterator[None]:
    """Turn a failure of the user's code (model, batch) into one EstimateError line."""
    try:
        yield
    except MemprofError:
        raise
    except Exception as exc:
        raise EstimateError(f"{what} failed: {one_line(exc)}{_refusal_hint(exc)}") from exc


def _refusal_hint(exc: BaseException) -> str:
    """Why a fake run failed, and what to do instead, for the failures known to be no bug of
    the model: an estimate that cannot run says so in one line."""
    text = str(exc)
    if "DataDependent" in type(exc).__name__:
        where = value_read_at(exc)
        if where is not None and where.name == "_detect_is_causal_mask":
            return (f" (nn.Transformer reads its attention mask's values to tell whether it is "
                    f"causal, at {_place(where)}, and fake tensors have no values: pass "
                    "is_causal=/tgt_is_causal= with the mask, as it then reads none, or "
                    "profile one real step with memprof.profile or memprof run)")
        at = f" at {_place(where)}" if where is not None else ""
        return (f" (the model branches on tensor values{at}, such as a CTC loss checking "
                "labels.max(), which fake tensors do not have; such code cannot be estimated "
                "without running it: profile one real step with memprof.profile or memprof run)")
    if "convert all Tensors to FakeTensors" in text:
        return (" (the model holds real tensors made outside the estimate, as a model built or "
                "compiled beforehand does: pass a factory that builds it, such as "
                "lambda: Model(config), and compile it inside the factory if at all)")
    if "_grouped_mm" in text or ("Expected inputs of BF16 type" in text and "mat_a" in text):
        return (" (the mixture-of-experts kernel torch._grouped_mm has a fake kernel for bf16 "
                "only, where the real CPU kernel also runs fp32: estimate with dtype='bf16', or "
                "profile one real step with memprof.profile or memprof run)")
    return ""


#: A private module of PyTorch: a path segment under torch/ that starts with "_".
_INTERNAL = re.compile(r"/torch/(?:[^/]+/)*_[^/]*")


def value_read_at(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of ``exc``'s traceback outside PyTorch's private modules
    (``torch/_*``, ``torch/utils/_*``: fake tensors, dispatch) and memprof: the code that read
    a tensor value."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        if _INTERNAL.search(path) or "/memprof/" in path or path.endswith("/contextlib.py"):
            continue
        return frame
    return None


def _place(frame: traceback.FrameSummary) -> str:
    path = frame.filename.replace("\\", "/")
    if "/site-packages/" in path:
        path = path.split("/site-packages/", 1)[1]
    return f"{path}:{frame.lineno} in {frame.name}"


def one_line(exc: BaseException) -> str:
    """The exception's class and the first line of its text."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
