"""The gap filler: reads back, over REST, what the channels missed (a disconnect, a restart), paged
and with bounded retries, and sends it to the flusher. What cannot be read back is logged as data loss
with its tags and time range, and counted — never silent.

Given a ``decode`` (the C codec's ``stream.columns.page_decoder``), a page is read straight into table
columns and each stream's cursor moves with array operations on the rows' times, as in history; pages the
codec leaves alone go through msgspec, value by value. A restart at 100,000 tags (~1.25 M gap values) read
every gap in 28 s by msgspec, 16-18 s in columns; the ``backfill`` scenario takes 1.5 CPU s per million
values in columns, 7.9 by msgspec.
"""

from __future__ import annotations

import time
from array import array
from collections import deque
from collections.abc import Callable, Sized
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
import structlog
import trio

from ..backoff import Backoff
from ..errors import ConnectError, ServerError
from ..timeutil import format_iso, to_us
from .flow import GapDone, GapRequest, GapRequests, GapValues, Incoming
from .messages import StreamSetMessage, StreamValues, TimedValue, channel_decoder
from .pages import PageColumns, PageDecoder
from .piwebapi import Decoded, PiWebApi, RetryableError

log = structlog.get_logger(__name__)

MAX_ITEMS_PER_CALL = 150_000  # PI Web API's MaxReturnedItemsPerCall default; more is a 400
ITEMS_PER_PAGE = 20_000  # what one page may bring: a few MB decoded, so queued pages stay small
GROUP_SPAN_US = 60_000_000  # gaps starting within a minute of each other are read in one call
MAX_ATTEMPTS = 8
MAX_PAGES = 100_000
# Pages sent and not yet taken in by the flusher. Pages decoded by msgspec are taken in value by value,
# slower than they are read: without this bound the shared queue filled with pages (after a restart at
# 100,000 tags, ~600,000 objects of pages waiting, ~50 MB).
PAGES_AHEAD = 2


# Per stream of an answer: its webid, values it brought, values past its cursor, its cursor after them.
_Outcome = tuple[str, int, int, tuple[int, int] | None]


@dataclass
class GapStats:
    gaps: int = 0
    values_read: int = 0
    calls: int = 0
    lost_gaps: int = 0


class GapQueue:
    """Pending gap requests, as columns; at most one per open window, so it is bounded by the number of tags."""

    def __init__(self) -> None:
        self._pending = GapRequests()
        self._wakeup = trio.Event()

    def put(self, request: GapRequest) -> None:
        self._pending.append(request)
        self._wakeup.set()

    def put_all(self, requests: GapRequests) -> None:
        if len(requests):
            self._pending.extend(requests)
            self._wakeup.set()

    async def take_all(self) -> GapRequests:
        while not len(self._pending):
            await self._wakeup.wait()
            self._wakeup = trio.Event()
        taken, self._pending = self._pending, GapRequests()
        return taken


def group_rows(requests: GapRequests, max_streams: int, max_url_length: int,
               base_url_length: int) -> list[array[int]]:
    """Batch gaps with nearby start times into calls whose URLs stay under the length limit: the rows of
    ``requests`` each call reads, by start time."""
    groups: list[array[int]] = []
    current: array[int] = array("l")
    size = base_url_length + 200
    starts, webids = requests.start_us, requests.webids
    first_start = 0
    # The rows by start time as one array: sorted() over 100,000 rows (after a restart) made a key and an
    # index object each, ~8 MB at the moment the flood of first live values peaks
    order = np.argsort(np.frombuffer(starts, np.int64), kind="stable") if len(starts) else np.zeros(0, np.int64)
    for row in order.tolist():
        start = starts[row]
        cost = len("&webId=") + len(quote(webids[row]))
        if current and (len(current) >= max_streams or size + cost > max_url_length
                        or start - first_start > GROUP_SPAN_US):
            groups.append(current)
            current, size = array("l"), base_url_length + 200
        if not current:
            first_start = start
        current.append(row)
        size += cost
    if current:
        groups.append(current)
    return groups


def group_requests(requests: list[GapRequest], max_streams: int, max_url_length: int,
                   base_url_length: int) -> list[list[GapRequest]]:
    """``group_rows`` for a list of requests: the requests of each call."""
    columns = GapRequests(requests)
    return [columns.take(rows) for rows in group_rows(columns, max_streams, max_url_length, base_url_length)]


class GapFiller:
    """Consumes gap requests, sends the recorded values and then ``GapDone`` for each batch of gaps."""

    def __init__(self, api: PiWebApi, queue: GapQueue, send_channel: trio.MemorySendChannel[Incoming],
                 *, max_count: int = 10_000, max_streams_per_call: int = 500,
                 items_per_page: int = ITEMS_PER_PAGE, decode: PageDecoder | None = None):
        self.api = api
        self.decode = decode  # pages straight into columns (``stream.columns.page_decoder``), where it takes them
        self.queue = queue
        self.send_channel = send_channel
        self.max_count = max_count
        self.max_streams = max_streams_per_call
        self.items_per_page = min(items_per_page, MAX_ITEMS_PER_CALL)
        self.stats = GapStats()
        self._ahead: deque[trio.Event] = deque()  # pages sent, until the flusher takes them in

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self.send_channel:
            while True:
                pending = await self.queue.take_all()
                groups = group_rows(pending, self.max_streams, self.api.max_url_length,
                                    len(self.api.base_url) + len("/streamsets/recorded?"))
                groups.reverse()
                while groups:  # request objects only for the group being read (a restart queues one per tag)
                    await self.fill(pending.take(groups.pop()))
                del pending

    async def fill(self, group: list[GapRequest]) -> None:
        """Read one group of gaps to the end, page by page, then close their windows."""
        started = time.monotonic()
        self.stats.gaps += len(group)
        first_us = min(r.start_us for r in group)
        end_us = max(r.end_us for r in group)
        # Per stream: where its next page starts, and how many events at exactly that time it already has
        # (a stream cut at max_count is asked again from its last timestamp, whose events come again).
        cursors = {r.webid: (first_us, 0) for r in group}
        # Streams with more events at one time than a page holds: a full page of events read already is
        # not their end; they are read alone, maxCount doubled up to the server's cap (webid -> maxCount).
        crowded: dict[str, int] = {}
        read = pages = 0
        try:
            while cursors and pages < MAX_PAGES:
                pages += 1
                if crowded:
                    asked = [next(iter(crowded))]
                    per_stream = crowded[asked[0]]
                else:
                    asked = list(cursors)
                    per_stream = max(1, min(self.max_count, self.items_per_page // len(cursors)))
                page_start = min(cursors[webid][0] for webid in asked)
                answer = await self._call(asked, page_start, format_iso(end_us), per_stream)
                values, outcomes = self._fresh_values(answer, set(asked), cursors)
                next_cursors = {webid: at for webid, at in cursors.items() if webid not in asked}
                for webid, items, fresh, cursor in outcomes:
                    read += fresh
                    if items < per_stream:
                        crowded.pop(webid, None)  # its end
                    elif cursor is not None:
                        next_cursors[webid] = cursor
                    elif not fresh:  # a full page of events read already: more at one time than a page holds
                        if per_stream >= MAX_ITEMS_PER_CALL:
                            crowded.pop(webid, None)
                            self._lost_crowded(webid, cursors[webid][0], end_us)
                        else:
                            crowded[webid] = min(2 * per_stream, MAX_ITEMS_PER_CALL)
                            next_cursors[webid] = cursors[webid]
                    else:  # values without a usable time (rejected and counted downstream): it stops there
                        crowded.pop(webid, None)
                await self._send_page(values)
                cursors = next_cursors
        except (ServerError, ConnectError) as exc:
            self.stats.lost_gaps += len(group)
            log.error("data_lost", reason=str(exc), tags=len(group), first=[r.webid for r in group[:5]],
                      start=format_iso(first_us), end=format_iso(end_us))
        self.stats.values_read += read
        await self.send_channel.send(GapDone(tuple(group)))
        log.info("gap_filled", tags=len(group), values=read, pages=pages, start=format_iso(first_us),
                 end=format_iso(end_us), seconds=round(time.monotonic() - started, 3))

    def _fresh_values(self, answer: StreamSetMessage | PageColumns, asked: set[str],
                      cursors: dict[str, tuple[int, int]]) -> tuple[list[StreamValues] | Sized, list[_Outcome]]:
        """The values of an answer past their streams' cursors, and per stream answered (once, and asked
        for): its webid, how many values it brought, how many are fresh, and its cursor after them (None
        if none has a usable time). In columns where the codec read the answer (array operations on the
        rows' times), else value by value."""
        if not isinstance(answer, StreamSetMessage):
            webids = answer.webids
            if len(set(webids)) == len(webids) and asked.issuperset(webids):
                cursor_us = np.array([cursors[webid][0] for webid in webids], np.int64)
                seen = np.array([cursors[webid][1] for webid in webids], np.int64)
                found = rows_after_cursors(answer.ts, answer.counts, cursor_us, seen)
                if found is not None:
                    stream_of, fresh = found
                    kept, _, last, at_last = moved_cursors(answer.ts, stream_of, fresh, cursor_us, seen)
                    outcomes = [(webid, items, k, (end, at) if k else None) for webid, items, k, end, at in zip(
                        webids, answer.counts.tolist(), kept.tolist(), last.tolist(), at_last.tolist(), strict=True)]
                    return answer.take(fresh), outcomes
            answer = channel_decoder.decode(answer.body)  # the codec read it: so does msgspec
        streams: list[StreamValues] = []
        outcomes = []
        done: set[str] = set()
        for stream in answer.items or ():
            webid = stream.web_id or ""
            if webid not in asked or webid in done:
                continue
            done.add(webid)
            items = stream.timed_values()
            values, cursor = after_cursor(items, *cursors[webid])
            streams.append(StreamValues(web_id=webid, name=stream.name, path=stream.path,
                                        units_abbreviation=stream.units_abbreviation, items=values))
            outcomes.append((webid, len(items), len(values), cursor))
        return streams, outcomes

    def _lost_crowded(self, webid: str, at_us: int, end_us: int) -> None:
        """More events at one time than one call may return: the rest of that gap cannot be read."""
        self.stats.lost_gaps += 1
        log.error("data_lost", reason=f"more than {MAX_ITEMS_PER_CALL:,} events at one timestamp", tags=1,
                  first=[webid], start=format_iso(at_us), end=format_iso(end_us))

    async def _send_page(self, values: list[StreamValues] | Sized) -> None:
        """Send a page (streams decoded by msgspec, or the decoder's columns) once fewer than PAGES_AHEAD
        sent ones wait for the flusher."""
        while len(self._ahead) >= PAGES_AHEAD:
            await self._ahead.popleft().wait()
        taken = trio.Event()
        self._ahead.append(taken)
        now = time.time_ns() // 1000
        if isinstance(values, list):
            await self.send_channel.send(GapValues(now, values, taken))
        else:
            await self.send_channel.send(GapValues(now, [], taken, values))

    async def _call(self, webids: list[str], start_us: int, end_time: str, max_count: int
                    ) -> StreamSetMessage | PageColumns:
        def count() -> None:
            self.stats.calls += 1

        answer = await read_recorded(self.api, webids, start_us, end_time, max_count, on_call=count,
                                     decode=self.decode)
        assert isinstance(answer, StreamSetMessage) or self.decode is not None
        return answer  # type: ignore[return-value]


async def read_recorded(api: PiWebApi, webids: list[str], start_us: int, end_time: str, max_count: int, *,
                        event: str = "gap_read_retried", on_call: Callable[[], None] | None = None,
                        decode: Callable[[bytes], Decoded | None] | None = None) -> StreamSetMessage | Decoded:
    """One ``streamsets/recorded`` call, retried with backoff (or the server's Retry-After) on 429/5xx,
    timeouts and lost connections, MAX_ATTEMPTS times in all; the gap filler's and the backfill's.
    ``decode``: see ``PiWebApi.recorded``."""
    backoff = Backoff(initial=0.5, maximum=30.0)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        if on_call is not None:
            on_call()
        try:
            return await api.recorded(webids, start_us, end_time, max_count, decode)
        except (RetryableError, ConnectError) as exc:
            if attempt == MAX_ATTEMPTS:
                raise
            hint = exc.retry_after if isinstance(exc, RetryableError) else None
            delay = hint if hint is not None else backoff.next_delay()
            log.warning(event, error=str(exc), attempt=attempt, retry_in=round(delay, 2))
            await trio.sleep(delay)
    raise AssertionError("unreachable")


def after_cursor(items: list[TimedValue], start_us: int, seen_at_start: int
                  ) -> tuple[list[TimedValue], tuple[int, int] | None]:
    """The items past a stream's cursor, and the cursor after them (last time, events seen at it)."""
    fresh: list[TimedValue] = []
    skipped = 0
    last_us: int | None = None
    at_last = 0
    for tv in items:
        try:
            ts = to_us(tv.timestamp) if tv.timestamp else None
        except ValueError:
            ts = None
        if ts is not None:
            if ts < start_us:
                continue
            if ts == start_us and skipped < seen_at_start:
                skipped += 1
                continue
            at_last = at_last + 1 if ts == last_us else 1
            last_us = ts
        fresh.append(tv)  # a value without a usable timestamp goes on, to be rejected and counted
    if last_us is None:
        return fresh, None
    if last_us == start_us:
        at_last += seen_at_start
    return fresh, (last_us, at_last)


def rows_after_cursors(ts: np.ndarray, counts: np.ndarray, cursor_us: np.ndarray, seen: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray] | None:
    """``after_cursor`` for every stream of a page in columns at once: each row's stream (the streams' rows
    follow one another, ``counts`` each) and whether it is past its stream's cursor (``cursor_us``, with
    the first ``seen`` events at it read already). None where a stream's times are out of order
    (``after_cursor`` keeps such values; the decoding path decides them)."""
    counts = counts.astype(np.int64)
    stream = np.repeat(np.arange(len(counts)), counts)
    if len(ts) > 1 and bool(np.any((ts[1:] < ts[:-1]) & (stream[1:] == stream[:-1]))):
        return None
    row_cursor = cursor_us[stream]
    at = ts == row_cursor
    # Events at the cursor come first in their stream (times in order): the first ``seen`` are read.
    at_rank = np.cumsum(at) - 1
    starts = np.cumsum(counts) - counts
    at_before = np.concatenate([[0], np.cumsum(at)])[starts]
    fresh = (ts > row_cursor) | (at & (at_rank - at_before[stream] >= seen[stream]))
    return stream, fresh


def moved_cursors(ts: np.ndarray, stream: np.ndarray, keep: np.ndarray, cursor_us: np.ndarray, seen: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per stream, after taking the rows ``keep`` (of ``rows_after_cursors``): how many, the first and last
    of their times, and the events at that last time read in all (``after_cursor``'s new cursor). The
    times and counts of a stream without such rows are 0."""
    n = len(cursor_us)
    kept = np.bincount(stream[keep], minlength=n)
    kept_rows = np.flatnonzero(keep)
    kept_stream = stream[kept_rows]  # ascending: streams follow one another
    with_rows = np.unique(kept_stream)
    first = np.zeros(n, np.int64)
    last = np.zeros(n, np.int64)
    first[with_rows] = ts[kept_rows[np.searchsorted(kept_stream, with_rows, "left")]]
    last[with_rows] = ts[kept_rows[np.searchsorted(kept_stream, with_rows, "right") - 1]]
    at_last = np.bincount(stream[keep & (ts == last[stream])], minlength=n)
    at_last = np.where(kept > 0, at_last + np.where(last == cursor_us, seen, 0), 0)
    return kept, first, last, at_last
