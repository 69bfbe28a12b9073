"""The flush policy: collect decoded messages into the column buffer and hand a batch to the writer when
it holds ``max_rows`` rows or ``max_bytes`` bytes of columns, or its oldest row is ``max_age`` seconds
old, or nothing arrived for ``idle_seconds`` after a burst of at least ``idle_rows`` values (a first load or a
backlog that ended: committed now, not at the age limit), and once more at shutdown. A batch larger than
``spill_rows`` goes to the writer in parts as it fills (``Spill``), written to data files ahead of the one
commit that adds them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from operator import attrgetter

import structlog
import trio

from ..pi.flow import Connected, GapDone, GapRequests, GapValues, Incoming, Live, LiveBatch
from ..pi.gapfill import GapQueue
from .buffer import ColumnBuffer, Flush, Spill
from .columns import LiveColumns
from .heap import release_free_memory

log = structlog.get_logger(__name__)


@dataclass
class FlushStats:
    values_received: int = 0
    repeats_dropped: int = 0
    rejected: int = 0
    flushes: int = 0


_items = attrgetter("items")
LIVE_BATCH = 8192  # values gathered before the bulk path takes them in (its cost per call is ~100 us)
LIVE_WAIT = 0.05  # seconds of quiet after which gathered messages are taken in anyway. 2 ms made ~560-row
# chunks at 100,000 values/s: 3.5 -> 2.2 CPU s per million values, peak RSS -30 MB (fewer, larger allocations)
# Rows held before they are spilled to data files ahead of the commit: a 1 M-row batch (10 s at 100,000
# values/s) was ~57 MB of columns in memory plus its Parquet writing at the commit.
SPILL_ROWS = 1 << 18
# A burst of this many values is committed once the stream pauses (``idle_seconds``). Steady streams below
# ~13,000 values/s never gather this many between two pauses within the 5 s age: they keep the age cadence.
IDLE_FLUSH_ROWS = 1 << 16
RAW_BYTES_PER_VALUE = 100  # a low guess (values take ~150-250 bytes of JSON): drains stop early, not late
# glibc's heap is trimmed once this many values were taken in since the last trim, at most every TRIM_SECONDS:
# the frames they came in (~150-250 bytes a value, malloc'd) are freed by then. The writer trims after each
# spill and commit only; after a restart at 100,000 tags, the flood of first values and gap pages between two
# of those left ~20 MB of freed frames resident at the peak. A trim takes 2-4 ms.
TRIM_VALUES = 1 << 17
TRIM_SECONDS = 0.25


def _values(item: Incoming) -> int:
    """How many values a live message carries (cheaply: streams with a single ``Value`` count 0)."""
    if isinstance(item, Live):
        if item.message is None:
            return len(item.frame or "") // RAW_BYTES_PER_VALUE
        return sum(map(len, filter(None, map(_items, item.message.items or ()))))
    if isinstance(item, LiveBatch):
        return sum(map(_values, item.messages))
    return 0


class Flusher:
    """Owns the buffer; sending a batch blocks while the writer is busy, which is the backpressure."""

    def __init__(
        self,
        buffer: ColumnBuffer,
        receive_channel: trio.MemoryReceiveChannel[Incoming],
        send_channel: trio.MemorySendChannel[Flush | Spill],
        *,
        max_rows: int,
        max_age: float,
        max_bytes: int = 1 << 62,
        spill_rows: int | None = None,
        gap_queue: GapQueue | None = None,
        idle_seconds: float = 0.0,
        idle_rows: int = IDLE_FLUSH_ROWS,
    ):
        self.buffer = buffer
        self.receive_channel = receive_channel
        self.send_channel = send_channel
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.spill_rows = SPILL_ROWS if spill_rows is None else spill_rows
        self.gap_queue = gap_queue
        self.idle_seconds = idle_seconds  # 0: no early commit when the stream pauses
        self.idle_rows = idle_rows
        self._size_seen = 0  # rows buffered or pending when last looked at
        self._grew_at = -math.inf  # when they last grew
        self._burst_rows = 0  # values since the last pause of idle_seconds, across commits
        self.stats = FlushStats()
        self._live: list[Live] = []  # live messages not taken in yet (see _take_in)
        self._live_values = 0
        self._untrimmed = 0  # values taken in since the heap was last trimmed
        self._trimmed_at = -math.inf

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until every reader has closed its end: buffer, flush on size or age; then flush the rest."""
        task_status.started()
        async with self.receive_channel, self.send_channel:
            deadline = math.inf
            while True:
                items: list[Incoming] = []  # the last ones' frames are freed here
                now = trio.current_time()
                if self._untrimmed >= TRIM_VALUES and now - self._trimmed_at >= TRIM_SECONDS:
                    release_free_memory()
                    self._untrimmed, self._trimmed_at = 0, now
                wait_until = min(deadline, now + LIVE_WAIT) if self._live else deadline
                idle_at = self._idle_flush_at(now)
                with trio.move_on_at(min(wait_until, idle_at)):  # only the wait: what arrived is always taken in
                    try:
                        items.append(await self.receive_channel.receive())
                    except trio.EndOfChannel:
                        break
                if items:
                    self._drain(items)
                    self._take_in(items)
                else:
                    self._take_in_live()  # the queue went quiet: what is pending goes in now
                now = trio.current_time()
                if deadline == math.inf and (self._live or len(self.buffer)):
                    deadline = now + self.max_age
                if self._full() or now >= deadline or now >= self._idle_flush_at(now):
                    await self._flush()
                    deadline = math.inf
                elif self.buffer.held_rows >= self.spill_rows:
                    await self._spill()
            await self._flush()

    def _idle_flush_at(self, now: float) -> float:
        """When a pause commits the batch: ``idle_seconds`` after it last grew (heartbeats and other
        value-less messages do not count), if the burst it ends was big enough to be worth a commit of its
        own. The burst spans commits, so the rest of a burst that filled a batch does not wait for the age."""
        size = len(self.buffer) + self._live_values
        if size > self._size_seen:
            if now - self._grew_at >= self.idle_seconds:
                self._burst_rows = 0  # the values after a pause start a new burst
            self._burst_rows += size - self._size_seen
            self._grew_at = now
        self._size_seen = size
        if self.idle_seconds <= 0 or not size or self._burst_rows < self.idle_rows:
            return math.inf
        return self._grew_at + self.idle_seconds

    def _full(self) -> bool:
        return len(self.buffer) + self._live_values >= self.max_rows or self.buffer.nbytes >= self.max_bytes

    def _drain(self, items: list[Incoming]) -> None:
        """Whatever else is waiting, up to the flush size: many messages go through the buffer at once."""
        room = self.max_rows - len(self.buffer) - self._live_values - _values(items[0])
        while room > 0:
            try:
                item = self.receive_channel.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            items.append(item)
            room -= _values(item)

    def _take_in(self, items: list[Incoming]) -> None:
        """In order. Live messages gather until LIVE_BATCH values (or a quiet moment, or anything else
        arriving, or a flush): the bulk path's cost per call is then shared by many values."""
        for item in items:
            if isinstance(item, Live | LiveBatch):
                self._live.extend(item.messages if isinstance(item, LiveBatch) else (item,))
                values = _values(item)
                self._live_values += values
                self._untrimmed += values
                if self._live_values >= LIVE_BATCH:
                    self._take_in_live()
                continue
            self._take_in_live()
            self._take_in_other(item)

    def _take_in_live(self) -> None:
        if not self._live:
            return
        live, self._live, self._live_values = self._live, [], 0
        try:
            count, gaps = self.buffer.add_live_batch(live)
        except Exception:  # a frame no decoding path foresaw: the others go on, that one is reported
            if len(live) == 1:
                self._malformed(live[0])
                return
            count, gaps = 0, GapRequests()
            for item in live:  # one by one, so that only the frame at fault is left out
                try:
                    one, item_gaps = self.buffer.add_live_batch([item])
                except Exception:
                    self._malformed(item)
                    continue
                count += one
                gaps.extend(item_gaps)
        self.stats.values_received += count
        if self.gap_queue is not None:
            self.gap_queue.put_all(gaps)

    def _malformed(self, item: Live) -> None:
        """Counted and logged with its channel and size (never its text); the stream goes on."""
        self.buffer.malformed += 1
        size = len(item.frame) if item.frame is not None else None
        log.exception("frame_malformed", channel=item.channel, size=size)

    def _take_in_other(self, item: Incoming) -> None:
        if isinstance(item, GapValues):
            self.stats.values_received += sum(len(stream.timed_values()) for stream in item.streams)
            self.buffer.add_gaps(item.streams, item.received_us)
            if item.columns is not None:
                assert isinstance(item.columns, LiveColumns)
                self.stats.values_received += len(item.columns)
                self._untrimmed += len(item.columns)
                self.buffer.add_gap_columns(item.columns)
            if item.taken is not None:
                item.taken.set()
        elif isinstance(item, Connected):
            if self.gap_queue is not None:
                self.buffer.connected(list(item.webids))
        elif isinstance(item, GapDone):
            self.buffer.filter.gaps_done(item.requests)

    async def _spill(self) -> None:
        spill = self.buffer.spill()
        if spill is not None:
            await self.send_channel.send(spill)

    async def _flush(self) -> None:
        self._take_in_live()
        flush = self.buffer.take()
        self._size_seen = 0
        if flush is None:
            return
        self.stats.flushes += 1
        self.stats.repeats_dropped += flush.repeats_dropped
        self.stats.rejected += flush.rejected
        await self.send_channel.send(flush)
