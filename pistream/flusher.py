"""The flush policy: collect decoded messages into the column buffer and hand a batch to the writer when
it holds ``max_rows`` rows or its oldest row is ``max_age`` seconds old, and once more at shutdown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import structlog
import trio

from .buffer import ColumnBuffer, Flush
from .messages import StreamSetMessage

log = structlog.get_logger(__name__)


@dataclass
class FlushStats:
    values_received: int = 0
    repeats_dropped: int = 0
    rejected: int = 0
    flushes: int = 0


class Flusher:
    """Owns the buffer; sending a batch blocks while the writer is busy, which is the backpressure."""

    def __init__(
        self,
        buffer: ColumnBuffer,
        receive_channel: trio.MemoryReceiveChannel[tuple[int, StreamSetMessage]],
        send_channel: trio.MemorySendChannel[Flush],
        *,
        max_rows: int,
        max_age: float,
    ):
        self.buffer = buffer
        self.receive_channel = receive_channel
        self.send_channel = send_channel
        self.max_rows = max_rows
        self.max_age = max_age
        self.stats = FlushStats()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until every reader has closed its end: buffer, flush on size or age; then flush the rest."""
        task_status.started()
        async with self.receive_channel, self.send_channel:
            deadline = math.inf
            while True:
                with trio.move_on_at(deadline):
                    try:
                        received_us, message = await self.receive_channel.receive()
                    except trio.EndOfChannel:
                        break
                    was_empty = len(self.buffer) == 0
                    for stream in message.items or ():
                        self.stats.values_received += len(stream.timed_values())
                        self.buffer.add_stream(stream, received_us)
                    if was_empty and len(self.buffer):
                        deadline = trio.current_time() + self.max_age
                    if len(self.buffer) < self.max_rows:
                        continue
                await self._flush()
                deadline = math.inf
            await self._flush()

    async def _flush(self) -> None:
        flush = self.buffer.take()
        if flush is None:
            return
        self.stats.flushes += 1
        self.stats.repeats_dropped += flush.repeats_dropped
        self.stats.rejected += flush.rejected
        await self.send_channel.send(flush)
