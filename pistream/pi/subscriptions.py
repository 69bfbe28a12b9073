"""The channel readers of the current tag set, and changes to that set while they stream.

The tags are sharded into channels (``shard_webids``), one ``ChannelReader`` each, all in one nursery this
module owns, together with the send end of the channel to the flusher: it hands each reader a clone, and
closes its own when it stops, after its readers. A change of the tag set touches as few channels as it can:

- a channel that loses tags is closed, and opened again with the tags it keeps (its reconnect reads their
  gap back, as after any reconnect); added tags fill the room it freed first;
- the other added tags get new channels of their own;
- every other channel keeps streaming, untouched.

A closed channel's task has ended before its replacement starts, so nothing it read can reach the flusher
after the replacement's ``Connected``: the gap window of a kept tag starts and ends in order.

A channel the server refuses for good (``ChannelRefusedError``: a 404 when one of its points was deleted
since it was opened looks the same as channels being disabled) first asks for a rediscovery
(``on_refused``); if that replaces the channel, the stream goes on, otherwise the refusal stands.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import structlog
import trio

from ..errors import ChannelRefusedError
from .channel import ChannelReader
from .flow import Incoming

log = structlog.get_logger(__name__)

MakeReader = Callable[[str, list[str], trio.MemorySendChannel[Incoming]], ChannelReader]
Shard = Callable[[Sequence[str]], list[list[str]]]


@dataclass
class _Running:
    scope: trio.CancelScope
    done: trio.Event


class Subscriptions:
    """Owns the readers: ``await nursery.start(subs.run, webids)``, then ``await subs.change(added, removed)``.

    ``make_reader(name, webids, send_channel)`` builds a reader (the composition root knows the options);
    ``shard(webids)`` splits webIds into channel-sized lists."""

    def __init__(self, send_channel: trio.MemorySendChannel[Incoming], make_reader: MakeReader, shard: Shard):
        self.send_channel = send_channel
        self._make_reader = make_reader
        self._shard = shard
        self.readers: list[ChannelReader] = []  # the live ones, changed in place (the stats read this list)
        self._running: dict[int, _Running] = {}  # by id(reader)
        self._nursery: trio.Nursery | None = None
        self._opened = 0  # channels opened so far: names channel-0, channel-1, ...
        # Counters of the readers closed by changes, so that the totals never go back.
        self.retired_reconnects = 0
        self.retired_pauses = 0
        # Runs a rediscovery and returns when it is done (set by ``Rediscovery``); None: refusals stand.
        self.on_refused: Callable[[], Awaitable[None]] | None = None

    @property
    def tag_count(self) -> int:
        return sum(len(r.webids) for r in self.readers)

    @property
    def reconnects(self) -> int:
        return self.retired_reconnects + sum(max(r.stats.connects - 1, 0) for r in self.readers)

    @property
    def pauses(self) -> int:
        return self.retired_pauses + sum(r.stats.pauses for r in self.readers)

    def webids(self) -> set[str]:
        """Every subscribed webId."""
        return {w for r in self.readers for w in r.webids}

    async def run(self, webids: Sequence[str], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Open a channel per shard of ``webids`` and keep the readers running until cancelled."""
        async with self.send_channel, trio.open_nursery() as nursery:
            self._nursery = nursery
            for shard in self._shard(webids):
                self._open(shard)
            del webids  # the readers hold them
            task_status.started()
            await trio.sleep_forever()

    async def change(self, added: Iterable[str], removed: set[str]) -> tuple[int, int]:
        """Subscribe ``added``, unsubscribe ``removed``; returns (channels opened, channels closed)."""
        assert self._nursery is not None, "run() first"
        pool = [w for w in added if w not in removed]
        affected = [r for r in self.readers if removed and not removed.isdisjoint(r.webids)]
        for reader in affected:
            await self._close(reader)
        opened = 0
        for reader in affected:
            keep = [w for w in reader.webids if w not in removed]
            if not keep:
                continue
            first = self._shard(keep + pool)[0]  # all of ``keep`` (it fitted before), then what else fits
            pool = pool[len(first) - len(keep):]
            self._open(first)
            opened += 1
        for shard in self._shard(pool) if pool else ():
            self._open(shard)
            opened += 1
        return opened, len(affected)

    def _open(self, webids: list[str]) -> None:
        assert self._nursery is not None
        reader = self._make_reader(f"channel-{self._opened}", webids, self.send_channel.clone())
        self._opened += 1
        running = _Running(trio.CancelScope(), trio.Event())
        self._running[id(reader)] = running
        self.readers.append(reader)
        self._nursery.start_soon(self._run_reader, reader, running)

    async def _run_reader(self, reader: ChannelReader, running: _Running) -> None:
        try:
            with running.scope:
                try:
                    await reader.run()
                except ChannelRefusedError as exc:
                    if self.on_refused is None:
                        raise
                    log.warning("channel_refused", channel=reader.name, error=str(exc),
                                note="a subscribed point may have been deleted: rediscovering the tags")
                    await self.on_refused()  # cancels this task if it replaces the channel
                    raise
        finally:
            running.done.set()

    async def _close(self, reader: ChannelReader) -> None:
        """Stop a reader and wait until its task has ended (its send end is closed then)."""
        running = self._running.pop(id(reader))
        running.scope.cancel()
        await running.done.wait()
        self.readers.remove(reader)
        self.retired_reconnects += max(reader.stats.connects - 1, 0)
        self.retired_pauses += reader.stats.pauses
        log.info("channel_closed", channel=reader.name, streams=len(reader.webids), reason="tag set changed")
