"""Frozen records that still read as the dicts they replaced.

A :class:`DictRecord` is a frozen dataclass whose instance is also a read-only ``dict`` of its
JSON form (:meth:`DictRecord.to_dict`): ``row.saving_pct`` and ``row["saving_pct"]`` give the
same value, ``json.dumps(row)`` writes the file format, and a record equals the dict it was
read from. Code that indexed the old dicts keeps working; code that changed them gets a
``TypeError`` (make a changed copy with ``dataclasses.replace``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NoReturn


class DictRecord(dict[str, Any]):
    """Base of a ``@dataclass(frozen=True, eq=False)`` record: its dict items are its
    :meth:`to_dict`, filled once when it is made. Equality and hashing are the dict's."""

    def to_dict(self) -> dict[str, Any]:
        """The record's JSON form (the keys of the file format)."""
        raise NotImplementedError

    def __post_init__(self) -> None:
        dict.update(self, self.to_dict())

    def _read_only(self) -> NoReturn:
        raise TypeError(
            f"{type(self).__name__} is read-only: make a changed copy with dataclasses.replace"
        )

    def __setitem__(self, key: str, value: Any) -> NoReturn:
        self._read_only()

    def __delitem__(self, key: str) -> NoReturn:
        self._read_only()

    def __ior__(self, other: Any) -> NoReturn:  # type: ignore[misc]
        self._read_only()

    def update(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._read_only()

    def pop(self, *args: Any) -> NoReturn:
        self._read_only()

    def popitem(self) -> NoReturn:
        self._read_only()

    def setdefault(self, *args: Any) -> NoReturn:
        self._read_only()

    def clear(self) -> NoReturn:
        self._read_only()

    def __reduce__(self) -> tuple[Any, ...]:
        """Copied and pickled by its fields (a dict's items would be set one by one)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return (_rebuild, (type(self), values))


def _rebuild(cls: type[DictRecord], values: dict[str, Any]) -> DictRecord:
    return cls(**values)
