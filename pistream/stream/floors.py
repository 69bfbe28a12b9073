"""Per-tag floors as one array by tag id, with the tag ids shared by everything that keeps per-tag state.

At 100,000 tags a ``dict[str, int]`` of floors held 7.4 MB (the dict and an int object per tag), and the
pipeline kept three: the flusher's, the committed ones, and each batch's on its way to the commit. Here a
``TagIds`` registry gives each webId a small integer once, the tag index of the buffer and every ``Floors``
share it, and a ``Floors`` is an int64 array (0.8 MB) that the bulk path reads and raises directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping
from typing import TypeVar, overload

import numpy as np

_T = TypeVar("_T")
NO_FLOOR = -(2**63)  # no floor known (no real timestamp is this old)


class TagIds:
    """webId -> small integer id, assigned once and never changed. Ids are added by one thread at a time
    (the flusher's); other threads only look up, so the list grows before the dict names the id."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.webids: list[str] = []

    def __len__(self) -> int:
        return len(self.webids)

    def get(self, webid: str) -> int | None:
        return self.ids.get(webid)

    def add(self, webid: str) -> int:
        known = self.ids.get(webid)
        if known is not None:
            return known
        n = len(self.webids)
        self.webids.append(webid)
        self.ids[webid] = n
        return n


class Floors(MutableMapping[str, int]):
    """Each tag's floor (newest accepted event time, µs), a mapping by webId over an array by tag id."""

    def __init__(self, tags: TagIds | None = None, values: np.ndarray | None = None) -> None:
        self.tags = tags if tags is not None else TagIds()
        # Room for more ids than registered, grown by doubling: tags added one by one stay linear.
        self._values = values if values is not None else np.full(0, NO_FLOOR, np.int64)

    def array(self) -> np.ndarray:
        """The floors by tag id, one per registered tag (NO_FLOOR where none): a view to read and write."""
        need = len(self.tags)
        have = len(self._values)
        if have < need:
            grown = np.full(max(need, 2 * have, 1024), NO_FLOOR, np.int64)
            grown[:have] = self._values
            self._values = grown
        return self._values[:need]

    def _id(self, webid: str) -> int | None:
        tag_id = self.tags.get(webid)
        if tag_id is None or tag_id >= len(self._values) or self._values[tag_id] == NO_FLOOR:
            return None
        return tag_id

    @overload
    def get(self, webid: str, /) -> int | None: ...
    @overload
    def get(self, webid: str, default: int, /) -> int: ...
    @overload
    def get(self, webid: str, default: _T, /) -> int | _T: ...

    def get(self, webid: str, default: object = None, /) -> object:
        """Without the KeyError of the Mapping's own ``get``: it runs per stream on the value-by-value path."""
        tag_id = self._id(webid)
        return default if tag_id is None else int(self._values[tag_id])

    def __getitem__(self, webid: str) -> int:
        tag_id = self._id(webid)
        if tag_id is None:
            raise KeyError(webid)
        return int(self._values[tag_id])

    def __setitem__(self, webid: str, floor: int) -> None:
        tag_id = self.tags.add(webid)
        self.array()[tag_id] = floor

    def __delitem__(self, webid: str) -> None:
        tag_id = self._id(webid)
        if tag_id is None:
            raise KeyError(webid)
        self._values[tag_id] = NO_FLOOR

    def present(self) -> np.ndarray:
        """The ids of the tags with a floor, ascending (the order of ``columns``)."""
        return np.flatnonzero(self.array() != NO_FLOOR)

    def __iter__(self) -> Iterator[str]:
        webids = self.tags.webids
        return iter([webids[i] for i in self.present().tolist()])

    def __len__(self) -> int:
        return int(np.count_nonzero(self.array() != NO_FLOOR))

    def __repr__(self) -> str:
        return f"Floors({dict(self.items())!r})"

    def columns(self) -> tuple[list[str], np.ndarray]:
        """The tags with a floor and their floors, for the state file."""
        present = self.present()
        webids = self.tags.webids
        return [webids[i] for i in present.tolist()], self.array()[present]

    def of(self, webids: list[str]) -> np.ndarray:
        """The floors of these tags (each has one), in bulk."""
        return self.array()[np.fromiter(map(self.tags.ids.__getitem__, webids), np.int64, len(webids))]

    def lowest(self) -> int | None:
        floors = self.array()
        floors = floors[floors != NO_FLOOR]
        return int(floors.min()) if len(floors) else None

    def set_many(self, webids: Iterable[str], floors: Iterable[int] | np.ndarray) -> None:
        ids = np.fromiter(map(self.tags.add, webids), np.int64)
        self.array()[ids] = floors if isinstance(floors, np.ndarray) else np.fromiter(floors, np.int64, len(ids))

    def only(self, ids: np.ndarray) -> Floors:
        """A copy with the floors of these tag ids (or marked ids) only: a batch's, of the tags it touched."""
        floors = self.array()
        values = np.full(len(floors), NO_FLOOR, np.int64)
        values[ids] = floors[ids]
        return Floors(self.tags, values)

    def copy(self) -> Floors:
        return Floors(self.tags, self.array().copy())

    def update_from(self, other: Floors) -> None:
        """Take over ``other``'s floors where it has one (``dict.update``)."""
        if other.tags is not self.tags:  # another registry (tests build filters apart): by webId
            self.set_many(*other.columns())
            return
        theirs = other.array()
        mine = self.array()
        given = theirs != NO_FLOOR
        mine[:len(theirs)][given] = theirs[given]
