"""Exactly-once bookkeeping per tag: which values are repeats, and which time range a gap fill must read.

Channels never replay, so after every (re)connect the values missed meanwhile are read back over REST.
For each tag pistream keeps its *floor*, the newest event time it has accepted, with the keys of the
event(s) at that time. On connect a tag waits for its first live value (the channel's initial value, the
current one); the gap is then ``floor .. first live value``, both ends included, and gap values are
accepted only inside it and only if they are not the events already known at either end. Live values
newer than the floor are new; live values at or before it are dropped only if they repeat the known
events at the floor (out-of-order late values are kept).

Limits: a repeat of an *older* value than the tag's newest (not only of the newest) would be written
again; a second, distinct event at exactly the floor time arriving after a restart is taken as a repeat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .schema import EVENT_KEY

# An event's identity besides its tag: (timestamp_us, value, value_text, state_code, good, questionable,
# substituted, annotated). NaN is replaced so that a repeated NaN compares equal.
EventKey = tuple[Any, ...]


def event_key(ts_us: int, value: float | None, text: str | None, code: int | None, good: bool,
              questionable: bool, substituted: bool, annotated: bool) -> EventKey:
    if isinstance(value, float) and math.isnan(value):
        value = "NaN"  # type: ignore[assignment]
    return (ts_us, value, text, code, good, questionable, substituted, annotated)


@dataclass(frozen=True)
class GapRequest:
    """Read back ``webid``'s recorded values from ``start_us`` to ``end_us`` (both included)."""

    webid: str
    start_us: int
    end_us: int


@dataclass
class _Window:
    start_us: int
    start_keys: frozenset[EventKey]
    end_us: int | None = None
    end_keys: frozenset[EventKey] = frozenset()


@dataclass
class FilterStats:
    repeats_dropped: int = 0
    late_accepted: int = 0
    gap_outside_window: int = 0


@dataclass
class EventFilter:
    """Per-tag floors and gap windows; owned by the flusher, persisted by the state store."""

    floors: dict[str, int] = field(default_factory=dict)
    floor_keys: dict[str, set[EventKey]] = field(default_factory=dict)
    _awaiting: dict[str, _Window] = field(default_factory=dict)
    _windows: dict[str, list[_Window]] = field(default_factory=dict)  # several if it reconnected again
    stats: FilterStats = field(default_factory=FilterStats)

    # -- connections and gaps -------------------------------------------------------------------------
    def connected(self, webids: list[str]) -> None:
        """A channel (re)connected: its tags with a known floor wait for their first live value."""
        for webid in webids:
            floor = self.floors.get(webid)
            if floor is not None:
                self._awaiting[webid] = _Window(floor, frozenset(self.floor_keys.get(webid, ())))

    def first_live(self, webid: str, keys: list[EventKey]) -> GapRequest | None:
        """The first live values of a waiting tag close its gap window; returns what to read back."""
        window = self._awaiting.pop(webid, None)
        if window is None or not keys:
            return None
        end_us = min(k[0] for k in keys)
        window.end_us = end_us
        window.end_keys = frozenset(k for k in keys if k[0] == end_us)
        if end_us < window.start_us:
            return None
        self._windows.setdefault(webid, []).append(window)
        return GapRequest(webid, window.start_us, end_us)

    def awaiting(self, webid: str) -> bool:
        return webid in self._awaiting

    def accept_gap(self, webid: str, key: EventKey) -> bool:
        """A recorded value read back for a gap: inside the window and not an event known at its ends."""
        ts = key[0]
        for window in self._windows.get(webid, ()):
            assert window.end_us is not None
            if not window.start_us <= ts <= window.end_us:
                continue
            if (ts == window.start_us and key in window.start_keys) or (
                    ts == window.end_us and key in window.end_keys):
                self.stats.repeats_dropped += 1
                return False
            return True
        self.stats.gap_outside_window += 1
        return False

    def gap_done(self, request: GapRequest) -> None:
        windows = self._windows.get(request.webid, [])
        windows[:] = [w for w in windows if (w.start_us, w.end_us) != (request.start_us, request.end_us)]
        if not windows:
            self._windows.pop(request.webid, None)

    def open_gaps(self) -> int:
        return len(self._windows) + len(self._awaiting)

    # -- live values ----------------------------------------------------------------------------------
    def accept_live(self, webid: str, key: EventKey) -> bool:
        """A live value at or before the floor is a repeat if it is an event known at the floor."""
        floor = self.floors.get(webid)
        if floor is None or key[0] > floor:
            return True
        if key in self.floor_keys.get(webid, ()):
            self.stats.repeats_dropped += 1
            return False
        if key[0] < floor:
            self.stats.late_accepted += 1
        return True

    def advance(self, webid: str, key: EventKey) -> None:
        """Record an accepted event: it may raise the tag's floor."""
        floor = self.floors.get(webid)
        ts = key[0]
        if floor is None or ts > floor:
            self.floors[webid] = ts
            self.floor_keys[webid] = {key}
        elif ts == floor:
            self.floor_keys.setdefault(webid, set()).add(key)


def advance_from_rows(target: EventFilter, data: pa.Table | pa.RecordBatch) -> EventFilter:
    """Raise ``target``'s floors by table rows (at least the EVENT_KEY columns): each tag's newest events.

    Used for the committed floors after each commit, and to rebuild them from the table itself.
    """
    if data.num_rows == 0:
        return target
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    data = data.select(list(EVENT_KEY))
    newest = data.group_by("tag_webid").aggregate([("timestamp", "max")])
    joined = data.join(newest, keys=["tag_webid", "timestamp"], right_keys=["tag_webid", "timestamp_max"],
                       join_type="inner")
    ts = pc.cast(joined["timestamp"], pa.int64()).to_pylist()
    columns = [joined[c].to_pylist() for c in EVENT_KEY[2:]]
    for i, webid in enumerate(joined["tag_webid"].to_pylist()):
        target.advance(webid, event_key(ts[i], *(col[i] for col in columns)))
    return target
