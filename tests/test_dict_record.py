"""Typed records that replaced dicts (issue #28) still read as those dicts, and only read.

GIVEN a frozen dataclass built on :class:`memprof.dict_record.DictRecord` WHEN it is indexed,
serialised, compared, copied or changed THEN it behaves as the read-only dict of its
``to_dict()``: same keys and values, same JSON, equal to that dict, a TypeError on any change.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from typing import Any

import pytest

from memprof.dict_record import DictRecord


@dataclasses.dataclass(frozen=True, eq=False)
class _Row(DictRecord):
    name: str
    sizes: list[int]
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "sizes": self.sizes, "total": sum(self.sizes)}
        if self.note is not None:
            out["note"] = self.note
        return out


def test_a_record_is_the_dict_of_its_json_form() -> None:
    row = _Row("a", [1, 2, 3])
    assert dict(row) == {"name": "a", "sizes": [1, 2, 3], "total": 6}
    assert row["total"] == 6 and row.get("note") is None and "note" not in row
    assert json.loads(json.dumps(row)) == row.to_dict()
    assert row == {"name": "a", "sizes": [1, 2, 3], "total": 6}
    assert row != _Row("a", [1, 2, 4])


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r.__setitem__("name", "b"),
        lambda r: r.__delitem__("name"),
        lambda r: r.update(name="b"),
        lambda r: r.pop("name"),
        lambda r: r.popitem(),
        lambda r: r.setdefault("other", 1),
        lambda r: r.clear(),
        lambda r: r.__ior__({"name": "b"}),
    ],
)
def test_a_record_cannot_be_changed_in_place(change: Any) -> None:
    row = _Row("a", [1])
    with pytest.raises(TypeError, match="_Row is read-only"):
        change(row)
    assert dict(row) == {"name": "a", "sizes": [1], "total": 1}


def test_a_changed_copy_copies_and_pickles_keep_the_record_and_its_dict() -> None:
    row = _Row("a", [1, 2])
    changed = dataclasses.replace(row, note="x")
    assert changed["note"] == changed.note == "x" and "note" not in row
    for again in (copy.copy(changed), copy.deepcopy(changed), pickle.loads(pickle.dumps(changed))):
        assert type(again) is _Row and again == changed and again.sizes == [1, 2]
