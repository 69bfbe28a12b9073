"""History: every recorded value of many tags over a long range, read with ``streamsets/recorded`` page by
page and handed on in each tag's time order, with where each tag stands after each page.

The gap reads' machinery at a larger scale: the same call with its retries (``gapfill.read_recorded``) and
the same page-edge cursor (``gapfill.after_cursor``: a tag cut at ``maxCount`` is asked again from its last
timestamp and the events it already has there are skipped, so several events at one timestamp are neither
lost nor repeated). What differs is the scheduling: a call takes up to ``max_streams`` tags (and the URL
length allows) whose cursors stand together, ``items_per_page`` values in all (``maxCount`` per tag, at most
the 150,000 a server returns per call), and ``concurrency`` calls run at once. After each page a tag goes
back into the queue at its new cursor, so tags of different densities drift apart into calls of their own
instead of dragging each other's pages (a call starts at its earliest cursor; a tag joins one only if that
makes it read again at most an eighth of its last page).

Given a ``decode`` (``pages.PageDecoder``: the C codec), a page is read straight into table
columns and each tag's cursor is moved with array operations on the rows' times; only pages it does not
take (no codec, odd values, a tag's times out of order) go through msgspec and a Python object per value.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Sized
from dataclasses import dataclass, field
from urllib.parse import quote

import numpy as np
import structlog
import trio

from ..errors import ConnectError, ServerError
from ..timeutil import format_iso, to_us
from .gapfill import MAX_ITEMS_PER_CALL, after_cursor, moved_cursors, read_recorded, rows_after_cursors
from .messages import StreamSetMessage, StreamValues, TimedValue, channel_decoder
from .pages import PageColumns, PageDecoder
from .piwebapi import PiWebApi

log = structlog.get_logger(__name__)

ITEMS_PER_PAGE = 10_000  # values a call brings: ~1.5 MB of JSON. 50,000 held 505 MB at peak over 10,000 tags (pages
# queued and in flight), 10,000 held 335 MB and ran faster (the server renders while the client decodes)
MAX_STREAMS_PER_CALL = 500
REREAD_FRACTION = 8  # a tag joins a call starting before its cursor if it re-reads at most 1/8 of a page


@dataclass(frozen=True, slots=True)
class TagProgress:
    """Where a tag's history read stands: every event before ``cursor_us`` and the first ``seen`` events at
    it are read (``done``: all of its range). ``values`` read so far, the first and last of their times."""

    cursor_us: int
    seen: int = 0
    done: bool = False
    values: int = 0
    first_us: int | None = None
    last_us: int | None = None


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Values of one call, each stream's in time order and past its cursor, and the progress of every tag
    the call asked for (the tags without a value in it too: they may be done). The values are ``streams``
    (decoded by msgspec) or ``columns`` (``PageColumns.take``)."""

    received_us: int
    streams: list[StreamValues]
    progress: dict[str, TagProgress]
    columns: Sized | None = None

    @property
    def values(self) -> int:
        return sum(len(s.items or ()) for s in self.streams) + (len(self.columns) if self.columns is not None else 0)


@dataclass(slots=True)
class TagRange:
    """One tag's range to read, ``end_us`` included, and its progress so far."""

    webid: str
    end_us: int
    progress: TagProgress
    span_us: int = 0  # the time its last full page covered (0: no page yet)
    alone: bool = False  # read by itself: after an error in a shared call, or events crowding one timestamp
    max_count: int = 0  # with ``alone``: maxCount of its calls (0: the page's share)


@dataclass
class HistoryStats:
    calls: int = 0
    pages: int = 0
    values: int = 0
    tags_done: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # webid -> why its read stopped (a re-run resumes it)


class HistoryReader:
    """Reads ``ranges`` with ``concurrency`` calls at a time and sends a ``HistoryPage`` per call."""

    def __init__(self, api: PiWebApi, ranges: list[TagRange], send_channel: trio.MemorySendChannel[HistoryPage],
                 *, concurrency: int = 4, items_per_page: int | None = None,
                 max_streams: int = MAX_STREAMS_PER_CALL, decode: PageDecoder | None = None):
        self.api = api
        self.decode = decode
        self.send_channel = send_channel
        self.concurrency = concurrency
        self.items_per_page = min(items_per_page or ITEMS_PER_PAGE, MAX_ITEMS_PER_CALL)
        self.max_streams = max_streams
        self.stats = HistoryStats()
        self._order = itertools.count()
        self._queue: list[tuple[int, int, TagRange]] = []
        self._busy = 0
        self._changed = trio.Event()
        for r in ranges:
            if r.progress.done:
                self.stats.tags_done += 1
            else:
                self._push(r)
        self.tags = len(ranges)

    def _push(self, r: TagRange) -> None:
        heapq.heappush(self._queue, (r.progress.cursor_us, next(self._order), r))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self.send_channel, trio.open_nursery() as nursery:
            for _ in range(self.concurrency):
                nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        while True:
            group = self._take_group()
            if group is None:
                if not self._busy:
                    return
                await self._changed.wait()
                continue
            self._busy += 1
            try:
                await self._read(group)
            finally:
                self._busy -= 1
                self._changed.set()
                self._changed = trio.Event()

    def _take_group(self) -> list[TagRange] | None:
        """The tag with the earliest cursor and the tags whose cursors stand close enough to it."""
        if not self._queue:
            return None
        start, _, leader = heapq.heappop(self._queue)
        group = [leader]
        size = len(self.api.base_url) + len("/streamsets/recorded?") + 200 + _cost(leader.webid)
        while self._queue and not leader.alone and len(group) < self.max_streams:
            cursor, _, r = self._queue[0]
            if r.alone or size + _cost(r.webid) > self.api.max_url_length or (
                    cursor > start and cursor - start > r.span_us // REREAD_FRACTION):
                break
            heapq.heappop(self._queue)
            group.append(r)
            size += _cost(r.webid)
        return group

    async def _read(self, group: list[TagRange]) -> None:
        start_us = group[0].progress.cursor_us
        end_us = max(r.end_us for r in group)
        per_stream = group[0].max_count if group[0].alone and group[0].max_count else \
            max(1, self.items_per_page // len(group))

        def count() -> None:
            self.stats.calls += 1

        try:
            answer = await read_recorded(self.api, [r.webid for r in group], start_us, format_iso(end_us),
                                         per_stream, event="history_read_retried", on_call=count,
                                         decode=self.decode)
        except (ServerError, ConnectError) as exc:  # refused, or still failing after the retries
            self._failed(group, str(exc), start_us, end_us)
            return
        page = None
        if not isinstance(answer, StreamSetMessage):
            page = self._advance_columns(group, answer, per_stream, start_us, end_us)
            if page is None:
                answer = channel_decoder.decode(answer.body)  # the codec read it: so does msgspec
        if page is None:
            assert isinstance(answer, StreamSetMessage)
            page = self._advance_streams(group, answer, per_stream, start_us, end_us)
        self.stats.pages += 1
        await self.send_channel.send(page)

    def _advance_streams(self, group: list[TagRange], message: StreamSetMessage, per_stream: int, start_us: int,
                         end_us: int) -> HistoryPage:
        """Every tag of a page decoded by msgspec, value by value (``_advance``)."""
        by_webid = {s.web_id: s for s in message.items or ()}
        streams: list[StreamValues] = []
        progress: dict[str, TagProgress] = {}
        for r in group:
            stream = by_webid.get(r.webid)
            if stream is None:
                self._failed([r], "the server's answer left this tag out", start_us, end_us)
                continue
            fresh, page_progress = self._advance(r, stream.timed_values(), per_stream)
            progress[r.webid] = page_progress
            if fresh:
                streams.append(StreamValues(web_id=r.webid, name=stream.name, path=stream.path,
                                            units_abbreviation=stream.units_abbreviation, items=fresh))
        return HistoryPage(time.time_ns() // 1000, streams, progress)

    def _advance_columns(self, group: list[TagRange], page: PageColumns, per_stream: int, start_us: int,
                         end_us: int) -> HistoryPage | None:
        """``_advance`` for every tag of a page in columns at once, with the same decisions (the tests run
        both paths). None, before anything moved, where it does not apply: a stream twice or not asked for,
        a tag's times out of order (``after_cursor`` keeps such values; msgspec's path decides them)."""
        by_webid = {r.webid: r for r in group}
        if len(set(page.webids)) != len(page.webids) or not all(w in by_webid for w in page.webids):
            return None
        ranges = [by_webid[w] for w in page.webids]
        ts = page.ts
        cursor = np.array([r.progress.cursor_us for r in ranges], np.int64)
        seen = np.array([r.progress.seen for r in ranges], np.int64)
        found = rows_after_cursors(ts, page.counts, cursor, seen)
        if found is None:
            return None
        stream, fresh = found
        ends = np.array([r.end_us for r in ranges], np.int64)
        inside = ts <= ends[stream]
        keep = fresh & inside
        past_end = np.bincount(stream[fresh & ~inside], minlength=len(ranges)) > 0
        kept, first, last, at_last = moved_cursors(ts, stream, keep, cursor, seen)
        counts = page.counts
        progress: dict[str, TagProgress] = {}
        for i, r in enumerate(ranges):
            before = r.progress
            k = int(kept[i])
            if k:
                new_cursor = (int(last[i]), int(at_last[i]))
            else:
                new_cursor = (before.cursor_us, before.seen)
            # as ``_advance``: past the end or a short page (every row has a time here)
            done = bool(past_end[i]) or int(counts[i]) < per_stream
            progress[r.webid] = self._moved(r, before, new_cursor, done, k, int(first[i]) if k else None,
                                            int(last[i]) if k else None, per_stream)
        for r in group:
            if r.webid not in progress:
                self._failed([r], "the server's answer left this tag out", start_us, end_us)
        return HistoryPage(time.time_ns() // 1000, [], progress, page.take(keep))

    def _moved(self, r: TagRange, before: TagProgress, new_cursor: tuple[int, int], done: bool, fresh: int,
               first: int | None, last: int | None, per_stream: int) -> TagProgress:
        """A tag's progress after a page that brought it ``fresh`` new values; it is queued again unless done."""
        progress = TagProgress(new_cursor[0], new_cursor[1], done, before.values + fresh,
                               before.first_us if before.first_us is not None else first,
                               last if last is not None else before.last_us)
        self.stats.values += fresh
        r.progress = progress
        if done:
            self.stats.tags_done += 1
        elif not fresh:  # more events at one timestamp than a page holds: read it alone with bigger pages
            if per_stream >= MAX_ITEMS_PER_CALL:
                self.stats.failed[r.webid] = (f"more than {MAX_ITEMS_PER_CALL} events at "
                                              f"{format_iso(before.cursor_us)}")
                log.error("history_read_stuck", tag=r.webid, at=format_iso(before.cursor_us))
            else:
                r.alone, r.max_count = True, min(MAX_ITEMS_PER_CALL, 2 * per_stream)
                self._push(r)
        else:
            r.span_us = new_cursor[0] - before.cursor_us
            self._push(r)
        return progress

    def _advance(self, r: TagRange, items: list[TimedValue], per_stream: int) -> tuple[list[TimedValue], TagProgress]:
        """A tag's new values from one call, its progress after them; it is queued again unless done."""
        before = r.progress
        fresh, cursor = after_cursor(items, before.cursor_us, before.seen)
        past_end = cursor is not None and cursor[0] > r.end_us
        if past_end:
            fresh = [tv for tv in fresh if not _after(tv, r.end_us)]
            cursor = _cursor_of(fresh, before)
        # A full page of nothing new (every event at the cursor read already: more of them than a page holds)
        # is not the end: ``_moved`` reads the tag alone with bigger pages. Values without a usable
        # timestamp and no cursor: it stops there (they are rejected and counted downstream).
        done = past_end or len(items) < per_stream or (cursor is None and bool(fresh))
        first, last = _first_last(fresh)
        new_cursor = cursor or (before.cursor_us, before.seen)
        return fresh, self._moved(r, before, new_cursor, done, len(fresh), first, last, per_stream)

    def _failed(self, group: list[TagRange], reason: str, start_us: int, end_us: int) -> None:
        """A call that failed for good: its tags are tried once more each by itself (one bad tag must not
        stop the others); a tag that fails alone is left where it stands, for a re-run to resume."""
        if len(group) > 1:
            log.warning("history_read_split", tags=len(group), error=reason, start=format_iso(start_us))
            for r in group:
                r.alone = True
                self._push(r)
            return
        r = group[0]
        self.stats.failed[r.webid] = reason
        log.error("history_read_failed", tag=r.webid, error=reason, start=format_iso(start_us),
                  end=format_iso(end_us), note="run the same backfill again to resume this tag")


def _cost(webid: str) -> int:
    return len("&webId=") + len(quote(webid))


def _ts(tv: TimedValue) -> int | None:
    try:
        return to_us(tv.timestamp) if tv.timestamp else None
    except ValueError:
        return None


def _after(tv: TimedValue, end_us: int) -> bool:
    ts = _ts(tv)
    return ts is not None and ts > end_us


def _cursor_of(fresh: list[TimedValue], before: TagProgress) -> tuple[int, int]:
    """The cursor after ``fresh`` (values past the cursor ``before``): its last time and the events there."""
    times = [t for t in map(_ts, fresh) if t is not None]
    if not times:
        return before.cursor_us, before.seen
    last = times[-1]
    at_last = sum(1 for t in times if t == last)
    return last, at_last + (before.seen if last == before.cursor_us else 0)


def _first_last(fresh: list[TimedValue]) -> tuple[int | None, int | None]:
    first = next((t for t in map(_ts, fresh) if t is not None), None)
    last = next((t for t in map(_ts, reversed(fresh)) if t is not None), None)
    return first, last
