"""Storages tracked before the events backend started recording, watched for their death.

The CPU allocator reports the free only of a block it saw allocated while recording: a
gradient made before the profile and dropped inside it (``zero_grad(set_to_none=True)``)
would stay in the ledger until malloc happened to reuse its address (#25). Each such storage
gets a weak reference (never keeping it alive) whose callback only notes its address; the
next marker the events backend places ends the ledger entry there (:func:`end_prior`).

The rule that keeps a free from being applied twice: an end applies only while the ledger
still holds *the entry that was tracked at the start* at that address. Where the allocator
did report the free (CUDA reports every free), the replay already removed that entry, and a
new storage at the same address is another entry object: the end then changes nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch

from memprof.tracking.ledger import Entry, StorageLedger, storage_tensor


class _PriorRef(weakref.ref):  # type: ignore[type-arg,unused-ignore]
    """A weak reference to a storage that remembers its address and its ledger entry."""

    __slots__ = ("entry", "ptr")
    ptr: int
    entry: Entry


class PriorStorages:
    """Weak references to the storages the ledger tracked before recording started."""

    def __init__(self, ledger: StorageLedger) -> None:
        self.ledger = ledger
        self._refs: dict[int, _PriorRef] = {}
        #: ``(address, entry)`` of watched storages that died since the last marker took them.
        self.died: list[tuple[int, Entry]] = []

    def watch(self, tensors: Iterable[Any]) -> None:
        """Watch the storages of ``tensors`` that the ledger tracks by address now."""
        entries = self.ledger.entries
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor):
                continue
            for part in self.ledger.parts(tensor):
                storage = storage_tensor(part).untyped_storage()
                ptr = storage.data_ptr()
                entry = entries.get(ptr)
                if not ptr or entry is None or ptr in self._refs:
                    continue
                ref = _PriorRef(storage, self._on_death)
                ref.ptr, ref.entry = ptr, entry
                self._refs[ptr] = ref

    def _on_death(self, ref: _PriorRef) -> None:
        # Only a note: this may run inside any code (the marker's own bookkeeping included).
        if self._refs.get(ref.ptr) is ref:
            del self._refs[ref.ptr]
        self.died.append((ref.ptr, ref.entry))

    def take(self) -> list[tuple[int, Entry]]:
        """The deaths noted since the last call (the caller places their ends)."""
        died = self.died
        self.died = []
        return died

    def clear(self) -> None:
        """Stop watching (no callback runs after this)."""
        self._refs.clear()
        self.died = []

    def __len__(self) -> int:
        return len(self._refs)


def end_prior(ledger: StorageLedger, ptr: int, entry: Entry) -> None:
    """End the ledger's entry at ``ptr`` if it is still ``entry`` (see the module docstring)."""
    if ledger.entries.get(ptr) is entry:
        ledger.free(ptr)
