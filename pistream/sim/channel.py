"""Channel sessions: what a ``streams/{webId}/channel`` or ``streamsets/channel`` WebSocket sends, and when.

Every ``poll_interval`` one message holds, per subscribed stream, all model events with
``last_sent < ts <= now``; streams without change are left out. Because each poll covers the interval since
the previous one, a slow client just gets bigger messages later, never gaps or repeats — unless ``Faults``
ask for shuffled, late or repeated delivery, or for silence, slowness or a cut connection.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import trio

from pistream.sim.faults import Faults
from pistream.sim.model import SimEvent, SimModel, SimTag
from pistream.sim.payloads import ENCODER, StreamItems, Wire
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
        faults: Faults | None = None,
        wire: Wire | None = None,
    ) -> None:
        self._model = model
        self._spec = spec
        self._ws = ws
        self._now_us = now_us
        self._poll_interval = poll_interval
        self._emitted = emitted
        self._faults = faults or Faults()
        self._wire = wire or Wire()
        self._rng: random.Random | None = None
        self._late: dict[SimTag, list[SimEvent]] = {}  # held back for the next message
        self._repeat: dict[SimTag, SimEvent] = {}  # to send again at the start of the next message
        self.messages_sent = 0

    @property
    def spec(self) -> ChannelSpec:
        return self._spec

    async def run(self) -> None:
        """Pump messages while a reader task answers pings; returns when either side ends the channel."""
        try:
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
        finally:
            for tag, events in self._late.items():
                self._faults.late_lost.extend((tag.webid, e.timestamp_us) for e in events)
            self._late.clear()

    async def close(self, code: int = 1001) -> None:
        """End the channel from the server side (close handshake); ``run`` then returns."""
        await self._ws.aclose(code)

    def kill(self, *, reset: bool = True) -> None:
        """Cut the connection without a close frame (see ``Faults.kill_channels``)."""
        self._ws.abort(reset=reset)

    def silence(self, seconds: float) -> None:
        """Send nothing (no data, heartbeat or pong) for ``seconds`` from now."""
        self._ws.mute_until = max(self._ws.mute_until, trio.current_time() + seconds)

    async def _pump(self) -> None:
        spec = self._spec
        ws = self._ws
        interval = self._poll_interval
        last_us = self._now_us()
        if spec.include_initial_values:
            await self._send_initial(last_us)
        quiet_polls = 0
        last_message = trio.current_time()
        next_poll = last_message + interval
        while True:
            await trio.sleep_until(next_poll)
            await ws.wait_unmuted()  # values of a silent time are collected afterwards, in one message
            now_us = max(self._now_us(), last_us)  # a wall clock stepping back must not resend
            batch = self.collect(last_us, now_us)
            last_us = now_us
            if batch or self._late or self._repeat:
                sent = await self._send(batch)
            else:
                sent = False
            if sent:
                quiet_polls = 0
                last_message = trio.current_time()
            else:
                quiet_polls += 1
                if spec.heartbeat_rate and quiet_polls >= spec.heartbeat_rate:
                    await ws.send_text(_EMPTY_MESSAGE)
                    self.messages_sent += 1
                    quiet_polls = 0
                    last_message = trio.current_time()
            # Skip missed ticks instead of bursting when the send took longer than one interval.
            next_poll = max(
                next_poll + interval, trio.current_time(), last_message + self._faults.message_delay
            )

    def collect(self, after_us: int, upto_us: int) -> Batch:
        """Per subscribed stream with events in ``(after_us, upto_us]``: the tag and its events."""
        events_of = self._model.events
        retired = self._model.retired  # deleted points: no more values
        batch = []
        for tag in self._spec.tags:
            if retired and tag.webid in retired:
                continue
            events = events_of(tag, after_us + 1, upto_us)
            if events:
                batch.append((tag, events))
        return batch

    async def _send_initial(self, now_us: int) -> None:
        latest = self._model.latest
        batch = []
        for tag in self._spec.tags:
            if not self._model.is_live(tag):
                continue
            event = latest(tag, now_us)
            if event is not None:
                batch.append((tag, [event]))
        await self._send(batch)

    def _arrange(self, batch: Batch) -> tuple[Batch, Batch, Batch]:
        """Apply the delivery faults: (what the message lists, in order; what it sends for the first time;
        the late events among those)."""
        faults = self._faults
        late, self._late = self._late, {}
        repeat, self._repeat = self._repeat, {}
        fresh: dict[SimTag, list[SimEvent]] = {}
        for tag, events in batch:
            now = events
            if faults.late_fraction > 0:
                now = []
                held: list[SimEvent] = []
                for event in events:
                    (held if faults.is_late(tag, event) else now).append(event)
                if held:
                    self._late[tag] = held
            if now:
                fresh[tag] = now
        for tag, events in late.items():  # one poll late, after the newer events
            fresh.setdefault(tag, []).extend(events)
        message: dict[SimTag, list[SimEvent]] = {}
        for tag, event in repeat.items():
            message[tag] = [event]
        for tag, events in fresh.items():
            message.setdefault(tag, []).extend(events)
            if faults.repeat_last > 0:
                newest = max(events, key=lambda e: e.timestamp_us)
                if faults.repeats(tag, newest):
                    self._repeat[tag] = newest
        items = list(message.items())
        if faults.shuffle:
            if self._rng is None:
                self._rng = faults.session_rng()
            self._rng.shuffle(items)
            for _, events in items:
                self._rng.shuffle(events)
        return items, list(fresh.items()), list(late.items())

    async def _send(self, batch: Batch) -> bool:
        """Send one message for ``batch`` (after the delivery faults); False if it came out empty."""
        fresh = batch
        late: Batch = []
        if self._faults.reorders or self._late or self._repeat:
            batch, fresh, late = self._arrange(batch)
            if not batch:
                return False
        wire = self._wire
        message = StreamItems(
            Links={}, Items=[wire.stream_values(tag, events, channel=True) for tag, events in batch]
        )
        try:
            await self._ws.send_text(ENCODER.encode(message))
        except BaseException:
            for tag, events in late:  # still owed: ``run`` reports them in ``late_lost``
                self._late.setdefault(tag, []).extend(events)
            raise
        self.messages_sent += 1
        record_emitted(self._emitted, fresh)
        return True


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
