"""What travels from the readers and the gap filler to the flusher, in order, over one bounded channel."""

from __future__ import annotations

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
    """Recorded values read back over REST for a gap. ``taken`` is set once the flusher has taken them in:
    the gap filler keeps only a few pages ahead of it (a page is ~60,000 Python objects until then)."""

    received_us: int
    streams: list[StreamValues]
    taken: trio.Event | None = None


@dataclass(frozen=True, slots=True)
class GapDone:
    """Every recorded value of these gaps has been sent (or reported lost): their windows close."""

    requests: tuple[GapRequest, ...]


Incoming = Live | LiveBatch | Connected | GapValues | GapDone
