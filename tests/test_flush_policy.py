"""The flush policy under a virtual clock: size, age and shutdown each trigger exactly one batch."""

import pytest
import trio
import trio.testing

from pistream.pi.flow import Connected, Live
from pistream.pi.gapfill import GapQueue
from pistream.pi.messages import StreamSetMessage, StreamValues, TimedValue
from pistream.stream.buffer import ColumnBuffer, StreamInfo
from pistream.stream.flusher import Flusher
from pistream.timeutil import parse_iso_us


def message(n: int, start: int = 0) -> StreamSetMessage:
    values = [TimedValue(timestamp=f"2024-01-01T00:00:{(start + i) % 60:02d}.{start + i:06d}Z", value=float(i))
              for i in range(n)]
    return StreamSetMessage(items=[StreamValues(web_id="W", path="\\\\S\\T", items=values)])


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def run_flusher(script, *, max_rows: int, max_age: float, max_bytes: int = 1 << 40, **policy):
    """Feed messages per ``script`` and return (virtual time, rows) of each batch the writer got."""
    msg_send, msg_recv = trio.open_memory_channel(10)
    flush_send, flush_recv = trio.open_memory_channel(1)
    buffer = ColumnBuffer({"W": StreamInfo("\\\\S\\T", "W")})  # a known stream: the bulk path
    flusher = Flusher(buffer, msg_recv, flush_send, max_rows=max_rows, max_age=max_age, max_bytes=max_bytes,
                      **policy)
    got = []
    start = trio.current_time()

    async def writer():
        async with flush_recv:
            async for flush in flush_recv:
                got.append((round(trio.current_time() - start, 3), flush.batch.num_rows))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await nursery.start(flusher.run)
        async with msg_send:
            await script(msg_send)
    return got, flusher.stats


async def test_flush_on_age_counts_from_the_oldest_buffered_value(autojump_clock):
    async def script(send):
        await trio.sleep(1)
        await send.send(Live(0, message(3)))
        await trio.sleep(2)
        await send.send(Live(0, message(2, start=10)))
        await trio.sleep(10)

    got, stats = await run_flusher(script, max_rows=1000, max_age=5)
    assert got == [(6.0, 5)]
    assert stats.values_received == 5 and stats.flushes == 1


async def test_flush_on_size_then_remainder_at_shutdown(autojump_clock):
    async def script(send):
        for i in range(5):
            await send.send(Live(0, message(4, start=i * 4)))

    got, _ = await run_flusher(script, max_rows=8, max_age=60)
    assert [rows for _, rows in got] == [8, 8, 4]
    assert all(t == 0 for t, _ in got)


async def test_a_big_batch_commits_once_the_stream_pauses_heartbeats_aside(autojump_clock):
    async def script(send):
        await trio.sleep(1)
        for i in range(4):  # a burst: 12 values within 0.3 s
            await send.send(Live(0, message(3, start=i * 3)))
            await trio.sleep(0.1)
        for _ in range(5):  # then only heartbeats (messages without values), every 0.4 s
            await send.send(Live(0, StreamSetMessage(items=[])))
            await trio.sleep(0.4)
        await trio.sleep(10)

    got, _ = await run_flusher(script, max_rows=1000, max_age=5, idle_seconds=1.0, idle_rows=10)
    # the last values came at 1.3 s: committed 1 s later, long before the age (6 s)
    assert got == [(2.3, 12)]


async def test_the_rest_of_a_burst_that_filled_a_batch_commits_at_the_pause_too(autojump_clock):
    async def script(send):
        for i in range(5):  # 15 values within 0.4 s: 10 fill a batch, 5 are left
            await send.send(Live(0, message(3, start=i * 3)))
            await trio.sleep(0.1)
        await trio.sleep(10)

    got, _ = await run_flusher(script, max_rows=10, max_age=5, idle_seconds=1.0, idle_rows=10)
    assert got == [(0.3, 12), (1.4, 3)]  # the rest 1 s after the last values, not at the age


async def test_a_pause_leaves_a_small_batch_and_a_steady_stream_to_the_age(autojump_clock):
    async def small(send):
        await send.send(Live(0, message(3)))
        await trio.sleep(10)

    got, _ = await run_flusher(small, max_rows=1000, max_age=5, idle_seconds=1.0, idle_rows=10)
    assert got == [(5.0, 3)]

    async def steady(send):  # 4 values every 0.8 s: never a 1 s pause
        for i in range(8):
            await send.send(Live(0, message(4, start=i * 4)))
            await trio.sleep(0.8)

    got, _ = await run_flusher(steady, max_rows=1000, max_age=5, idle_seconds=1.0, idle_rows=10)
    assert got == [(5.0, 28), (6.4, 4)]  # the age, then the rest at the stop

    got, _ = await run_flusher(small, max_rows=1000, max_age=5, idle_seconds=0, idle_rows=1)
    assert got == [(5.0, 3)]  # 0 turns it off


async def test_no_batch_when_nothing_arrives(autojump_clock):
    async def script(send):
        await trio.sleep(100)

    got, _ = await run_flusher(script, max_rows=10, max_age=1)
    assert got == []


async def test_flush_on_bytes_before_rows_or_age(autojump_clock):
    one_message = ColumnBuffer({"W": StreamInfo("\\\\S\\T", "W")})
    one_message.add_live_batch([Live(0, message(4))])
    size = one_message.nbytes
    assert size > 0 and len(one_message) == 4 and not one_message.tag_webid  # measured on the bulk path

    async def script(send):
        for i in range(5):
            await send.send(Live(0, message(4, start=i * 4)))
            await trio.sleep(1)

    got, _ = await run_flusher(script, max_rows=1000, max_age=60, max_bytes=2 * size)
    assert [rows for _, rows in got] == [8, 8, 4]  # two messages' bytes each, the rest at shutdown


async def test_gathered_live_messages_go_in_before_a_reconnect_that_follows_them(autojump_clock):
    """A value received before a reconnect raises the floor the gap is read from; taken in after the
    Connected marker it would instead end the gap window early."""
    msg_send, msg_recv = trio.open_memory_channel(10)
    flush_send, flush_recv = trio.open_memory_channel(10)
    buffer = ColumnBuffer({"W": StreamInfo("\\\\S\\T", "W")})
    buffer.add_live_batch([Live(0, message(1, start=0))])  # W's floor: second 0
    gaps = GapQueue()
    flusher = Flusher(buffer, msg_recv, flush_send, max_rows=1000, max_age=60, gap_queue=gaps)
    async with trio.open_nursery() as nursery:
        await nursery.start(flusher.run)
        async with msg_send:
            for item in (Live(0, message(1, start=5)), Connected(("W",)), Live(0, message(1, start=9))):
                msg_send.send_nowait(item)  # all queued: the flusher takes them in one drain
            await trio.sleep(1)
        requests = await gaps.take_all()
    start = parse_iso_us("2024-01-01T00:00:05.000005Z")
    assert [(r.start_us, r.end_us - r.start_us) for r in requests] == [(start, 4_000_004)]
