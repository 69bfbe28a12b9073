"""The gaps being read back at one moment, as columns: what each batch takes along to the commit writer and
what the open-gaps file holds.

After a restart every tag has a gap open. As a frozenset of ``GapRequest`` per batch (the flusher's, the
one queued to the writer, the writer's last and the union it saves) that was ~4 MB a set at 100,000 tags,
plus a request object per gap kept alive by them (~14 MB); as three arrays it is 20 bytes a gap.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..pi.flow import GapRequest
from .floors import TagIds


@dataclass(frozen=True, eq=False)
class OpenGaps:
    """Gaps as rows (tag id, start, end), sorted and without repeats, so that equal sets have equal arrays."""

    tags: TagIds  # the registry the ids belong to
    ids: np.ndarray  # int32
    start_us: np.ndarray  # int64, first microsecond to read back (included)
    end_us: np.ndarray  # int64, last microsecond (included)

    @classmethod
    def empty(cls, tags: TagIds | None = None) -> OpenGaps:
        return cls(tags if tags is not None else TagIds(), np.zeros(0, np.int32), np.zeros(0, np.int64),
                   np.zeros(0, np.int64))

    @classmethod
    def of(cls, requests: Iterable[GapRequest], tags: TagIds | None = None) -> OpenGaps:
        """From requests (a restored file, tests); their tags are registered in ``tags``."""
        tags = tags if tags is not None else TagIds()
        rows = [(tags.add(r.webid), r.start_us, r.end_us) for r in requests]
        if not rows:
            return cls.empty(tags)
        ids, start, end = zip(*rows, strict=True)
        return cls.sorted(tags, np.array(ids, np.int32), np.array(start, np.int64), np.array(end, np.int64))

    @classmethod
    def sorted(cls, tags: TagIds, ids: np.ndarray, start_us: np.ndarray, end_us: np.ndarray) -> OpenGaps:
        """Rows in any order, repeats allowed: made canonical."""
        order = np.lexsort((end_us, start_us, ids))
        ids, start_us, end_us = ids[order], start_us[order], end_us[order]
        if len(ids) > 1:
            new = np.ones(len(ids), bool)
            new[1:] = (ids[1:] != ids[:-1]) | (start_us[1:] != start_us[:-1]) | (end_us[1:] != end_us[:-1])
            if not new.all():
                ids, start_us, end_us = ids[new], start_us[new], end_us[new]
        return cls(tags, ids, start_us, end_us)

    def __len__(self) -> int:
        return len(self.ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OpenGaps):
            return NotImplemented
        if other.tags is not self.tags:
            return self.requests() == other.requests()
        return (np.array_equal(self.ids, other.ids) and np.array_equal(self.start_us, other.start_us)
                and np.array_equal(self.end_us, other.end_us))

    __hash__ = None  # type: ignore[assignment]  # mutable registry inside; never a key

    def __or__(self, other: OpenGaps) -> OpenGaps:
        """Both sets' gaps (what the writer saves before a commit that may or may not land)."""
        if not len(other) or other == self:
            return self
        if not len(self):
            return other
        if other.tags is not self.tags:  # another registry (tests build filters apart): by webId
            return OpenGaps.of(self.requests() | other.requests(), self.tags)
        return OpenGaps.sorted(self.tags, np.concatenate([self.ids, other.ids]),
                               np.concatenate([self.start_us, other.start_us]),
                               np.concatenate([self.end_us, other.end_us]))

    def webids(self) -> list[str]:
        names = self.tags.webids
        return [names[i] for i in self.ids.tolist()]

    def requests(self) -> set[GapRequest]:
        return {GapRequest(w, s, e) for w, s, e in
                zip(self.webids(), self.start_us.tolist(), self.end_us.tolist(), strict=True)}
