"""torch.compile: which source module made each tensor a compiled forward saves for backward.

An inductor-compiled region runs no module hooks: everything it allocates would be charged to
the module that called it. Its forward graph still knows, per node, the stack of modules whose
code made it (``nn_module_stack``). While profiling, a post-grad pass (inductor's
``post_grad_custom_post_pass``, only when the user set none) reads the module of every output
of each forward graph compiled; the compiled forward returns the tensors it saves for backward
among those outputs, so each saved tensor gets the module whose code made it.

Limits, by design:
- The owner is the module that *made* the tensor; eager memprof charges an activation to the
  module whose op first *saved* it. The two agree except for a tensor made in one module and
  saved only by the next one (a layer's output saved by the following layer's input).
- The partitioner may save other tensors than eager autograd (it recomputes cheap ops in
  backward): the saved set, hence the per-module bytes, is the compiled one's.
- Only graphs compiled while profiling are known (the pass's cache key is new in each profile,
  so inductor's FX graph cache misses and the pass sees each graph: a profiled run compiles
  afresh); a model compiled and run before the profile keeps its compiled regions' memory on
  the calling module's row.

Nothing here changes what is compiled: the pass only reads the graph. Inductor (which loads
dynamo: about as long as ``import torch``) is imported only where torch.compile is in use: the
profile installs the pass at its start when dynamo is loaded, else at the first compiled
module it sees (:func:`is_compiled` itself imports nothing).
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import uuid
import weakref
from typing import Any

import torch

#: How many autograd nodes a forward's output graph is searched for compiled regions.
MAX_NODES = 512
_RETURN = re.compile(r"^\s*return \((.*?),?\s*\)\s*$", re.MULTILINE)
_NAME = re.compile(r"^[A-Za-z_]\w*$")
_SIGNATURE = re.compile(r"def forward\(self,?(.*?)\):?\s*$", re.MULTILINE)
_PARAMETER = re.compile(r"(\w+)\s*:")
#: an output that is a graph input (placeholders may be renamed after the pass)
_INPUT = "<input>"


def module_path(stack: dict[str, Any] | None) -> str | None:
    """The innermost module's path relative to the compiled module (``"layers.0.fc1"``) from a
    node's ``nn_module_stack``; None for code of the compiled module itself."""
    if not stack:
        return None
    path = str(list(stack.values())[-1][0])
    path = re.sub(r"^[LG]\['[^']*'\]", "", path)  # the compiled forward's ``self``
    path = re.sub(r"_modules\['([^']*)'\]", r"\1", path)
    path = re.sub(r"\[\s*'?([^'\]]*)'?\s*\]", r".\1", path)  # layers[0], blocks['a']
    path = re.sub(r"\.+", ".", path).strip(".")
    return path or None


def _output_names(args: Any) -> tuple[str, ...]:
    return tuple(
        _INPUT if a.op == "placeholder" else a.name for a in args if isinstance(a, torch.fx.Node)
    )


def _output_paths(graph: torch.fx.Graph, outputs: Any) -> list[str | None]:
    """The module of each graph output. A node the partitioner moved from backward into the
    forward (a weight's transpose, layer norm's ``rstd / n``) has no module stack: it belongs
    to the module whose forward op made that backward (the same autograd ``seq_nr``)."""
    by_seq: dict[int, str] = {}
    for node in graph.nodes:
        path = module_path(node.meta.get("nn_module_stack"))
        seq = node.meta.get("seq_nr")
        if path is not None and isinstance(seq, int):
            by_seq.setdefault(seq, path)
    paths: list[str | None] = []
    for a in outputs:
        if not isinstance(a, torch.fx.Node) or a.op == "placeholder":
            paths.append(None)
            continue
        path = module_path(a.meta.get("nn_module_stack"))
        if path is None and a.meta.get("partitioner_tag") == "is_backward":
            path = by_seq.get(a.meta.get("seq_nr", -1))
        paths.append(path)
    return paths


@functools.cache
def _inductor_config() -> Any:
    """``torch._inductor.config``, imported on first use, with :class:`_OwnersPass` made one of
    inductor's custom graph passes (its FX graph cache keys those by ``uuid()``); None for a
    torch without inductor."""
    try:
        from torch._inductor import config
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:  # pragma: no cover - inductor ships with torch >= 2.0
        return None
    CustomGraphPass.register(_OwnersPass)
    return config


def compile_loaded() -> bool:
    """Whether torch.compile's dynamo is loaded: nothing runs compiled before it is."""
    return "torch._dynamo" in sys.modules


#: The profile's warning where a backward ran under compiled autograd.
COMPILED_AUTOGRAD_WARNING = (
    "compiled autograd: backward ran as one compiled graph, which runs no per-module hooks, so "
    "its memory is not split by module (no module's backward start is marked); the step's "
    "peak and totals are counted as usual")


def compiled_autograd_on() -> bool:
    """Whether a backward would now run under compiled autograd (``torch._dynamo.config
    .compiled_autograd``, or ``torch._dynamo.compiled_autograd._enable``): it traces a node's
    Python hooks into its graph and refuses C++ ones it cannot trace. Imports nothing."""
    module = sys.modules.get("torch._dynamo.compiled_autograd")
    if module is None:
        return False
    config = sys.modules.get("torch._dynamo.config")
    return bool(module.compiled_autograd_enabled
                or (config is not None and getattr(config, "compiled_autograd", False)))


class _OwnersPass:
    """Reads each post-grad graph's outputs' modules into ``owners``; changes nothing."""

    def __init__(self, owners: dict[tuple[str, ...], list[str | None] | None]) -> None:
        self.owners = owners
        self.key = uuid.uuid4().hex

    def __call__(self, graph: torch.fx.Graph) -> None:
        try:
            outputs: Any = graph.output_node().args[0]
            paths = _output_paths(graph, outputs)
            key = _output_names(outputs)
        except Exception:  # reading must never break the user's compile
            return
        if key in self.owners and self.owners[key] != paths:
            self.owners[key] = None  # two graphs alike in names, unlike in modules: unknown
        else:
            self.owners[key] = paths

    def uuid(self) -> str:
        """A key of this profile's own: inductor's FX graph cache then misses, so the pass
        sees every graph compiled while profiling (a cached graph would skip it)."""
        return self.key


class CompiledOwners:
    """The source modules of compiled forwards' saved tensors (see the module docstring)."""

    def __init__(self) -> None:
        self._owners: dict[tuple[str, ...], list[str | None] | None] = {}
        self._pass: _OwnersPass | None = None
        #: id(compiled forward) -> (a weak reference to it, its outputs' modules): the profile
        #: keeps no graph alive (compiled graphs are dataclasses: not hashable)
        self._by_forward: dict[int, tuple[weakref.ref[Any], list[str | None]]] = {}

    def install(self) -> bool:
        """Read the graphs compiled from now on (again: no change); False if the user has a
        pass of their own there (it is left alone, and compiled regions stay on their caller's
        row)."""
        if self._pass is not None:
            return True
        config = _inductor_config()
        if config is None or config.post_grad_custom_post_pass is not None:
            return False
        self._pass = _OwnersPass(self._owners)
        config.post_grad_custom_post_pass = self._pass
        return True

    def remove(self) -> None:
        if self._pass is not None:  # installed: inductor's config is loaded
            config = _inductor_config()
            if config is not None and config.post_grad_custom_post_pass is self._pass:
                config.post_grad_custom_post_pass = None
        self._pass = None

    def saved(self, grad_fn: Any) -> list[tuple[torch.Tensor, str]]:
        """``(tensor, module path)`` for each tensor saved by the compiled regions whose
        backward is reachable from ``grad_fn`` (a forward's output), where the path is known."""
        found: list[tuple[torch.Tensor, str]] = []
        stack, seen = [grad_fn], set[int]()
        while stack and len(seen) < MAX_NODES:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            forward_cls = getattr(type(node), "_forward_cls", None)
            if forward_cls is not None and hasattr(forward_cls, "compiled_fw"):
                found.extend(self._saved_by(node, forward_cls))
            stack.extend(f for f, _ in node.next_functions if f is not None)
        return found

    def _saved_by(self, node: Any, forward_cls: Any) -> list[tuple[torch.Tensor, str]]:
        paths = self._paths(forward_cls.compiled_fw)
        if paths is None:
            return []
        try:
            meta = forward_cls.metadata
            with_check = paths[meta.tensors_saved_for_backwards_with_vc_check_slice]
            no_check = paths[meta.tensors_saved_for_backwards_no_vc_check_slice]
            tensors = list(node.saved_tensors)
            unchecked = list(getattr(node, "_tensors_no_vc_check", []) or [])
        except (RuntimeError, AttributeError, TypeError):  # freed, or another torch layout
            return []
        pairs = (
            list(zip(tensors, with_check, strict=False)) if len(tensors) == len(with_check) else []
        )
        if len(unchecked) == len(no_check):
            pairs += zip(unchecked, no_check, strict=False)
        return [(t, p) for t, p in pairs if p is not None and isinstance(t, torch.Tensor)]

    def _paths(self, forward: Any) -> list[str | None] | None:
        """The modules of a compiled forward's outputs (None: not compiled while profiling)."""
        known = self._by_forward.get(id(forward))
        if known is not None and known[0]() is forward:
            return known[1]
        text = getattr(forward, "inductor_post_grad_graph_str", "") or ""
        returns = list(_RETURN.finditer(text))
        if not returns:
            return None
        names = tuple(n.strip() for n in returns[-1].group(1).split(","))  # the forward's
        signature = _SIGNATURE.search(text)
        inputs = set(_PARAMETER.findall(signature.group(1))) if signature else set()
        key = tuple(_INPUT if n in inputs else n for n in names if _NAME.match(n) and n != "None")
        paths = self._owners.get(key)
        if paths is None or len(paths) != len(names):
            return None  # unknown, ambiguous, or outputs that are not all nodes
        with contextlib.suppress(TypeError):  # not weakly referable: read again next time
            self._by_forward[id(forward)] = (weakref.ref(forward), paths)
        return paths


#: Dynamo's ``OptimizedModule`` class once dynamo is loaded (read on every module call).
_OPTIMIZED: tuple[type, ...] = ()


def _optimized_module() -> tuple[type, ...]:
    """Dynamo's ``OptimizedModule`` class, or nothing while dynamo is not loaded (no module can
    be one then; reading ``torch._dynamo`` would import it)."""
    global _OPTIMIZED
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    found = getattr(eval_frame, "OptimizedModule", None)
    if isinstance(found, type):
        _OPTIMIZED = (found,)
    return _OPTIMIZED


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` runs compiled (``torch.compile(module)`` or ``module.compile()``)."""
    return (
        isinstance(module, _OPTIMIZED or _optimized_module())
        or getattr(module, "_compiled_call_impl", None) is not None
    )


def compiled_inner(module: torch.nn.Module) -> torch.nn.Module:
    """The module whose code a compiled ``module`` runs (the graph's paths start there)."""
    if isinstance(module, _OPTIMIZED or _optimized_module()):
        inner = module._orig_mod
        return inner if isinstance(inner, torch.nn.Module) else module
    return module
