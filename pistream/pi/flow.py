"""What travels from the readers and the gap filler to the flusher, in order, over one bounded channel."""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass

import trio

from .messages import StreamSetMessage, StreamValues


@dataclass(frozen=True, slots=True)
class GapRequest:
    """Read back ``webid``'s recorded values from ``start_us`` to ``end_us`` (both included). Slots: after a
    restart there is one per tag (and one ``_Window``), 100,000 of each at 100,000 tags."""

    webid: str
    start_us: int
    end_us: int


class GapRequests:
    """Gaps to read back as columns, one row each: a restart opens one per tag at once, and 100,000
    ``GapRequest`` objects were ~14 MB until each was read; the gap filler makes the objects a group of
    calls at a time (``GapRequests.take``)."""

    __slots__ = ("webids", "start_us", "end_us")

    def __init__(self, requests: Iterable[GapRequest] = ()) -> None:
        self.webids: list[str] = []
        self.start_us = array("q")
        self.end_us = array("q")
        for request in requests:
            self.append(request)

    @classmethod
    def of_columns(cls, webids: list[str], start_us: Iterable[int], end_us: Iterable[int]) -> GapRequests:
        gaps = cls()
        gaps.webids, gaps.start_us, gaps.end_us = webids, array("q", start_us), array("q", end_us)
        return gaps

    def append(self, request: GapRequest) -> None:
        self.webids.append(request.webid)
        self.start_us.append(request.start_us)
        self.end_us.append(request.end_us)

    def extend(self, other: GapRequests) -> None:
        self.webids.extend(other.webids)
        self.start_us.extend(other.start_us)
        self.end_us.extend(other.end_us)

    def __len__(self) -> int:
        return len(self.webids)

    def __getitem__(self, row: int) -> GapRequest:
        return GapRequest(self.webids[row], self.start_us[row], self.end_us[row])

    def __iter__(self) -> Iterator[GapRequest]:
        return map(GapRequest, self.webids, self.start_us, self.end_us)

    def take(self, rows: Iterable[int]) -> list[GapRequest]:
        return [self[row] for row in rows]

    def __eq__(self, other: object) -> bool:
        """Equal to a list, or to other columns, of the same requests in the same order."""
        if not isinstance(other, GapRequests | list):
            return NotImplemented
        return list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # changes as rows are added


@dataclass(frozen=True, slots=True)
class Live:
    """A channel message, stamped with when it was received (us since the epoch): decoded, or still the
    frame's text when the C frame codec will read it straight into columns (``columns.extract_frames``)."""

    received_us: int
    message: StreamSetMessage | None
    frame: str | bytes | None = None
    channel: str = ""


@dataclass(frozen=True, slots=True)
class LiveBatch:
    """The live messages one socket read brought in whole, in order: one queue slot and one hand-over for
    all of them (a reader waiting for room once per frame cost more than the frame's values)."""

    messages: list[Live]


@dataclass(frozen=True, slots=True)
class Connected:
    """A channel (re)connected for these streams: what it missed must be read back."""

    webids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GapValues:
    """Recorded values read back over REST for a gap: ``streams`` decoded by msgspec, or ``columns`` where
    the codec read the page (``pages.PageColumns.take``: the stream side's columns). ``taken`` is set once
    the flusher has taken them in: the gap filler keeps only a few pages ahead of it."""

    received_us: int
    streams: list[StreamValues]
    taken: trio.Event | None = None
    columns: Sized | None = None


@dataclass(frozen=True, slots=True)
class GapDone:
    """Every recorded value of these gaps has been sent (or reported lost): their windows close."""

    requests: tuple[GapRequest, ...]


Incoming = Live | LiveBatch | Connected | GapValues | GapDone
