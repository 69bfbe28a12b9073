"""History pages into batches: each page's values go through the column buffer (the live path's
conversion and its exactly-once filter, which here only drops an event the archive lists twice), large
batches spill to data files as they fill, and a batch is committed every ``max_rows`` values (or
``max_bytes``, or ``max_age`` seconds after it began) with the progress of the tags it touched.
"""

from __future__ import annotations

import math

import numpy as np
import trio

from ..pi.flow import Live
from ..pi.history import HistoryPage, TagProgress
from ..pi.messages import StreamSetMessage
from .buffer import ColumnBuffer, Flush, Spill
from .columns import LiveColumns
from .dedup import EventFilter
from .flusher import SPILL_ROWS, FlushStats
from .opengaps import OpenGaps
from .progress import HistoryFlush
from .schema import BUFFER_SCHEMA


class HistoryFlusher:
    """Owns the buffer; sending a batch blocks while the writer is busy (backpressure to the reader)."""

    def __init__(self, buffer: ColumnBuffer, receive_channel: trio.MemoryReceiveChannel[HistoryPage],
                 send_channel: trio.MemorySendChannel[Flush | Spill], *, max_rows: int, max_bytes: int,
                 max_age: float = 60.0, spill_rows: int = SPILL_ROWS):
        self.buffer = buffer
        self.receive_channel = receive_channel
        self.send_channel = send_channel
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.spill_rows = spill_rows
        self.progress: dict[str, TagProgress] = {}  # of the tags the batch being gathered touched
        self.stats = FlushStats()  # the live flusher's counters: the same meaning

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self.receive_channel, self.send_channel:
            deadline = math.inf
            while True:
                with trio.move_on_at(deadline):
                    try:
                        page = await self.receive_channel.receive()
                    except trio.EndOfChannel:
                        break
                    self._add(page)
                    if deadline == math.inf:
                        deadline = trio.current_time() + self.max_age
                if len(self.buffer) >= self.max_rows or self.buffer.nbytes >= self.max_bytes \
                        or trio.current_time() >= deadline:
                    await self._flush()
                    deadline = math.inf
                elif self.buffer.held_rows >= self.spill_rows:
                    spill = self.buffer.spill()
                    if spill is not None:
                        await self.send_channel.send(spill)
            await self._flush()

    def _add(self, page: HistoryPage) -> None:
        if page.streams:
            count, _ = self.buffer.add_live_batch([Live(page.received_us, StreamSetMessage(items=page.streams))])
            self.stats.values_received += count
        if page.columns is not None:
            assert isinstance(page.columns, LiveColumns)
            self.buffer.add_columns(page.columns)
            self.stats.values_received += len(page.columns)
        self.progress.update(page.progress)

    async def _flush(self) -> None:
        """The batch with its tags' progress; a batch without rows too when tags moved on (done, empty):
        its commit records their progress."""
        if not self.progress:
            return
        flush = self.buffer.take() or _empty_flush(self.buffer.filter)
        flush.recent = []  # pages cannot repeat an event: no recent events to keep, in the batch or after it
        self.buffer.filter.forget_recent()
        self.stats.flushes += 1
        self.stats.repeats_dropped += flush.repeats_dropped
        self.stats.rejected += flush.rejected
        progress, self.progress = self.progress, {}
        await self.send_channel.send(HistoryFlush.of(flush, progress))


def _empty_flush(event_filter: EventFilter) -> Flush:
    return Flush(BUFFER_SCHEMA.empty_table(), 0, 0, event_filter.floors.only(np.zeros(0, np.int64)), [],
                 OpenGaps.empty(event_filter.floors.tags))
