"""The columnar buffer: values as Arrow columns, handed over as one Table per flush. Every value passes
the exactly-once filter (``dedup``) on the way in.

Two paths: batches of channel messages in the steady state (every value newer than its tag's floor, in
order, no gap open) become columns in bulk (``columns.extract_frames`` with the C codec, else
``columns.extract`` on msgspec) and pass the filter as arrays; anything else goes value by value into
plain column lists, with the same decisions either way. Values of streams that tag resolution did not
describe (no channel of this process subscribed to them) are dropped on either path and counted
(``unsubscribed``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import compress, repeat
from operator import attrgetter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import structlog

from ..pi.flow import GapRequest, GapRequests, Live
from ..pi.messages import (
    FRAME_ERRORS,
    StreamSetMessage,
    StreamValues,
    TimedValue,
    channel_decoder,
    classify_value,
    flag,
)
from ..timeutil import TIMESTAMP_US, to_us
from .columns import FRAME_CODEC, LiveColumns, TagIndex, Unsubscribed, buffered_bytes, extract, extract_frames
from .dedup import (
    KNOWN_SCHEMA,
    EventFilter,
    EventKey,
    KnownRows,
    RecentRows,
    drop_older,
    event_key,
    event_keys_of,
    recent_chunks,
)
from .floors import Floors
from .opengaps import OpenGaps
from .schema import BUFFER_SCHEMA, EVENT_KEY

log = structlog.get_logger(__name__)

_DATE = pa.date32()
_KEY_COLUMNS = list(EVENT_KEY)
_web_id = attrgetter("web_id")
SWEEP_SECONDS = 10.0  # how often a flush also drops every tag's recent events older than the look-back
ROW_BYTES_ESTIMATE = 64  # Arrow bytes of a typical row (tag ids, times, value, units, flags)
COMPACT_ROWS = 16_384  # rows taken value by value that go into Arrow columns at once


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What pistream knows of a subscribed stream before any value arrives (from tag resolution)."""

    path: str
    webid: str
    uom: str | None = None


@dataclass
class Flush:
    """One batch ready to commit, with the counts the summary line reports."""

    batch: pa.Table  # the buffered chunks as they are (not copied into one)
    repeats_dropped: int
    rejected: int
    # Floors, at take(), of the streams this batch touched, and its rows that may be recent events: once
    # it is committed, these are the committed ones (every accepted value is in this batch or an earlier one).
    floors: Floors
    recent: list[RecentRows]
    # Every gap being read back at take(), complete: once this batch is committed, the gaps that a restart
    # must read again (these floors may be past them). A few per reconnected tag, none in the steady state.
    open_gaps: OpenGaps
    spilled_rows: int = 0  # rows of this batch written ahead in Spills, committed with it


@dataclass
class Spill:
    """Rows of the batch being gathered, written to data files ahead of its commit (``ColumnBuffer.spill``):
    a large batch is then never whole in memory. The commit that follows adds the files; until then no
    reader sees them, and if the commit never comes they are orphans that VACUUM removes."""

    rows: pa.Table


@dataclass
class _Row:
    key: EventKey
    uom: str | None
    system: bool


class ColumnBuffer:
    """Accumulates rows column by column; ``take()`` hands them over as a RecordBatch and starts afresh."""

    def __init__(self, streams: dict[str, StreamInfo], event_filter: EventFilter | None = None):
        self.filter = event_filter if event_filter is not None else EventFilter()
        self.index = TagIndex(self.filter.floors.tags)  # the filter's tag ids: its floors are by id
        self.malformed = 0  # raw frames that did not decode (logged)
        self.unsubscribed = Unsubscribed()  # values of streams no channel of this process subscribed to
        self.describe(list(streams), [s.path for s in streams.values()], [s.uom for s in streams.values()])
        self._next_sweep = 0.0
        self._reset()

    def describe(self, webids: list[str], paths: list[str], uoms: list[str | None]) -> None:
        """Streams known from tag resolution (parallel lists), before any of their values arrive."""
        for webid, path, uom in zip(webids, paths, uoms, strict=True):
            self.index.add(webid, path, uom)
        self.index.tag_columns(np.zeros(0, np.int32))  # the paths into Arrow now: the caller drops its own

    def _reset(self) -> None:
        self._reset_rows()
        self._repeats_at_reset = self.filter.stats.repeats_dropped
        self._rejected = 0
        # What the batch's spilled rows leave behind for take(): their tags, their possibly recent events.
        self._spilled_rows = 0
        self._spilled_tags = np.zeros(0, np.bool_)
        self._spilled_recent: list[RecentRows] = []

    def _reset_rows(self) -> None:
        self._reset_value_rows()
        self._bulk: list[RecentRows] = []  # steady-state batches (and compacted rows), in table columns
        self._bulk_rows = 0
        self._bulk_bytes = 0

    def _reset_value_rows(self) -> None:
        """The rows taken value by value, as Python lists (see ``_compact_if_many``)."""
        self.tag_webid: list[str] = []
        self.timestamp: list[int] = []
        self.value: list[float | None] = []
        self.value_text: list[str | None] = []
        self.state_code: list[int | None] = []
        self.system_state: list[bool] = []
        self.uom: list[str | None] = []
        self.good: list[bool] = []
        self.questionable: list[bool] = []
        self.substituted: list[bool] = []
        self.annotated: list[bool] = []
        self.received_us: list[int] = []

    def __len__(self) -> int:
        """Rows in the batch being gathered, spilled ones included."""
        return self._spilled_rows + self.held_rows

    @property
    def held_rows(self) -> int:
        """Rows still in memory (not spilled)."""
        return len(self.tag_webid) + self._bulk_rows

    @property
    def nbytes(self) -> int:
        """The held rows' size in Arrow bytes (values taken one by one counted at a typical row's size)."""
        return self._bulk_bytes + len(self.tag_webid) * ROW_BYTES_ESTIMATE

    def read_frames(self, items: list[Live]) -> LiveColumns | None:
        """Raw channel frames as columns with the C codec, or None (no codec, decoded messages among them,
        or frames it leaves to msgspec). The codec scans without holding the GIL (the commit thread runs
        meanwhile); running it in a worker thread of its own was measured and is slower on 2 cores."""
        frames = [item.frame for item in items]
        if not FRAME_CODEC or None in frames:
            return None
        return extract_frames(frames, [item.received_us for item in items], self.index)  # type: ignore[arg-type]

    def add_live_batch(self, items: list[Live]) -> tuple[int, GapRequests]:
        """Several channel messages at once: in bulk when they are all steady state, else value by value.
        Returns the number of values received and any gaps to read back."""
        columns = self.read_frames(items)
        understood = columns is not None  # by the codec: then the bulk path below would not accept them either
        if columns is not None and (not len(columns) or self._accept_bulk(columns)):
            dropped = sum(values for _, values in columns.unsubscribed)
            for webid, values in columns.unsubscribed:
                self.unsubscribed.drop(webid, values)
            return len(columns) + dropped, GapRequests()
        taken = self._accept_bulk_with_first_values(columns) if columns is not None else None
        streams: list[StreamValues] = []
        received: list[int] = []
        for item in items:
            message = item.message if item.frame is None else self._decode(item)
            message_streams = (message.items or ()) if message is not None else ()
            streams.extend(message_streams)
            received.extend(repeat(item.received_us, len(message_streams)))
        stream_ids = self.index.stream_ids(list(map(_web_id, streams)))
        subscribed = self.index.subscribed(stream_ids)
        count = 0
        if not subscribed.all():  # streams of WebIds no channel of ours asked for: dropped, by stream
            for i in np.flatnonzero(~subscribed).tolist():
                values = len(streams[i].timed_values())
                count += values
                self.unsubscribed.drop(streams[i].web_id, values)
            streams = list(compress(streams, subscribed))
            received = list(compress(received, subscribed))
            stream_ids = stream_ids[subscribed]
        if not understood:
            columns = extract(streams, received, self.index, stream_ids)
            if columns is not None and self._accept_bulk(columns):
                return count + len(columns), GapRequests()
            taken = self._accept_bulk_with_first_values(columns) if columns is not None else None
        gaps = GapRequests()
        if taken is not None:  # most went in bulk: the rest go value by value
            marks, values, gaps = taken
            count += values
            rest = ~marks[np.maximum(stream_ids, 0)] | (stream_ids < 0)
            streams, received, stream_ids = list(compress(streams, rest)), list(compress(received, rest)), stream_ids[rest]
        # The steady tags' pending rows into recent at once (their path looks keys up); a tag in a gap
        # looks up only values at or before its floor, and sorts its own rows in then (``accept_live``).
        in_gap = self.filter.in_gap
        steady = [i for i, stream in enumerate(streams) if not in_gap(stream.web_id or "")]
        self.filter.sync_recent(stream_ids[steady][stream_ids[steady] >= 0])
        for stream, received_us in zip(streams, received, strict=True):
            count += len(stream.timed_values())
            gap = self.add_live(stream, received_us)
            if gap is not None:
                gaps.append(gap)
        self._compact_if_many()
        return count, gaps

    def add_columns(self, columns: LiveColumns) -> None:
        """Rows already in table columns, of tags with no gap open (a history page): in bulk, else (events at
        one timestamp, say) value by value with ``add_live``'s decisions for such tags."""
        if not len(columns) or self._accept_bulk(columns):
            return
        self._add_by_value(RecentRows(columns.ids, columns.ts, columns.batch), np.arange(len(columns)),
                           self.filter.accept_live)

    def _add_by_value(self, rows: RecentRows, chosen: np.ndarray, accept: Callable[[str, EventKey], bool]) -> None:
        """Rows ``chosen`` of a batch in table columns, value by value: each that ``accept`` lets in."""
        batch = rows.data
        uoms = batch.column("uom").to_pylist()
        system = batch.column("system_state").to_pylist()
        received = batch.column("received_timestamp").cast(pa.int64()).to_pylist()
        for row, (webid, key) in zip(chosen.tolist(), event_keys_of(rows, chosen), strict=True):
            if accept(webid, key):
                self._append(webid, _Row(key, uoms[row], system[row]), None, received[row])
        self._compact_if_many()

    def _accept_bulk_with_first_values(self, columns: LiveColumns
                                       ) -> tuple[np.ndarray, int, GapRequests] | None:
        """A batch that holds tags awaiting their first live value since a connect, in bulk but for the
        awaiting tags with a value at or before their floor (those go value by value, as the whole batch
        did before: after a restart at 100,000 tags nearly every batch of the first seconds held such a tag,
        and ~1 M values became key tuples and Python rows, the restart's peak of memory). Each other
        awaiting tag's first value (its earliest: the values are in order) closes its window
        (``EventFilter.first_values``). Returns a mark per tag id taken in bulk, how many values, and the
        gaps to read back; None if nothing was taken."""
        filt = self.filter
        if not len(columns) or not filt.awaiting_tags():
            return None
        ids, ts = columns.ids, columns.ts
        waiting = filt.awaiting_rows(ids)
        if not waiting.any() or not self.index.all_described(ids) or not _in_order(ids, ts):
            return None
        floors = filt.floors.array()
        stale = np.zeros(len(floors), np.bool_)
        stale[ids[waiting & (ts <= floors[ids])]] = True
        keep = ~stale[ids]
        if not keep.any():
            return None
        part = columns if keep.all() else LiveColumns(ids[keep], ts[keep], columns.batch.filter(pa.array(keep)))
        firsts = np.flatnonzero(waiting[keep])
        tags, at = np.unique(part.ids[firsts], return_index=True)
        first_rows = firsts[at]
        if not self._accept_bulk(part, awaiting_too=True):
            return None
        data = part.batch.take(pa.array(first_rows)).select(list(EVENT_KEY[2:])).cast(KNOWN_SCHEMA)
        gaps = filt.first_values(KnownRows(tags, part.ts[first_rows], pa.Table.from_batches([data])))
        marks = np.zeros(len(self.index.webids), np.bool_)
        marks[part.ids] = True
        return marks, len(part), gaps

    def _accept_bulk(self, columns: LiveColumns, awaiting_too: bool = False) -> bool:
        """Accept a batch as a whole if it is steady state: none of its tags awaiting its first live value
        since a connect, every value newer than its tag's floor and in order. Tags whose gap is being read
        back qualify (such values are past their windows): after a restart at 100,000 tags, taking their
        live values one by one until every gap was read kept the pipeline too busy to read the gaps (1,223
        of 100,000 in 90 s, 870 MB). Otherwise nothing is accepted and the caller goes value by value."""
        filt = self.filter
        ids, ts = columns.ids, columns.ts
        if not awaiting_too and filt.awaiting_tags() and filt.any_awaiting(list(map(self.index.webids.__getitem__,
                                                                  np.unique(ids).tolist()))):
            return False
        if not self.index.all_described(ids):  # streams no tag resolution named: their paths first
            return False
        floors = filt.floors.array()
        if not _in_order(ids, ts):
            return False
        newer = ts > floors[ids]
        if not newer.all():
            return self._accept_late(columns, floors, newer)
        np.maximum.at(floors, ids, ts)
        filt.add_recent(RecentRows(ids, ts, columns.batch.select(_KEY_COLUMNS)))  # no copy
        self._hold(RecentRows(ids, ts, columns.batch))
        return True

    def _accept_late(self, columns: LiveColumns, floors: np.ndarray, newer: np.ndarray) -> bool:
        """A batch in order per tag with values at or before their tag's floor: a late burst (a PI Analysis
        recalculation, an interface's buffer flushed after an outage, a backfill) that channels deliver after
        the current value. The same decisions as ``_add_live_steady`` value by value, as arrays: values older
        than the floor's look-back are kept (they cannot be told from repeats), those within it are checked
        against the tag's recent events (only these become keys), newer ones move the floor. Tags with a gap
        being read back are left to the careful path (their windows decide)."""
        filt = self.filter
        ids, ts = columns.ids, columns.ts
        late = ~newer
        if filt.any_window([self.index.webids[i] for i in np.unique(ids[late]).tolist()]):
            return False
        band = late & (ts >= floors[ids] - filt.lookback_us)
        keep = np.ones(len(ids), np.bool_)
        if band.any():
            filt.sync_recent(np.unique(ids[band]))
            rows = np.flatnonzero(band)
            recent_of = filt.recent
            for row, (webid, key) in zip(rows.tolist(), event_keys_of(RecentRows(ids, ts, columns.batch), rows),
                                         strict=True):
                recent = recent_of.get(webid)
                if recent is None:
                    recent = recent_of[webid] = []
                if key in recent:
                    keep[row] = False
                    filt.stats.repeats_dropped += 1
                else:
                    recent.append(key)
        filt.stats.late_accepted += int(np.count_nonzero(late & ~band))
        np.maximum.at(floors, ids[newer], ts[newer])
        if newer.any():
            filt.add_recent(RecentRows(ids[newer], ts[newer], columns.batch.filter(pa.array(newer)).select(_KEY_COLUMNS)))
        if keep.all():
            self._hold(RecentRows(ids, ts, columns.batch))
        elif keep.any():
            self._hold(RecentRows(ids[keep], ts[keep], columns.batch.filter(pa.array(keep))))
        return True

    def _hold(self, rows: RecentRows) -> None:
        """Rows of the batch in table columns: accepted in bulk, or compacted from value-by-value rows."""
        self._bulk.append(rows)
        self._bulk_rows += len(rows)
        self._bulk_bytes += buffered_bytes(rows.data)

    def sync_filter(self) -> None:
        """The recent events the bulk path accepted, into the filter's own records (its floors are
        raised in place)."""
        self.filter.sync_recent()

    def _tag_marks(self, chunks: list[np.ndarray], also: np.ndarray | None = None) -> np.ndarray:
        """A mark per tag id found in ``chunks`` (or marked in ``also``): linear, unlike sorting."""
        seen = np.zeros(len(self.index.webids), np.bool_)
        if also is not None:
            seen[:len(also)] = also
        for ids in chunks:
            seen[ids] = True
        return seen

    def connected(self, webids: list[str]) -> None:
        """A channel (re)connected: its tags wait for their first live value (see ``EventFilter``)."""
        self.filter.connected(webids)

    def _decode(self, item: Live) -> StreamSetMessage | None:
        """A raw frame the codec did not take: decoded here, as the reader does for small frames."""
        assert item.frame is not None
        try:
            message = channel_decoder.decode(item.frame)
        except FRAME_ERRORS as exc:
            self.malformed += 1
            log.error("frame_malformed", channel=item.channel, error=str(exc), size=len(item.frame))
            return None
        if message.web_exception is not None:
            log.warning("frame_cut_short", channel=item.channel, web_exception=str(message.web_exception))
        return message

    def _rows(self, path: str, stream: StreamValues) -> list[_Row]:
        """Decode a stream's values into keys; a value without a usable timestamp is logged and counted."""
        rows = []
        for tv in stream.timed_values():
            row = self._row(path, tv, stream.units_abbreviation)
            if row is not None:
                rows.append(row)
        return rows

    def _row(self, path: str, tv: TimedValue, stream_uom: str | None) -> _Row | None:
        try:
            ts = to_us(tv.timestamp) if tv.timestamp else None
        except (ValueError, OverflowError):
            ts = None
        if ts is None:
            self._rejected += 1
            log.error("value_rejected", tag=path, value_timestamp=tv.timestamp, reason="no usable timestamp")
            return None
        value, text, code, system, is_error = classify_value(tv.value)
        if tv.errors:
            text = "; ".join(str(e) for e in tv.errors) if text is None else text
            is_error = True
        key = event_key(ts, value, text, code, flag(tv.good, default=not (system or is_error)),
                        flag(tv.questionable, False), flag(tv.substituted, False), flag(tv.annotated, False))
        return _Row(key, tv.units_abbreviation or stream_uom, system)

    def add_live(self, stream: StreamValues, received_us: int) -> GapRequest | None:
        """Append a channel's values; the first ones after a reconnect may open a gap to read back."""
        webid = stream.web_id or ""
        described = self._describe(webid, stream)
        if described is None:
            return None
        path, uom = described
        if not self.filter.in_gap(webid):
            self.filter.sync_tag(webid)
            self._add_live_steady(webid, path, uom, stream, received_us)
            return None
        rows = self._rows(path, stream)
        gap = self.filter.first_live(webid, [r.key for r in rows]) if self.filter.awaiting(webid) else None
        for row in rows:
            if self.filter.accept_live(webid, row.key):
                self._append(webid, row, uom, received_us)
        return gap

    def add_gaps(self, streams: list[StreamValues], received_us: int) -> None:
        """A page of recorded values read back for gaps (``add_gap`` for each stream)."""
        self.filter.prepare_gaps(stream.web_id or "" for stream in streams)
        for stream in streams:
            self.add_gap(stream, received_us)

    def add_gap(self, stream: StreamValues, received_us: int) -> None:
        """Append recorded values read back for a gap; only those inside the gap's window count."""
        webid = stream.web_id or ""
        described = self._describe(webid, stream)
        if described is None:
            return
        path, uom = described
        for row in self._rows(path, stream):
            if self.filter.accept_gap(webid, row.key):
                self._append(webid, row, uom, received_us)
        self._compact_if_many()

    def add_gap_columns(self, columns: LiveColumns) -> None:
        """A page of recorded values read back for gaps, in columns (the gap filler's pages the codec read):
        the rows of tags whose window is compact are decided as arrays (``EventFilter.accept_gap_rows``) and
        held as columns; a tag with windows as objects goes value by value, as ``add_gap``."""
        if not len(columns):
            return
        filt = self.filter
        ids, ts, batch = columns.ids, columns.ts, columns.batch
        bulk = filt.compact_gap_rows(ids)
        if bulk.any():
            part = RecentRows(ids, ts, batch) if bulk.all() else RecentRows(ids, ts, batch).where(bulk)
            keep = filt.accept_gap_rows(part.ids, part.ts, part.data)
            if keep.any():
                kept = part if keep.all() else part.where(keep)
                floors = filt.floors.array()
                np.maximum.at(floors, kept.ids, kept.ts)  # as ``advance``: gap values are at most the floor
                recent = kept.ts >= floors[kept.ids] - filt.lookback_us
                if recent.any():
                    filt.add_recent(RecentRows(kept.ids[recent], kept.ts[recent],
                                               kept.data.filter(pa.array(recent)).select(_KEY_COLUMNS)))
                self._hold(kept)
        if bulk.all():
            return
        chosen = np.flatnonzero(~bulk)
        filt.prepare_gaps({self.index.webids[i] for i in np.unique(ids[chosen]).tolist()})
        self._add_by_value(RecentRows(ids, ts, batch), chosen, filt.accept_gap)

    def _compact_if_many(self) -> None:
        """Rows taken value by value go into Arrow columns once there are COMPACT_ROWS of them: as Python
        lists they are ~4 objects a row, and a restart at 100,000 tags reads back over a million values
        that way (the rows keep their order; a batch's parts are its chunks in arrival order)."""
        if len(self.tag_webid) >= COMPACT_ROWS:
            self._hold(self._take_rows())
            self._reset_value_rows()

    def _add_live_steady(self, webid: str, path: str, uom: str | None, stream: StreamValues,
                         received_us: int) -> None:
        """The hot path: a stream with no gap open. The same decisions as ``accept_live`` and
        ``advance`` value by value, with the tag's floor and recent events held in locals."""
        filt = self.filter
        floor = filt.floors.get(webid)
        recent = filt.recent.get(webid)
        if recent is None:
            recent = filt.recent[webid] = []
        lookback = filt.lookback_us
        for tv in stream.timed_values():
            raw_ts = tv.timestamp
            try:
                ts = to_us(raw_ts) if raw_ts else None
            except (ValueError, OverflowError):
                ts = None
            if ts is None:
                self._rejected += 1
                log.error("value_rejected", tag=path, value_timestamp=raw_ts, reason="no usable timestamp")
                continue
            raw = tv.value
            if type(raw) is float and not tv.errors:
                value: Any = "NaN" if raw != raw else raw
                text = code = None
                system = is_error = False
            else:
                value, text, code, system, is_error = classify_value(raw)
                if tv.errors:
                    text = "; ".join(str(e) for e in tv.errors) if text is None else text
                    is_error = True
                if isinstance(value, float) and value != value:
                    value = "NaN"
            good = tv.good if type(tv.good) is bool else flag(tv.good, default=not (system or is_error))
            questionable = tv.questionable if type(tv.questionable) is bool else flag(tv.questionable, False)
            substituted = tv.substituted if type(tv.substituted) is bool else flag(tv.substituted, False)
            annotated = tv.annotated if type(tv.annotated) is bool else flag(tv.annotated, False)
            key = (ts, value, text, code, good, questionable, substituted, annotated)
            if floor is None or ts > floor:
                floor = ts
                horizon = ts - lookback
                if lookback == 0:
                    recent.clear()
                drop_older(recent, horizon)
                recent.append(key)
            elif key in recent:
                filt.stats.repeats_dropped += 1
                continue
            else:
                if ts < floor - lookback:
                    filt.stats.late_accepted += 1
                else:
                    recent.append(key)
            self.tag_webid.append(webid)
            self.timestamp.append(ts)
            self.value.append(raw if value == "NaN" else value)
            self.value_text.append(text)
            self.state_code.append(code)
            self.system_state.append(system)
            self.uom.append(tv.units_abbreviation or uom)
            self.good.append(good)
            self.questionable.append(questionable)
            self.substituted.append(substituted)
            self.annotated.append(annotated)
            self.received_us.append(received_us)
        if floor is not None:
            filt.floors[webid] = floor

    def _describe(self, webid: str, stream: StreamValues) -> tuple[str, str | None] | None:
        """The tag's path and default units, from tag resolution (the message's own units win; the message's
        ``Path`` never counts). None, with the values dropped and counted, for a stream tag resolution did not
        describe: no channel of this process subscribed to it."""
        known = self.index.described(webid)
        if known is None:
            self.unsubscribed.drop(stream.web_id, len(stream.timed_values()))
            return None
        return self.index.path(known) or webid, stream.units_abbreviation or self.index.uoms[known]

    def _append(self, webid: str, row: _Row, uom: str | None, received_us: int) -> None:
        self.filter.advance(webid, row.key)
        ts, value, text, code, good, questionable, substituted, annotated = row.key
        self.tag_webid.append(webid)
        self.timestamp.append(ts)
        self.value.append(float("nan") if value == "NaN" else value)
        self.value_text.append(text)
        self.state_code.append(code)
        self.system_state.append(row.system)
        self.uom.append(row.uom or uom)
        self.good.append(good)
        self.questionable.append(questionable)
        self.substituted.append(substituted)
        self.annotated.append(annotated)
        self.received_us.append(received_us)

    def _held_parts(self) -> list[RecentRows]:
        parts = list(self._bulk)
        if self.tag_webid:
            parts.append(self._take_rows())
        return parts

    def spill(self) -> Spill | None:
        """The rows held so far, to be written ahead of the batch's commit; the buffer keeps what ``take``
        needs to describe the whole batch: which tags it touched, and the rows that may be recent events."""
        if not self.held_rows:
            return None
        parts = self._held_parts()
        self._spilled_tags = self._tag_marks([p.ids for p in parts], also=self._spilled_tags)
        self._spilled_recent = recent_chunks(self._spilled_recent + _keys_only(parts), self.filter.lookback_us,
                                             self.filter.floors.array())
        rows = pa.Table.from_batches([p.data for p in parts], schema=BUFFER_SCHEMA)
        self._spilled_rows += rows.num_rows
        self._reset_rows()
        return Spill(rows)

    def take(self) -> Flush | None:
        """The batch: its held rows as a Table in the buffer's schema, and what its commit records (floors,
        recent events, open gaps); None when empty. Rows spilled before are part of it."""
        if not len(self):
            return None
        parts = self._held_parts()
        batch = pa.Table.from_batches([p.data for p in parts], schema=BUFFER_SCHEMA)
        filt = self.filter  # its recent events stay pending until a value-by-value step needs them
        floors_by_id = filt.floors.array()
        recent = recent_chunks(self._spilled_recent + _keys_only(parts), filt.lookback_us, floors_by_id)
        floors = filt.floors.only(self._tag_marks([p.ids for p in parts], also=self._spilled_tags))
        flush = Flush(batch, filt.stats.repeats_dropped - self._repeats_at_reset, self._rejected, floors, recent,
                      filt.open_windows(), spilled_rows=self._spilled_rows)
        filt.prune_pending(floors_by_id)
        if time.monotonic() >= self._next_sweep:  # a pass over every tag: not at every flush
            filt.forget_old_events()
            self._next_sweep = time.monotonic() + SWEEP_SECONDS
        self._reset()
        return flush

    def _take_rows(self) -> RecentRows:
        """The rows that came value by value, as columns."""
        ids = np.fromiter(map(self.index.ids.__getitem__, self.tag_webid), np.int32, len(self.tag_webid))
        timestamps = pa.array(self.timestamp, pa.int64()).cast(TIMESTAMP_US)
        columns = [
            *self.index.tag_columns(ids),
            timestamps,
            pa.array(self.value, pa.float64()),
            pa.array(self.value_text, pa.string()),
            pa.array(self.state_code, pa.int32()),
            pa.array(self.system_state, pa.bool_()),
            pa.array(self.uom, pa.string()),
            pa.array(self.good, pa.bool_()),
            pa.array(self.questionable, pa.bool_()),
            pa.array(self.substituted, pa.bool_()),
            pa.array(self.annotated, pa.bool_()),
            pa.array(self.received_us, pa.int64()).cast(TIMESTAMP_US),
            pc.cast(timestamps, _DATE),  # UTC date; floors correctly before 1970
        ]
        return RecentRows(ids, np.array(self.timestamp, np.int64),
                          pa.RecordBatch.from_arrays(columns, schema=BUFFER_SCHEMA))


def _keys_only(parts: list[RecentRows]) -> list[RecentRows]:
    """The parts with only the event-key columns (views, no copy): what the exactly-once filter keeps."""
    return [RecentRows(p.ids, p.ts, p.data.select(_KEY_COLUMNS)) for p in parts]


def _in_order(ids: np.ndarray, ts: np.ndarray) -> bool:
    """Each tag's values strictly increasing in arrival order (so each is newer than the one before)."""
    if len(ids) < 2:
        return True
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    sorted_ts = ts[order]
    same = sorted_ids[1:] == sorted_ids[:-1]
    return bool(np.all(sorted_ts[1:][same] > sorted_ts[:-1][same]))
