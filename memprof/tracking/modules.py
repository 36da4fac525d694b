"""Module identity: qualified names, the hierarchy, and which module owns which parameter."""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from memprof.tracking.distributed import sharded_parameters
from memprof.tracking.ledger import (
    BUFFER,
    GRADIENT,
    OUTSIDE,
    PARAMETER,
    StorageLedger,
    keep_out_of_dynamo,
)


@dataclass
class ModuleInfo:
    """What memprof knows about one module (index = position in ModuleRegistry.infos)."""

    name: str
    type: str
    depth: int
    parent: int | None
    ancestors: frozenset[int]
    peak_forward: int = 0
    peak_backward: int = 0
    forward_calls: int = 0
    recompute_calls: int = 0
    forward_time_s: float = 0.0
    children: dict[int, str] = field(default_factory=dict)  # id(child module) -> attribute name
    geometry: dict[str, Any] | None = None  # shapes of its first forward (see module_geometry)


def module_geometry(module: nn.Module, args: Any, output: Any) -> dict[str, Any]:
    """The shapes of one forward call (its first input and output tensors) and, for
    convolutions, the layer's kernel, stride, padding, dilation and groups: what a prediction
    needs to size a layer's work buffers."""
    geometry: dict[str, Any] = {}
    for key, value in (("input", args), ("output", output)):
        tensor = _first_tensor(value)
        if tensor is not None:
            with contextlib.suppress(TypeError, RuntimeError):  # symbolic sizes
                geometry[key] = [int(d) for d in tensor.shape]
    # its own parameters' bytes, shared ones included: the ``parameter`` column charges a tied
    # weight to its first owner only, but a per-layer technique acts on it from every user
    storages = {}
    for param in module.parameters(recurse=False):
        with contextlib.suppress(RuntimeError, TypeError, NotImplementedError):
            storages[_storage_key(param)] = int(param.untyped_storage().nbytes())
    if storages:
        geometry["parameter_bytes"] = sum(storages.values())
    if isinstance(module, nn.modules.conv._ConvNd):
        padding = module.padding
        geometry.update(
            kernel_size=list(module.kernel_size),
            stride=list(module.stride),
            padding=padding if isinstance(padding, str) else list(padding),
            dilation=list(module.dilation),
            groups=int(module.groups),
        )
    return geometry


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(value, dict):  # Hugging Face outputs are dicts too
        return _first_tensor(list(value.values()))
    return None


class ModuleRegistry:
    """Gives every module that runs an index, a qualified name and its parameters' storages.

    Modules are held weakly. A model passed to :func:`memprof.profile` is the root ``""``;
    without one, the first module to run becomes the root and any later unrelated module a
    root of its own, named after its type.
    """

    def __init__(self, ledger: StorageLedger) -> None:
        self.ledger = ledger
        self.index: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
        self.infos: list[ModuleInfo] = [
            ModuleInfo(name="", type="", depth=-1, parent=None, ancestors=frozenset())
        ]  # index 0: outside any module
        # Tensors compare elementwise, so they are keyed by identity.
        self.param_owner: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.by_name: dict[str, int] = {}
        self.grad_hooks: list[torch.utils.hooks.RemovableHandle] = []
        #: Changes whenever :attr:`param_owner` does (a cache of owners checks it).
        self.owners_version = 0
        self._root_names: set[str] = set()
        #: index -> the module it was registered for (weakly): a module built anew at each call
        #: (a loss made inside forward) takes over the row of its dead predecessor of the name
        self._holder: dict[int, weakref.ref[nn.Module]] = {}
        #: Where gradient hooks report (the profiler's backend-aware hook), if set: the owner
        #: and the parameter. Set before the first registration: a parameter's hook is then
        #: the sink itself, with its owner bound (one Python call per gradient).
        self.grad_sink: Callable[[int, torch.Tensor], None] | None = None
        #: Set by the events backend once it runs: the ledger lags behind the live hooks there,
        #: so registering a module's tensors becomes a deferred call, applied in time order
        #: (after the allocation events of tensors made inside the profile, such as a model
        #: built in a script that ``memprof run`` profiles).
        self.defer: Callable[..., None] | None = None

    def index_of(self, module: nn.Module, parent: int) -> int:
        """The index of ``module``, registering it (and its subtree) the first time it runs."""
        idx = self.index.get(module)
        if idx is not None:
            return idx
        if parent != OUTSIDE:
            info = self.infos[parent]
            name = info.children.get(id(module))
            if name is not None:
                prefix = f"{info.name}." if info.name else ""
                return self.register_tree(module, prefix + name, parent)
        return self.register_tree(module, self._root_name(module), None)

    def _root_name(self, module: nn.Module) -> str:
        base = "" if not self._root_names else type(module).__name__
        name, n = base, 1
        while name in self._root_names:
            if self._vacant(name, module):
                return name  # the same module path in a later step: the same row
            n += 1
            name = f"{base}#{n}"
        return name

    def _vacant(self, name: str, module: nn.Module) -> bool:
        """Whether the row ``name`` belonged to a module of this type that no longer exists."""
        idx = self.by_name.get(name)
        if idx is None or self.infos[idx].type != type(module).__name__:
            return False
        holder = self._holder.get(idx)
        return holder is not None and holder() is None

    def register_tree(self, root: nn.Module, name: str, parent: int | None) -> int:
        """Register ``root`` as ``name`` and all its submodules, with their parameters."""
        if parent is None:
            self._root_names.add(name)
        root_idx = self._register_one(root, name, parent)
        for child_name, child in root.named_modules(prefix=name, remove_duplicate=True):
            if child is root or child in self.index:
                continue
            parent_name = child_name.rsplit(".", 1)[0] if "." in child_name else ""
            self._register_one(child, child_name, self.by_name.get(parent_name, root_idx))
        return root_idx

    def _register_one(self, module: nn.Module, name: str, parent: int | None) -> int:
        if self._vacant(name, module):
            idx = self.by_name[name]
            self._holder[idx] = weakref.ref(module)
            self.index[module] = idx
            self.infos[idx].children = {id(c): n for n, c in module.named_children()}
            self._register_tensors(module, idx)
            return idx
        idx = self.ledger.new_module()
        depth = 0 if parent is None else self.infos[parent].depth + 1
        ancestors = frozenset() if parent is None else self.infos[parent].ancestors | {parent}
        info = ModuleInfo(
            name=name, type=type(module).__name__, depth=depth, parent=parent, ancestors=ancestors
        )
        info.children = {id(child): child_name for child_name, child in module.named_children()}
        self.infos.append(info)
        self.by_name.setdefault(name, idx)
        assert len(self.infos) - 1 == idx
        self.index[module] = idx
        self._holder[idx] = weakref.ref(module)
        self._register_tensors(module, idx)
        return idx

    def _register_tensors(self, module: nn.Module, idx: int) -> None:
        for param in module.parameters(recurse=False):
            self._register_param(param, idx)
        for param in sharded_parameters(module):  # FSDP2's, also while the module holds its
            self._register_param(param, idx)  # gathered ones (after a forward, no backward)
        for buffer in module.buffers(recurse=False):
            if buffer is not None:
                for part in self.ledger.facts(buffer.detach()):  # one, unless sparse
                    if self.defer is not None:
                        self.defer(self.ledger.track, part, BUFFER, idx)
                    else:
                        self.ledger.track(part, BUFFER, idx)

    def _register_param(self, param: nn.Parameter, idx: int) -> None:
        if param in self.param_owner:
            return  # tied: counted once, under its first owner
        self.owners_version += 1
        if self.defer is not None:
            self.param_owner[param] = idx
            grads = [] if param.grad is None else self.ledger.facts(param.grad)
            for part in self.ledger.facts(param.detach()):  # one, unless sparse
                self.defer(self._param_apply, part, grads, idx)
                grads = []
        else:
            entry = self.ledger.lookup(param)
            if entry is not None and entry.category == PARAMETER:
                self.param_owner[param] = entry.module  # another tensor sharing the storage
                return
            self.param_owner[param] = idx
            grads = [] if param.grad is None else self.ledger.facts(param.grad)
            for part in self.ledger.parts(param):  # no detach: a fake one would dispatch
                self._param_apply(part, grads, idx)
                grads = []
        if param.requires_grad:  # (its owner is idx for good: bound, not looked up per step)
            hook = functools.partial(self.grad_sink or self._on_grad, idx)
            self.grad_hooks.append(param.register_post_accumulate_grad_hook(hook))

    def _param_apply(self, param: Any, grads: list[Any], idx: int) -> None:
        """Track a parameter's storage (and its gradient's), unless a parameter already owns
        it."""
        entry = self.ledger.lookup(param)
        if entry is not None and entry.category == PARAMETER and entry.module != idx:
            return  # another tensor sharing the storage: counted once
        self.ledger.track(param, PARAMETER, idx)
        for grad in grads:
            self.ledger.track(grad, GRADIENT, idx)

    def _on_grad(self, owner: int, param: torch.Tensor) -> None:
        """A gradient was accumulated into ``param.grad``; ``owner`` is the module that owns
        ``param`` (what :attr:`param_owner` says)."""
        if self.grad_sink is not None:
            self.grad_sink(owner, param)
            return
        ledger = self.ledger
        if not ledger.recording or param.grad is None:
            return
        for part in ledger.parts(param.grad):
            ledger.track(part, GRADIENT, owner)

    def remove_hooks(self) -> None:
        for handle in self.grad_hooks:
            handle.remove()
        self.grad_hooks.clear()


keep_out_of_dynamo(ModuleRegistry._on_grad)


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    """A key equal for tensors sharing a storage: its address, or for storages without one
    (fake, meta, empty) the storage object's identity (a fake storage's address warns)."""
    from torch._subclasses.fake_tensor import FakeTensor

    storage = tensor.untyped_storage()
    if isinstance(tensor, FakeTensor) or tensor.is_meta or storage.data_ptr() == 0:
        return (0, id(storage))
    return (storage.data_ptr(), 0)
