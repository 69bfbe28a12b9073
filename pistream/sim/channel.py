"""Channel sessions: what a ``streams/{webId}/channel`` or ``streamsets/channel`` WebSocket sends, and when.

Every ``poll_interval`` one message holds, per subscribed stream, all model events with
``last_sent < ts <= now``; streams without change are left out. Because each poll covers the interval since
the previous one, a slow client just gets bigger messages later, never gaps or repeats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from pistream.sim.model import SimEvent, SimModel, SimTag
from pistream.sim.payloads import ENCODER, StreamItems, stream_values
from pistream.sim.websocket import ServerWebSocket, WebSocketClosed

_EMPTY_MESSAGE = ENCODER.encode(StreamItems(Links={}, Items=[]))


@dataclass(slots=True)
class EmittedRange:
    """What channels actually sent for one WebID: the tests compare tables against this and the model."""

    first_us: int
    last_us: int
    count: int


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """A validated channel request."""

    tags: tuple[SimTag, ...]
    include_initial_values: bool = False
    heartbeat_rate: int = 0


Batch = list[tuple[SimTag, list[SimEvent]]]


class ChannelSession:
    """One open channel: pushes model events to one WebSocket until the client leaves or we are cancelled."""

    def __init__(
        self,
        model: SimModel,
        spec: ChannelSpec,
        ws: ServerWebSocket,
        *,
        now_us: Callable[[], int],
        poll_interval: float,
        emitted: dict[str, EmittedRange],
    ) -> None:
        self._model = model
        self._spec = spec
        self._ws = ws
        self._now_us = now_us
        self._poll_interval = poll_interval
        self._emitted = emitted
        self.messages_sent = 0

    async def run(self) -> None:
        """Pump messages while a reader task answers pings; returns when either side ends the channel."""
        async with trio.open_nursery() as nursery:

            async def read_then_stop() -> None:
                await self._ws.run_reader()
                nursery.cancel_scope.cancel()

            nursery.start_soon(read_then_stop)
            try:
                await self._pump()
            except WebSocketClosed:
                pass
            nursery.cancel_scope.cancel()

    async def close(self, code: int = 1001) -> None:
        """End the channel from the server side (close handshake); ``run`` then returns."""
        await self._ws.aclose(code)

    async def _pump(self) -> None:
        spec = self._spec
        last_us = self._now_us()
        if spec.include_initial_values:
            await self._send_initial(last_us)
        quiet_polls = 0
        next_poll = trio.current_time() + self._poll_interval
        while True:
            await trio.sleep_until(next_poll)
            # Skip missed ticks instead of bursting when the send took longer than one interval.
            next_poll = max(next_poll + self._poll_interval, trio.current_time())
            now_us = max(self._now_us(), last_us)  # a wall clock stepping back must not resend
            items = self.collect(last_us, now_us)
            last_us = now_us
            if items:
                await self._send(items)
                quiet_polls = 0
            else:
                quiet_polls += 1
                if spec.heartbeat_rate and quiet_polls >= spec.heartbeat_rate:
                    await self._ws.send_text(_EMPTY_MESSAGE)
                    self.messages_sent += 1
                    quiet_polls = 0

    def collect(self, after_us: int, upto_us: int) -> Batch:
        """Per subscribed stream with events in ``(after_us, upto_us]``: the tag and its events."""
        events_of = self._model.events
        batch = []
        for tag in self._spec.tags:
            events = events_of(tag, after_us + 1, upto_us)
            if events:
                batch.append((tag, events))
        return batch

    async def _send_initial(self, now_us: int) -> None:
        latest = self._model.latest
        batch = []
        for tag in self._spec.tags:
            event = latest(tag, now_us)
            if event is not None:
                batch.append((tag, [event]))
        await self._send(batch)

    async def _send(self, batch: Batch) -> None:
        message = StreamItems(Links={}, Items=[stream_values(tag, events) for tag, events in batch])
        await self._ws.send_text(ENCODER.encode(message))
        self.messages_sent += 1
        record_emitted(self._emitted, batch)


def record_emitted(emitted: dict[str, EmittedRange], batch: Batch) -> None:
    """Add what was just sent to ``emitted`` (several channels on one WebID add up)."""
    for tag, events in batch:
        first = min(e.timestamp_us for e in events)
        last = max(e.timestamp_us for e in events)
        entry = emitted.get(tag.webid)
        if entry is None:
            emitted[tag.webid] = EmittedRange(first, last, len(events))
        else:
            entry.first_us = min(entry.first_us, first)
            entry.last_us = max(entry.last_us, last)
            entry.count += len(events)
