"""Exactly-once bookkeeping per tag: which values are repeats, and which time range a gap fill must read.

Channels never replay, so after every (re)connect the values missed meanwhile are read back over REST.
For each tag pistream keeps its *floor*, the newest event time it has accepted, and the *recent* events:
those within ``lookback`` of the floor (at least the events at the floor itself). On connect, a tag waits
for its first live value (the channel's initial value, the current one); the gap to read back is then
``floor - lookback .. first live value``, both ends included. Gap values are accepted inside that window
unless they are recent events already known, or the live value at its end. The look-back recovers values a
server delivered late, out of order, and lost with the connection. Live values newer than the floor are
new; live values at or before it are dropped only if they repeat a recent event (older late values are
kept: they cannot be told from repeats).

The windows being read back go with every batch to the commit writer, which keeps them on disk
(``state``): a stop or a crash before their read ends must not lose them, since the live values after the
reconnect have moved the floors past them. The next start reopens them (``reopen``) and reads them again.

Limits: a repeat of an event older than ``lookback`` before the newest is written again; a second,
distinct event at a time already in the recent set that arrives only after a restart is taken as a repeat.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..pi.flow import GapRequest, GapRequests
from ..timeutil import TIMESTAMP_US
from .floors import Floors
from .opengaps import OpenGaps
from .schema import EVENT_KEY, TABLE_SCHEMA

# Recent events as columns (the state file's): the table's types, tag_webid as text.
RECENT_SCHEMA = pa.schema([TABLE_SCHEMA.field(name).with_nullable(True) for name in EVENT_KEY])
KNOWN_SCHEMA = pa.schema(list(RECENT_SCHEMA)[2:])

# An event's identity besides its tag: (timestamp_us, value, value_text, state_code, good, questionable,
# substituted, annotated). NaN is replaced so that a repeated NaN compares equal.
EventKey = tuple[Any, ...]


def event_key(ts_us: int, value: float | None, text: str | None, code: int | None, good: bool,
              questionable: bool, substituted: bool, annotated: bool) -> EventKey:
    if isinstance(value, float) and math.isnan(value):
        value = "NaN"  # type: ignore[assignment]
    return (ts_us, value, text, code, good, questionable, substituted, annotated)


# A window's events known already, as a tuple while they are few (the usual ~3 recent events, the one
# live value at its end): a tuple of 3 is 64 bytes, a frozenset 216, and a restart at 100,000 tags held two
# per tag. Many (an earlier run's gap reopened with the events the table holds in it) go in a frozenset.
SMALL_KEYS = 8
SMALL_SEEN = 16


def _keys(keys: Iterable[EventKey]) -> tuple[EventKey, ...] | frozenset[EventKey]:
    """``keys`` for membership tests only: a tuple while few (``SMALL_KEYS``), else a frozenset."""
    found = tuple(keys)
    return frozenset(found) if len(found) > SMALL_KEYS else found


@dataclass(slots=True)
class _Window:
    start_us: int
    known: tuple[EventKey, ...] | frozenset[EventKey]  # recent events at connect time: already in the table or buffer
    end_us: int | None = None
    end_keys: tuple[EventKey, ...] | frozenset[EventKey] = ()  # the first live values, at ``end_us``
    # More known events, still as the tag's rows of a connect's columns (``KnownRows``): they become keys
    # in ``known`` only when a page of the gap arrives (``prepare_gaps``). After a restart at 100,000 tags,
    # ~250,000 known events as key tuples were ~45 MB held until each gap was read. (The tag's rows are
    # found by its id when needed: two row numbers per window were another 8 MB.)
    known_rows: KnownRows | None = None


@dataclass(frozen=True, slots=True)
class KnownRows:
    """Events as columns, sorted by tag id (``ids``): the pending rows of the tags a connect made wait."""

    ids: np.ndarray
    ts: np.ndarray
    data: pa.Table  # EVENT_KEY[2:] columns

    def rows_of(self, tag_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows of these tags, tag after tag, and how many each has."""
        low = np.searchsorted(self.ids, tag_ids, "left")
        counts = np.searchsorted(self.ids, tag_ids, "right") - low
        starts = np.repeat(low - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return np.arange(int(counts.sum())) + starts, counts

    def keys(self, rows: np.ndarray) -> list[EventKey]:
        """The event keys of these rows, NaN made equal to itself."""
        columns = [self.data.column(name).take(pa.array(rows)).to_pylist() for name in EVENT_KEY[2:]]
        keys = []
        for key in zip(self.ts[rows].tolist(), *columns, strict=True):
            if key[1] != key[1]:
                key = (key[0], "NaN", *key[2:])
            keys.append(key)
        return keys


@dataclass
class RecentRows:
    """Accepted events not yet sorted into ``EventFilter.recent``: the steady-state path records them in
    bulk (table columns, at least EVENT_KEY) and they are turned into keys only when a key lookup needs
    them, or when the state file is written."""

    ids: np.ndarray  # int32 tag id per row, as given by the buffer's TagIndex
    ts: np.ndarray  # int64 microseconds per row
    data: pa.RecordBatch | pa.Table

    def __len__(self) -> int:
        return len(self.ts)

    def where(self, chosen: np.ndarray) -> RecentRows:
        """The rows where ``chosen`` (a bool per row) is set, copied."""
        return RecentRows(self.ids[chosen], self.ts[chosen], self.data.filter(pa.array(chosen)))


def _marked(marks: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``marks`` (a bool by tag id) with ``ids`` set, grown by doubling if an id is past its end."""
    if len(ids):
        need = int(ids.max()) + 1
        if len(marks) < need:
            grown = np.zeros(max(need, 2 * len(marks), 1024), np.bool_)
            grown[:len(marks)] = marks
            marks = grown
        marks[ids] = True
    return marks


def recent_chunks(rows: list[RecentRows], lookback_us: int, floors: np.ndarray | None = None) -> list[RecentRows]:
    """The chunks of ``rows`` that hold a row within ``lookback_us`` of its tag's floor (``floors`` by tag
    id; else the newest of the rows, which a floor is at least): the only ones that can still hold recent
    events. Chunks are kept or dropped whole: a kept chunk's older rows are filtered out by every reader of
    them (``sync_recent``, the state file's load), which costs less than copying rows out of millions of
    pending ones at every flush (at 100 values/s per tag that copy was ~40 % of taking a batch in)."""
    rows = [r for r in rows if len(r)]
    if not rows:
        return []
    newest = floors
    if newest is None:
        ids = np.concatenate([r.ids for r in rows])
        newest = np.full(int(ids.max()) + 1, np.iinfo(np.int64).min, np.int64)
        np.maximum.at(newest, ids, np.concatenate([r.ts for r in rows]))
    return [r for r in rows if bool((r.ts >= newest[r.ids] - lookback_us).any())]


def _table(data: pa.RecordBatch | pa.Table) -> pa.Table:
    return pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data


def drop_older(recent: list[EventKey], horizon: int) -> None:
    """Remove the events before ``horizon`` from the front of a tag's time-ordered recent events."""
    if recent and recent[0][0] < horizon:
        drop = 1
        while drop < len(recent) and recent[drop][0] < horizon:
            drop += 1
        del recent[:drop]


def event_keys_of(rows: RecentRows, keep: np.ndarray) -> Iterator[tuple[str, EventKey]]:
    """Rows ``keep`` of rows accepted in bulk as (webid, event key), NaN made equal to itself."""
    data = rows.data.take(pa.array(keep))
    columns = [data.column(name).to_pylist() for name in EVENT_KEY[2:]]
    for webid, *key in zip(data.column("tag_webid").to_pylist(), rows.ts[keep].tolist(), *columns, strict=True):
        if key[1] != key[1]:
            key[1] = "NaN"
        yield webid, tuple(key)


def same_events(a: pa.Table, b: pa.Table) -> np.ndarray:
    """Row by row, whether ``a``'s and ``b``'s events (EVENT_KEY[2:] columns) are equal as event keys: nulls
    equal nulls, NaN equals NaN."""
    same = np.ones(a.num_rows, np.bool_)
    for name in EVENT_KEY[2:]:
        x, y = a.column(name), b.column(name)
        equal = pc.or_(pc.fill_null(pc.equal(x, y), False), pc.and_(pc.is_null(x), pc.is_null(y)))
        if pa.types.is_floating(x.type):
            equal = pc.or_(equal, pc.fill_null(pc.and_(pc.is_nan(x), pc.is_nan(y)), False))
        same &= equal.to_numpy(zero_copy_only=False)
    return same


def _known_events(known: KnownRows, ids: np.ndarray, ts: np.ndarray, events: pa.Table) -> np.ndarray:
    """A mark per row (tag ids ``ids``, times ``ts``, ``events`` in KNOWN_SCHEMA): it is one of its tag's
    events in ``known``. Rows meet their tag's known rows at the same time by a join; only those pairs are
    compared whole."""
    found = np.zeros(len(ids), np.bool_)
    taken, _ = known.rows_of(np.unique(ids).astype(np.int64))
    if not len(taken) or not len(ids):
        return found
    left = pa.table({"id": ids.astype(np.int64), "ts": ts, "row": np.arange(len(ids))})
    right = pa.table({"id": known.ids[taken].astype(np.int64), "ts": known.ts[taken], "known": taken})
    pairs = left.join(right, ["id", "ts"], join_type="inner")
    if pairs.num_rows:
        rows, others = pairs.column("row").to_numpy(), pairs.column("known").to_numpy()
        same = same_events(events.take(pa.array(rows)), known.data.take(pa.array(others)))
        found[rows[same]] = True
    return found


def _repeated_rows(ids: np.ndarray, ts: np.ndarray, data: pa.RecordBatch | pa.Table, keep: np.ndarray
                   ) -> np.ndarray:
    """A mark per row: among the rows ``keep``, a repeat of an earlier one (same tag, same event). Only
    rows sharing their tag and time with another become keys (events at one time are few)."""
    repeated = np.zeros(len(ids), np.bool_)
    kept = np.flatnonzero(keep)
    if len(kept) < 2:
        return repeated
    order = kept[np.lexsort((ts[kept], ids[kept]))]  # by tag, then time; stable
    same = (ids[order][1:] == ids[order][:-1]) & (ts[order][1:] == ts[order][:-1])
    if not same.any():
        return repeated
    shared = np.zeros(len(order), np.bool_)
    shared[1:] |= same
    shared[:-1] |= same
    rows = order[shared]
    seen: set[tuple[int, EventKey]] = set()
    for row, (_, event) in zip(rows.tolist(), event_keys_of(RecentRows(ids, ts, data), rows), strict=True):
        identity = (int(ids[row]), event)
        if identity in seen:
            repeated[row] = True
        else:
            seen.add(identity)
    return repeated


class _CompactWindows:
    """At most one window per tag as arrays by tag id: the windows a connect opens and the bulk path's first
    values close, for tags with no recent events as keys. After a restart at 100,000 tags that is every
    tag, and a ``_Window`` object per tag (with its times and dict entries) was ~25 MB until each gap was
    read; here 21 bytes a tag. A tag's window becomes a ``_Window`` in the filter's dicts
    (``EventFilter._take_compact``) as soon as anything but the bulk path looks at it: a page of its gap, a
    value by value step."""

    AWAITING, CLOSED = 1, 2

    def __init__(self) -> None:
        self.state = np.zeros(0, np.int8)  # 0 none, AWAITING its first live value, CLOSED: being read back
        self.start_us = np.zeros(0, np.int64)
        self.end_us = np.zeros(0, np.int64)
        self.known = np.zeros(0, np.int32)  # into known_sets, -1 for none
        self.known_sets: list[KnownRows | None] = []
        self.known_refs: list[int] = []  # windows per known set: a set no window refers to is let go
        self.awaiting = 0
        self.closed = 0

    def __len__(self) -> int:
        return self.awaiting + self.closed

    def grow(self, need: int) -> None:
        have = len(self.state)
        if have >= need:
            return
        size = max(need, 2 * have, 1024)
        for name, fill in (("state", 0), ("start_us", 0), ("end_us", 0), ("known", -1)):
            old = getattr(self, name)
            new = np.full(size, fill, old.dtype)
            new[:have] = old
            setattr(self, name, new)

    def state_of(self, tag_id: int | None) -> int:
        if tag_id is None or tag_id >= len(self.state):
            return 0
        return int(self.state[tag_id])

    def set_known(self, tag_ids: np.ndarray, rows: KnownRows | None) -> None:
        """These tags' windows know ``rows`` (columns sorted by tag id), instead of what they knew."""
        self._unref(tag_ids)
        if rows is None or not len(tag_ids):
            return
        self.known_sets.append(rows)
        self.known_refs.append(len(tag_ids))
        self.known[tag_ids] = len(self.known_sets) - 1

    def _unref(self, tag_ids: np.ndarray) -> None:
        old = self.known[tag_ids]
        old = old[old >= 0]
        if len(old):
            for index, count in zip(*np.unique(old, return_counts=True), strict=True):
                self.known_refs[index] -= int(count)
                if not self.known_refs[index]:
                    self.known_sets[index] = None
        self.known[tag_ids] = -1

    def clear(self, tag_ids: np.ndarray) -> None:
        """These tags' windows are gone (or taken as objects)."""
        states = self.state[tag_ids]
        self.awaiting -= int((states == self.AWAITING).sum())
        self.closed -= int((states == self.CLOSED).sum())
        self.state[tag_ids] = 0
        self._unref(tag_ids)


@dataclass
class FilterStats:
    repeats_dropped: int = 0
    late_accepted: int = 0
    gap_outside_window: int = 0


@dataclass
class EventFilter:
    """Per-tag floors, recent events and gap windows; owned by the flusher, persisted by the state store."""

    lookback_us: int = 0
    floors: Floors = field(default_factory=Floors)
    # Lists, not deques: a deque is ~600 bytes even when it holds 2 events, and there is one per tag.
    recent: dict[str, list[EventKey]] = field(default_factory=dict)
    _awaiting: dict[str, _Window] = field(default_factory=dict)
    # A tag's window, or its windows if it reconnected while a gap was being read (a list per tag for the
    # usual one window was ~90 bytes a tag after a restart at 100,000 tags): see ``_windows_of``.
    _windows: dict[str, _Window | list[_Window]] = field(default_factory=dict)
    # While a tag has open windows: every event accepted inside them, so that overlapping windows (a
    # reconnect while an earlier gap is still being read) cannot both let the same event in. A tuple while
    # few (``SMALL_SEEN``), then a set: a restart at 100,000 tags has one per tag, mostly of 1-10 events
    # (a set of 1 is 216 bytes, of 8 728, of 16 1,240; a tuple 48, 104 and 168).
    _seen: dict[str, tuple[EventKey, ...] | set[EventKey]] = field(default_factory=dict)
    # The windows of ``_windows`` as the gaps each batch takes along to the commit writer, made again only
    # after a window opened or closed.
    _open: OpenGaps | None = None
    stats: FilterStats = field(default_factory=FilterStats)
    # Accepted in bulk, not yet in ``recent``; ``sync_recent`` sorts them in before any key lookup.
    _pending: list[RecentRows] = field(default_factory=list)
    _pending_rows: int = 0
    # A mark by tag id for tags that may have rows in ``_pending``: a tag's value-by-value step sorts in
    # only the marked tags it needs (``sync_recent(ids)``), not every tag's.
    _unsynced: np.ndarray = field(default_factory=lambda: np.zeros(0, np.bool_))
    _prune_at: int = 1 << 16
    _awaiting_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.bool_))  # awaiting, by tag id
    _compact: _CompactWindows = field(default_factory=_CompactWindows)

    def copy(self) -> EventFilter:
        """Floors and recent events only (no windows): the flusher starts from the committed state. Rows
        accepted in bulk (and those of the state file) stay columns, shared: they are never changed."""
        copied = EventFilter(self.lookback_us, self.floors.copy(), {w: list(k) for w, k in self.recent.items()})
        copied._pending, copied._pending_rows = list(self._pending), self._pending_rows
        copied._unsynced = self._unsynced.copy()
        return copied

    def merge(self, floors: Floors, recent: list[RecentRows]) -> None:
        """Take over a committed batch's floors (of the streams it touched) and its newest rows."""
        self.floors.update_from(floors)
        foreign = floors.tags is not self.floors.tags  # tag ids of another registry (tests build filters apart)
        for rows in recent:
            if foreign and len(rows):
                webids = _table(rows.data).column("tag_webid").to_pylist()
                rows = RecentRows(np.fromiter(map(self.floors.tags.add, webids), np.int32, len(webids)), rows.ts,
                                  rows.data)
            self.add_recent(rows)

    # -- events accepted in bulk ----------------------------------------------------------------------
    def add_recent(self, rows: RecentRows) -> None:
        """Record events accepted in bulk (their floors are set by the caller); kept as columns, bounded
        by dropping rows that fell out of the look-back whenever they have doubled."""
        self._pending.append(rows)
        self._pending_rows += len(rows)
        if len(rows):
            self._mark_unsynced(rows.ids)
        if self._pending_rows > self._prune_at:
            self.prune_pending()

    def prune_pending(self, floors: np.ndarray | None = None) -> None:
        """Drop pending chunks that fell out of the look-back (``floors`` by tag id, if the caller has them)."""
        self._pending = recent_chunks(self._pending, self.lookback_us, floors)
        self._pending_rows = sum(map(len, self._pending))
        self._prune_at = max(1 << 16, 2 * self._pending_rows)

    def forget_recent(self) -> None:
        """Drop every recent event (the floors stay): for input that cannot repeat an event (history pages
        read with a cursor), whose rows must not stay alive in memory as recent events after a commit."""
        self._pending, self._pending_rows = [], 0
        self._unsynced[:] = False
        self.recent.clear()

    def recent_parts(self) -> list[tuple[np.ndarray, pa.Table]]:
        """Every tag's recent events as tag ids and columns (EVENT_KEY but tag_webid), for the state file,
        without a Python object per event nor a text per event's tag (the state file refers to its tags by
        position; at 100,000 tags the tags of ~500,000 recent events as text were ~25 MB for a moment at
        each save): the rows accepted in bulk are pruned in columns, and the events already in ``recent``
        that fell out of the look-back are dropped on the way."""
        self.forget_old_events()
        keys: list[EventKey] = []
        ids: list[int] = []
        tag_ids = self.floors.tags.ids  # looked up only: the writer's thread saves (-1: not registered)
        for webid, events in self.recent.items():
            keys.extend(events)
            ids.extend([tag_ids.get(webid, -1)] * len(events))
        columns: list[Any] = list(zip(*keys, strict=True)) if keys else [() for _ in EVENT_KEY[1:]]
        value = [float("nan") if v == "NaN" else v for v in columns[1]]
        schema = pa.schema(list(RECENT_SCHEMA)[1:])
        listed = pa.table([pa.array(columns[0], pa.int64()).cast(TIMESTAMP_US), pa.array(value, pa.float64()),
                           *(pa.array(c, RECENT_SCHEMA.field(n).type)
                             for n, c in zip(EVENT_KEY[3:], columns[2:], strict=True))], schema=schema)
        self.prune_pending()
        return [(np.array(ids, np.int32), listed)] + [
            (rows.ids, _table(rows.data).select(list(EVENT_KEY[1:])).cast(schema)) for rows in self._pending]

    def forget_old_events(self) -> None:
        """Drop the recent events that fell out of the look-back, and the tags left with none. Events reach
        ``recent`` in bulk (a reconnect sorts every pending row in) and leave only when their tag moves value
        by value, so without this sweep the flusher kept every tag's startup events for good (100,000 tags:
        ~100k lists of stale events, tens of MB)."""
        lookback, floors = self.lookback_us, self.floors
        dropped = 0
        for webid in list(self.recent):
            events = self.recent[webid]
            drop_older(events, floors.get(webid, -(2**63)) - lookback)
            if not events:
                del self.recent[webid]
                dropped += 1
        if dropped > len(self.recent):  # most tags left: a dict keeps the table of its largest size
            self.recent = dict(self.recent)

    def _mark_unsynced(self, ids: np.ndarray) -> None:
        self._unsynced = _marked(self._unsynced, ids)

    def unsynced(self, tag_id: int) -> bool:
        """Whether the tag may have rows accepted in bulk that ``recent`` does not hold yet."""
        return tag_id < len(self._unsynced) and bool(self._unsynced[tag_id])

    def sync_recent(self, ids: np.ndarray | None = None) -> None:
        """Sort the rows accepted in bulk into ``recent`` (each tag's are in time order already): every
        tag's, or only those of the tag ids ``ids``, whose rows leave the pending chunks (copied without
        them). A value-by-value step needs only its own tags': after a restart at 100,000 tags, sorting
        every tag's pending rows in at each such step (the first live value of each tag) turned ~200,000
        rows into key tuples each time, the restart's peak of memory."""
        if not self._pending:
            return
        if ids is None:
            pending, self._pending, self._pending_rows = self._pending, [], 0
            self._unsynced[:] = False
        else:
            wanted = np.zeros(len(self._unsynced), np.bool_)
            ids = ids[ids < len(wanted)]
            wanted[ids] = self._unsynced[ids]
            if not wanted.any():
                return
            self._unsynced[wanted] = False
            pending, rest = [], []
            for rows in self._pending:
                chosen = wanted[rows.ids]
                if not chosen.any():
                    rest.append(rows)
                elif chosen.all():
                    pending.append(rows)
                else:
                    pending.append(rows.where(chosen))
                    rest.append(rows.where(~chosen))
            self._pending, self._pending_rows = rest, sum(map(len, rest))
        lookback = self.lookback_us
        recent_of = self.recent
        for rows in pending:
            floors = self.floors.of(rows.data.column("tag_webid").to_pylist())
            keep = np.flatnonzero(rows.ts >= floors - lookback)
            horizons = (floors[keep] - lookback).tolist()
            for horizon, (webid, key) in zip(horizons, event_keys_of(rows, keep), strict=True):
                recent = recent_of.get(webid)
                if recent is None:
                    recent = recent_of[webid] = []
                drop_older(recent, horizon)
                recent.append(key)

    # -- connections and gaps -------------------------------------------------------------------------
    def connected(self, webids: list[str]) -> None:
        """A channel (re)connected: its tags with a known floor wait for their first live value, knowing
        their recent events. Only these tags' pending rows are looked at: sorting every pending row in (all
        tags', several Python objects per event) made each connect at startup hold every tag's first
        events as objects until the next commit (~600,000 at 100,000 tags), and left pymalloc that much
        larger for good."""
        floors = self.floors
        waiting = [webid for webid in webids if floors.get(webid) is not None]
        if not waiting:
            return
        ids = np.fromiter(map(floors.tags.ids.__getitem__, waiting), np.int64, len(waiting))
        rows = self._pending_known(ids) if self._pending else None
        counts = rows.rows_of(ids)[1] if rows is not None else np.zeros(len(waiting), np.int64)
        starts = self.floors.array()[ids] - self.lookback_us
        compact = self._compact
        compact.grow(len(self.floors.tags))
        # Tags with recent events as keys, or with windows as objects already: as objects (rare)
        plain = np.fromiter((bool(self.recent.get(webid)) or webid in self._windows or webid in self._awaiting
                             for webid in waiting), np.bool_, len(waiting))
        plain |= compact.state[ids] == _CompactWindows.CLOSED
        for i in np.flatnonzero(plain).tolist():
            webid = waiting[i]
            self._take_compact(webid)
            window = _Window(int(starts[i]), _keys(self.recent.get(webid, ())))
            if counts[i]:
                window.known_rows = rows
            self._awaiting[webid] = window
        chosen = ~plain
        if chosen.any():
            tag_ids = ids[chosen]
            compact.clear(tag_ids)  # an awaiting window of an earlier connect is replaced
            compact.state[tag_ids] = _CompactWindows.AWAITING
            compact.start_us[tag_ids] = starts[chosen]
            compact.set_known(ids[chosen & (counts > 0)], rows)
            compact.awaiting += len(tag_ids)
        self._awaiting_ids = _marked(self._awaiting_ids, ids)

    def _pending_known(self, ids: np.ndarray) -> KnownRows | None:
        """The pending rows of tags ``ids`` within the look-back of their floors, as columns sorted by tag
        id (each tag's in time order), left pending."""
        wanted = np.zeros(len(self.floors.tags), np.bool_)
        wanted[ids] = True
        floors = self.floors.array()
        parts: list[tuple[np.ndarray, np.ndarray, pa.Table]] = []
        for rows in self._pending:
            chosen = wanted[rows.ids]
            chosen[chosen] = rows.ts[chosen] >= floors[rows.ids[chosen]] - self.lookback_us
            if chosen.any():
                data = _table(rows.data).filter(pa.array(chosen)).select(list(EVENT_KEY[2:]))
                parts.append((rows.ids[chosen], rows.ts[chosen], data.cast(KNOWN_SCHEMA)))
        if not parts:
            return None
        all_ids = np.concatenate([p[0] for p in parts])
        order = np.argsort(all_ids, kind="stable")
        data = pa.concat_tables([p[2] for p in parts]).take(pa.array(order))
        return KnownRows(all_ids[order], np.concatenate([p[1] for p in parts])[order], data)

    def prepare_gaps(self, webids: Iterable[str]) -> None:
        """Turn the known events of these tags' windows into keys, for a page of their gaps: one pass
        over each connect's columns instead of one per tag."""
        by_rows: dict[int, tuple[list[_Window], list[int]]] = {}
        tag_ids = self.floors.tags.ids
        for webid in webids:
            self._take_compact(webid)
            for window in self._windows_of(webid):
                if window.known_rows is not None:
                    windows, ids = by_rows.setdefault(id(window.known_rows), ([], []))
                    windows.append(window)
                    ids.append(tag_ids[webid])
        for windows, ids in by_rows.values():
            rows = windows[0].known_rows
            assert rows is not None
            taken, counts = rows.rows_of(np.array(ids, np.int64))
            keys = iter(rows.keys(taken))
            for window, count in zip(windows, counts.tolist(), strict=True):
                window.known = _keys([*window.known, *(next(keys) for _ in range(count))])
                window.known_rows = None

    def first_live(self, webid: str, keys: list[EventKey]) -> GapRequest | None:
        """The first live values of a waiting tag close its gap window; returns what to read back."""
        self._take_compact(webid)
        window = self._awaiting.pop(webid, None)
        if window is None or not keys:
            return None
        self._awaiting_ids[self.floors.tags.ids[webid]] = False
        end_us = min(k[0] for k in keys)
        window.end_us = end_us
        window.end_keys = _keys(k for k in keys if k[0] == end_us)
        if end_us < window.start_us:
            self._forget_seen(webid)
            return None
        self._add_window(webid, window)
        return GapRequest(webid, window.start_us, end_us)

    def first_values(self, firsts: KnownRows) -> GapRequests:
        """The first live values of awaiting tags, taken in bulk (one row per tag, sorted by tag id, each
        newer than its floor): each closes its tag's window at its time, as ``first_live`` does, and joins
        the window's known events as columns (it is in the buffer), instead of being remembered as a key.
        Compact windows stay compact."""
        webids = self.floors.tags.webids
        compact = self._compact
        self._awaiting_ids[firsts.ids] = False
        in_compact = np.zeros(len(firsts.ids), np.bool_)
        inside = firsts.ids < len(compact.state)
        in_compact[inside] = compact.state[firsts.ids[inside]] == _CompactWindows.AWAITING
        closing: list[tuple[int, _Window]] = []
        for row in np.flatnonzero(~in_compact).tolist():  # windows as objects (rare)
            webid = webids[int(firsts.ids[row])]
            window = self._awaiting.pop(webid)
            window.end_us = int(firsts.ts[row])
            if window.end_us < window.start_us:
                self._forget_seen(webid)
                continue
            closing.append((row, window))
            self._add_window(webid, window)
        rows = np.flatnonzero(in_compact)
        tag_ids = firsts.ids[rows]
        empty = firsts.ts[rows] < compact.start_us[tag_ids]  # the first value is older than the window
        if empty.any():
            compact.clear(tag_ids[empty])
            for tag_id in tag_ids[empty].tolist():
                self._forget_seen(webids[tag_id])
            rows, tag_ids = rows[~empty], tag_ids[~empty]
        if len(rows):
            compact.state[tag_ids] = _CompactWindows.CLOSED
            compact.end_us[tag_ids] = firsts.ts[rows]
            compact.awaiting -= len(rows)
            compact.closed += len(rows)
            self._open = None
        if not closing and not len(rows):
            return GapRequests()
        # Each closing window's known columns so far, and its first value, in one KnownRows for all
        olds: list[tuple[int, KnownRows]] = [(row, w.known_rows) for row, w in closing if w.known_rows is not None]
        old_sets = compact.known[tag_ids]
        for row, index in zip(rows.tolist(), old_sets.tolist(), strict=True):
            known_set = compact.known_sets[index] if index >= 0 else None
            if known_set is not None:
                olds.append((row, known_set))
        chosen = np.sort(np.concatenate([np.array([row for row, _ in closing], np.int64), rows]))
        known = self._joined_known(olds, firsts, chosen)
        for _, window in closing:
            window.known_rows = known
        if len(rows):
            compact.set_known(tag_ids, known)
        requests = GapRequests()
        for row in chosen.tolist():
            tag_id = int(firsts.ids[row])
            webid = webids[tag_id]
            start = int(compact.start_us[tag_id]) if compact.state_of(tag_id) == _CompactWindows.CLOSED else None
            if start is None:
                start = self._windows_of(webid)[-1].start_us
            requests.webids.append(webid)
            requests.start_us.append(start)
            requests.end_us.append(int(firsts.ts[row]))
        return requests

    @staticmethod
    def _joined_known(olds: list[tuple[int, KnownRows]], firsts: KnownRows, chosen: np.ndarray) -> KnownRows:
        """The known rows so far of each closing window (with its row in ``firsts``) and rows ``chosen`` of
        ``firsts``, in one ``KnownRows`` sorted by tag id."""
        parts: list[tuple[np.ndarray, np.ndarray, pa.Table]] = []
        by_rows: dict[int, tuple[KnownRows, list[int]]] = {}
        for row, known_rows in olds:
            by_rows.setdefault(id(known_rows), (known_rows, []))[1].append(row)
        for rows, firsts_rows in by_rows.values():
            taken = rows.rows_of(firsts.ids[np.array(firsts_rows)])[0]
            parts.append((rows.ids[taken], rows.ts[taken], rows.data.take(pa.array(taken))))
        parts.append((firsts.ids[chosen], firsts.ts[chosen], firsts.data.take(pa.array(chosen))))
        ids = np.concatenate([p[0] for p in parts])
        order = np.argsort(ids, kind="stable")
        return KnownRows(ids[order], np.concatenate([p[1] for p in parts])[order],
                         pa.concat_tables([p[2] for p in parts]).take(pa.array(order)))

    def _take_compact(self, webid: str) -> None:
        """The tag's compact window, if any, as a ``_Window`` in the dicts (before anything looks at it)."""
        compact = self._compact
        if not len(compact):
            return
        tag_id = self.floors.tags.ids.get(webid)
        state = compact.state_of(tag_id)
        if not state:
            return
        assert tag_id is not None
        index = int(compact.known[tag_id])
        window = _Window(int(compact.start_us[tag_id]), (),
                         known_rows=compact.known_sets[index] if index >= 0 else None)
        if state == _CompactWindows.CLOSED:
            window.end_us = int(compact.end_us[tag_id])
        compact.clear(np.array([tag_id]))
        if window.end_us is None:
            self._awaiting[webid] = window
        else:
            self._add_window(webid, window)

    def _windows_of(self, webid: str) -> list[_Window] | tuple[_Window, ...]:
        found = self._windows.get(webid)
        if found is None:
            return ()
        return (found,) if isinstance(found, _Window) else found

    def _add_window(self, webid: str, window: _Window) -> None:
        self._open = None
        found = self._windows.get(webid)
        if found is None:
            self._windows[webid] = window
        elif isinstance(found, _Window):
            self._windows[webid] = [found, window]
        else:
            found.append(window)

    def _compact_state(self, webid: str) -> int:
        return self._compact.state_of(self.floors.tags.ids.get(webid)) if len(self._compact) else 0

    def awaiting(self, webid: str) -> bool:
        return webid in self._awaiting or self._compact_state(webid) == _CompactWindows.AWAITING

    def awaiting_tags(self) -> int:
        return len(self._awaiting) + self._compact.awaiting

    def awaiting_rows(self, ids: np.ndarray) -> np.ndarray:
        """A mark per row of tag ids ``ids``: its tag awaits its first live value since a connect."""
        marks = self._awaiting_ids
        inside = ids < len(marks)
        if inside.all():
            return marks[ids]
        found = np.zeros(len(ids), np.bool_)
        found[inside] = marks[ids[inside]]
        return found

    def any_awaiting(self, webids: list[str]) -> bool:
        """Whether one of these tags still waits for its first live value since a connect. A tag whose gap
        is being read back does not count: its floor is at or past the end of each of its windows (the
        first live value closed the window and was accepted, or was a known event at most the floor), so
        its live values newer than the floor are outside every window and need no window bookkeeping."""
        if self._awaiting and not self._awaiting.keys().isdisjoint(webids):
            return True
        return bool(self._compact.awaiting) and any(self._compact_state(w) == _CompactWindows.AWAITING
                                                    for w in webids)

    def any_window(self, webids: list[str]) -> bool:
        """Whether one of these tags waits for its first live value or has a gap being read back."""
        if not (self._awaiting.keys().isdisjoint(webids) and self._windows.keys().isdisjoint(webids)):
            return True
        return bool(len(self._compact)) and any(map(self._compact_state, webids))

    def in_gap(self, webid: str) -> bool:
        """Waiting for its first live value, or with a gap being read back: the careful path applies."""
        return webid in self._awaiting or webid in self._windows or bool(self._compact_state(webid))

    def accept_gap(self, webid: str, key: EventKey) -> bool:
        """A recorded value read back for a gap: inside its window and not an event known already."""
        ts = key[0]
        self._take_compact(webid)
        for window in self._windows_of(webid):
            assert window.end_us is not None
            if not window.start_us <= ts <= window.end_us:
                continue
            if window.known_rows is not None:
                self.prepare_gaps([webid])
            if key in window.known or key in self._seen.get(webid, ()) or (
                    ts == window.end_us and key in window.end_keys):
                self.stats.repeats_dropped += 1
                return False
            return True
        self.stats.gap_outside_window += 1
        return False

    def gap_done(self, request: GapRequest) -> None:
        self._take_compact(request.webid)
        left = [w for w in self._windows_of(request.webid)
                if (w.start_us, w.end_us) != (request.start_us, request.end_us)]
        if not left:
            self._windows.pop(request.webid, None)
        else:
            self._windows[request.webid] = left[0] if len(left) == 1 else left
        self._open = None
        self._forget_seen(request.webid)
        if not self._windows or not len(self._compact):
            self._let_go()

    def gaps_done(self, requests: Iterable[GapRequest]) -> None:
        """``gap_done`` for each; a compact window (``compact_gap_rows``) ends as arrays, never an object."""
        compact = self._compact
        ended: list[int] = []
        tag_ids = self.floors.tags.ids
        for request in requests:
            tag_id = tag_ids.get(request.webid) if len(compact) else None
            if (tag_id is not None and compact.state_of(tag_id) == _CompactWindows.CLOSED
                    and compact.start_us[tag_id] == request.start_us and compact.end_us[tag_id] == request.end_us):
                ended.append(tag_id)
            else:
                self.gap_done(request)
        if ended:
            compact.clear(np.array(ended, np.int64))
            self._open = None
            if self._seen:
                webids = self.floors.tags.webids
                for tag_id in ended:
                    self._forget_seen(webids[tag_id])
            self._let_go()

    def compact_gap_rows(self, ids: np.ndarray) -> np.ndarray:
        """A mark per row of tag ids ``ids``: its tag has one window, compact and being read back, with no
        event remembered inside it: ``accept_gap_rows`` decides such rows."""
        compact = self._compact
        found = np.zeros(len(ids), np.bool_)
        if not compact.closed:
            return found
        inside = ids < len(compact.state)
        found[inside] = compact.state[ids[inside]] == _CompactWindows.CLOSED
        if self._seen and found.any():  # a window as an object before, whose events are still remembered
            webids = self.floors.tags.webids
            remembered = [t for t in np.unique(ids[found]).tolist() if webids[t] in self._seen]
            if remembered:
                found &= ~np.isin(ids, remembered)
        return found

    def accept_gap_rows(self, ids: np.ndarray, ts: np.ndarray, data: pa.RecordBatch | pa.Table) -> np.ndarray:
        """``accept_gap`` as arrays for rows of ``compact_gap_rows`` (tag ids, times, at least the EVENT_KEY
        columns): a mark per row it lets in. Inside the window, not one of its known events (the connect's
        recent events and the first live value), not an earlier row again. Nothing is remembered as a key
        (``_seen``): the window is its tag's only one, its pages do not repeat an event (each stream's
        cursor), and the caller adds the rows within the look-back to the pending ones, which a reconnect's
        window knows (it starts at the floor's look-back, so older rows are outside it). What that gives up:
        a late live value that repeats a gap event older than the look-back is written again, the module's
        stated limit for any live value (value by value, ``_seen`` caught it while the gap was open, at the
        price of a key per gap value held until the gap's end: ~1.25 M after a restart at 100,000 tags)."""
        compact = self._compact
        inside = (ts >= compact.start_us[ids]) & (ts <= compact.end_us[ids])
        self.stats.gap_outside_window += int(np.count_nonzero(~inside))
        keep = inside.copy()
        sets = compact.known[ids]
        with_known = inside & (sets >= 0)
        if with_known.any():
            events = _table(data).select(list(EVENT_KEY[2:])).cast(KNOWN_SCHEMA)
            for index in np.unique(sets[with_known]).tolist():
                known = compact.known_sets[index]
                assert known is not None
                rows = np.flatnonzero(with_known & (sets == index))
                keep[rows[_known_events(known, ids[rows], ts[rows], events.take(pa.array(rows)))]] = False
        keep &= ~_repeated_rows(ids, ts, data, keep)
        self.stats.repeats_dropped += int(np.count_nonzero(inside)) - int(np.count_nonzero(keep))
        return keep

    def _let_go(self) -> None:
        """Fresh containers for the gap bookkeeping once no gap is open: a dict or set keeps the table of its
        largest size when emptied (after a restart at 100,000 tags, ~4-5 MB each for good)."""
        if not self._windows:
            self._windows = {}
        if not self._awaiting:
            self._awaiting = {}
        if not self._seen:
            self._seen = {}
        if not len(self._compact) and len(self._compact.state):
            self._compact = _CompactWindows()

    def _forget_seen(self, webid: str) -> None:
        if webid not in self._windows and webid not in self._awaiting and not self._compact_state(webid):
            self._seen.pop(webid, None)

    def open_gaps(self) -> int:
        return len(self._windows) + len(self._awaiting) + len(self._compact)

    def open_windows(self) -> OpenGaps:
        """The gaps being read back now. Their tags' floors may be past them already (the live values
        after a reconnect), so these must outlive a stop or a crash; tags still awaiting their first live
        value need not: their floors have not moved."""
        if self._open is None:
            tags = self.floors.tags
            rows = [(tags.add(webid), w.start_us, w.end_us) for webid in self._windows for w in self._windows_of(webid)]
            table = np.array(rows, np.int64).reshape(-1, 3)
            ids, start, end = table[:, 0].astype(np.int32), table[:, 1], table[:, 2]
            compact = np.flatnonzero(self._compact.state == _CompactWindows.CLOSED)
            if len(compact):
                ids = np.concatenate([ids, compact.astype(np.int32)])
                start = np.concatenate([start, self._compact.start_us[compact]])
                end = np.concatenate([end, self._compact.end_us[compact]])
            self._open = OpenGaps.sorted(tags, ids, start, end)
        return self._open

    def reopen(self, request: GapRequest, known: Iterable[EventKey]) -> None:
        """A gap left open by an earlier run, to read again: ``known`` are the events the table holds in
        it already (its end, pages read before the stop), so the read adds only what is missing."""
        window = _Window(request.start_us, _keys(known), request.end_us)
        self._take_compact(request.webid)
        self._add_window(request.webid, window)

    # -- live values ----------------------------------------------------------------------------------
    def accept_live(self, webid: str, key: EventKey) -> bool:
        """A live value at or before the floor is a repeat if it is a recent event."""
        floor = self.floors.get(webid)
        if floor is None or key[0] > floor:
            return True
        self.sync_tag(webid)
        if key in self.recent.get(webid, ()) or key in self._seen.get(webid, ()):
            self.stats.repeats_dropped += 1
            return False
        if key[0] < floor - self.lookback_us:
            self.stats.late_accepted += 1
        return True

    def sync_tag(self, webid: str) -> None:
        """This tag's pending rows into ``recent``: before a lookup of its recent events."""
        if self._pending:
            tag_id = self.floors.tags.get(webid)
            if tag_id is not None and self.unsynced(tag_id):
                self.sync_recent(np.array([tag_id]))

    def advance(self, webid: str, key: EventKey) -> None:
        """Record an accepted event: it may raise the tag's floor; it joins the recent events.

        The tag's pending rows are not sorted in first: only lookups need them (``accept_live``, the steady
        path). Appended now, the key may come before pending rows older than it, so ``recent`` is out of
        time order for a while, which only keeps an event there a little longer. Gap values never need
        pending rows either: those are never inside a window (rows from before the connect are in its
        known events; after it, the bulk path takes no value of a tag awaiting its first live value, and
        only values newer than its floor, at or past the window's end). After a restart at 100,000 tags,
        sorting every tag's pending rows in at each page of gap values (~200,000 rows into key tuples) was
        most of the gap read's CPU, and ~1 M objects."""
        floor = self.floors.get(webid)
        ts = key[0]
        recent = self.recent.get(webid)
        if recent is None:
            recent = self.recent[webid] = []
        if floor is None or ts > floor:
            self.floors[webid] = floor = ts
            drop_older(recent, floor - self.lookback_us)
            if self.lookback_us == 0:
                recent.clear()
        if ts >= floor - self.lookback_us:
            recent.append(key)
        # Events accepted while a window is open or awaiting its end may be read back by it again.
        self._take_compact(webid)
        waiting = self._awaiting.get(webid)
        windows = self._windows_of(webid)
        if (waiting is not None and ts >= waiting.start_us) or any(
                w.start_us <= ts <= (w.end_us or ts) for w in windows):
            self._remember(webid, key)

    def _remember(self, webid: str, key: EventKey) -> None:
        """Add ``key`` to the tag's events accepted inside its windows."""
        seen = self._seen.get(webid, ())
        if isinstance(seen, set):
            seen.add(key)
        elif key not in seen:
            self._seen[webid] = (*seen, key) if len(seen) < SMALL_SEEN else {*seen, key}


def advance_from_rows(target: EventFilter, data: pa.Table | pa.RecordBatch) -> EventFilter:
    """Raise ``target``'s floors by table rows (at least the EVENT_KEY columns): each tag's newest events,
    and those within the look-back. Used for the committed floors after each commit, and to rebuild them
    from the table itself.
    """
    if data.num_rows == 0:
        return target
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    data = data.select(list(EVENT_KEY))
    newest = data.group_by("tag_webid").aggregate([("timestamp", "max")])
    joined = data.join(newest, keys="tag_webid", join_type="inner")
    ts = pc.cast(joined["timestamp"], pa.int64())
    horizon = pc.subtract(pc.cast(joined["timestamp_max"], pa.int64()), target.lookback_us)
    joined = joined.filter(pc.greater_equal(ts, horizon))
    for webid, key in row_keys(joined.sort_by([("timestamp", "ascending")])):
        target.advance(webid, key)
    return target


def row_keys(data: pa.Table) -> list[tuple[str, EventKey]]:
    """Each row's tag_webid and event key (``data`` has at least the EVENT_KEY columns)."""
    ts = pc.cast(data["timestamp"], pa.int64()).to_pylist()
    columns = [data[c].to_pylist() for c in EVENT_KEY[2:]]
    return [(webid, event_key(*key)) for webid, *key in zip(data["tag_webid"].to_pylist(), ts, *columns,
                                                            strict=True)]
