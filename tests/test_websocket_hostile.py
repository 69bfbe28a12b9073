"""pistream's WebSocket client against a hostile loopback server (issue 28): every resource the server can
make the client spend is bounded — memory per message, fragments, pongs, control frames, time in a frame
that has begun — and protocol mistakes are refused with the code RFC 6455 names."""

from __future__ import annotations

import struct
import tracemalloc
from contextlib import suppress
from functools import partial

import pytest
import trio
from structlog.testing import capture_logs
from test_end_to_end import served
from test_websocket_client import accept_for, frame, never_reached, read_request, with_server

from pistream.config import build_settings
from pistream.errors import ConfigError
from pistream.pi.channel import MESSAGE_BYTES_PER_TAG, MIN_MESSAGE_LIMIT, ChannelReader, message_limit
from pistream.pi.websocket import FRAME_CHARGE, ConnectionClosed, HandshakeError
from pistream.pipeline import run_pipeline
from pistream.sim.model import SimModel


class ClientFrames:
    """The client's masked control frames, as the server reads them."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buf = bytearray()

    async def next(self) -> tuple[int, bytes]:
        while True:
            if len(self.buf) >= 6 and len(self.buf) >= 6 + (self.buf[1] & 0x7F):
                assert self.buf[1] & 0x80, "client frames are masked"
                n = self.buf[1] & 0x7F
                mask, body = self.buf[2:6], self.buf[6:6 + n]
                opcode = self.buf[0] & 0x0F
                del self.buf[:6 + n]
                return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(body))
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the client closed the connection")
            self.buf += data

    async def close_code(self) -> int:
        while True:
            opcode, payload = await self.next()
            if opcode == 0x8:
                return struct.unpack("!H", payload)[0]


def close(code: int, reason: bytes = b"") -> bytes:
    return frame(0x8, struct.pack("!H", code) + reason)


async def expect_close(ws, code: int) -> ConnectionClosed:
    with pytest.raises(ConnectionClosed) as closed:
        await ws.get_message()
    assert closed.value.code == code, closed.value.reason
    return closed.value


# 1. Fragments ---------------------------------------------------------------------------------------------

async def test_a_flood_of_empty_continuation_frames_ends_at_the_message_limit():
    """`01 01 7b` then `00 00` forever: each frame is charged 64 bytes, so 256 KiB of limit ends the message
    after 4,096 frames (1009), long before the 200,000 sent; the client holds next to nothing meanwhile."""
    limit = 256 * 1024
    peaks: list[int] = []

    async def script(stream, request):
        await stream.send_all(accept_for(request) + frame(0x1, b"{", final=False))
        empties = frame(0x0, b"", final=False) * 10_000
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for _ in range(20):
                await stream.send_all(empties)
        # The client has either refused by now or reads the end of the connection (1006, a failure here).

    async def client(ws):
        tracemalloc.start()
        try:
            await expect_close(ws, 1009)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()

    await with_server(script, client, max_message_size=limit, receive_buffer_size=64 * 1024)
    assert limit // FRAME_CHARGE < 200_000
    [peak] = peaks
    assert peak < limit  # the 200,000 empty fragments were never kept


async def test_fragments_count_against_the_message_limit():
    async def script(stream, request):
        parts = [frame(0x1, b"a" * 100, final=False)] + [frame(0x0, b"b" * 100, final=False)] * 20
        await stream.send_all(accept_for(request) + b"".join(parts))
        await stream.receive_some(100)

    async def client(ws):
        closed = await expect_close(ws, 1009)
        assert "64 bytes a fragment" in closed.reason

    await with_server(script, client, max_message_size=2000)  # 21 x 100 bytes would fit without the charge


# 2. Message size ------------------------------------------------------------------------------------------

def test_the_message_limit_follows_the_channels_tags_unless_set():
    assert message_limit(1) == MIN_MESSAGE_LIMIT
    assert message_limit(180) == 180 * MESSAGE_BYTES_PER_TAG == 2_949_120
    send, _ = trio.open_memory_channel(1)
    url = "http://127.0.0.1:1/piwebapi"
    assert ChannelReader("c", url, [f"W{i}" for i in range(180)], send).max_message_size == 2_949_120
    assert ChannelReader("c", url, ["W"], send, max_message_size=5 << 20).max_message_size == 5 << 20
    common = {"url": url, "tags": "tags.txt"}
    assert build_settings({}, {**common, "max_message_mb": 0.5}).max_message_mb == 0.5
    assert build_settings({}, common).max_message_mb is None
    with pytest.raises(ConfigError, match="--max-message-mb"):
        build_settings({"max_message_mb": 0}, common)


async def test_max_message_mb_reaches_the_channels_and_a_refusal_names_it(tmp_path):
    """The pipeline with ``--max-message-mb`` below the simulator's first message (8 tags, each with its
    value): every connect ends in 1009, and the log says which setting to raise."""
    with trio.fail_after(60), capture_logs() as logs:
        async with served(tmp_path, SimModel.generated(8, rate=1), duration=2.0,
                          max_message_mb=0.0005) as (_, settings):
            await run_pipeline(settings, handle_signals=False)
    reasons = [e["reason"] for e in logs if e["event"] == "channel_disconnected"]
    assert reasons and all("1009" in r and "raise --max-message-mb" in r for r in reasons)


async def test_a_frame_announced_over_the_limit_is_refused_at_its_header():
    """The server announces 100 MB and sends none of it: the client refuses without waiting for it."""
    codes: list[int] = []

    async def script(stream, request):
        await stream.send_all(accept_for(request) + struct.pack("!BBQ", 0x81, 127, 100_000_000))
        codes.append(await ClientFrames(stream).close_code())

    async def client(ws):
        await expect_close(ws, 1009)

    await with_server(script, client, max_message_size=MIN_MESSAGE_LIMIT)
    assert codes == [1009]


@pytest.mark.parametrize("fragments", [1, 64])
async def test_a_message_at_the_limit_costs_about_twice_its_size_at_its_peak(fragments):
    """Read into the connection's buffer (or the message so far), then copied once into the ``bytes`` the
    frame codec takes: ~2x for the moment of the copy, never a fragment list plus its join on top."""
    size = 4 << 20
    payload = b"v" * size
    part = size // fragments
    wire = b"".join(frame(0x1 if i == 0 else 0x0, payload[i * part:(i + 1) * part], final=i == fragments - 1)
                    for i in range(fragments))
    peaks: list[int] = []

    async def script(stream, request):
        await stream.send_all(accept_for(request) + wire)
        await stream.receive_some(100)

    async def client(ws):
        tracemalloc.start()
        try:
            message = await ws.get_message()
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert message == payload

    await with_server(script, client, max_message_size=size + fragments * FRAME_CHARGE,
                      receive_buffer_size=1 << 20)
    [peak] = peaks
    assert peak < 2.6 * size


# 3. Ping flood --------------------------------------------------------------------------------------------

async def test_a_ping_flood_gets_one_pong_per_read_and_the_data_still_flows():
    """100,000 pings with a data message after every 1,000: all 100 messages arrive in order, and the
    client sends at most one pong per socket read, each answering the latest ping it had read."""
    messages = [b'{"Items":[%d]}' % i + b" " * 500 for i in range(100)]
    wire = bytearray()
    for i in range(100_000):
        wire += frame(0x9, b"%d" % i)
        if i % 1000 == 999:
            wire += frame(0x1, messages[i // 1000])
    wire += frame(0x9, b"last")
    pongs: list[bytes] = []

    async def script(stream, request):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, accept_for(request) + wire)
            frames = ClientFrames(stream)
            while not pongs or pongs[-1] != b"last":
                opcode, payload = await frames.next()
                assert opcode == 0xA
                pongs.append(payload)
        await stream.send_all(close(1000))
        await stream.receive_some(100)

    reads: list[int] = []

    async def client(ws):
        got = [await ws.get_message() for _ in messages]
        assert got == messages
        await expect_close(ws, 1000)  # after the pong to "last"
        reads.append(ws.reads)

    await with_server(script, client, receive_buffer_size=64 * 1024, seconds=60)
    [read_count] = reads
    assert 1 <= len(pongs) <= read_count < 1000
    answered = [int(p) for p in pongs[:-1]]
    assert answered == sorted(set(answered)) and all(0 <= n < 100_000 for n in answered)


# 4. Control frames judged by their header -----------------------------------------------------------------

@pytest.mark.parametrize("header", [
    struct.pack("!BBQ", 0x89, 127, 100_000_000),  # a ping announcing 100 MB
    struct.pack("!BBH", 0x89, 126, 126),  # a ping one byte too long
    struct.pack("!BBH", 0x8A, 126, 65535),  # a pong too long
    bytes((0x09, 0x05)),  # a fragmented ping
    struct.pack("!BBQ", 0x83, 127, 100_000_000),  # unknown data opcode 3 announcing 100 MB
    struct.pack("!BBQ", 0x8B, 127, 100_000_000),  # unknown control opcode 11
], ids=["ping-100MB", "ping-126", "pong-65535", "ping-not-final", "opcode-3", "opcode-11"])
async def test_a_bad_control_frame_or_opcode_is_refused_at_its_header(header):
    """Only the header is sent, never a payload: a client that waited for the payload would hang here."""
    codes: list[int] = []

    async def script(stream, request):
        await stream.send_all(accept_for(request) + header)
        codes.append(await ClientFrames(stream).close_code())

    async def client(ws):
        await expect_close(ws, 1002)

    await with_server(script, client, max_message_size=1 << 30)
    assert codes == [1002]


# 5. Time in a frame that has begun ------------------------------------------------------------------------

async def test_a_frame_trickled_byte_by_byte_is_cut_at_the_message_deadline(autojump_clock):
    """One byte a second of a 104-byte frame, with heartbeats off (no read timeout): the reader gives up
    30 s after the frame began (the silence setting), not after the 100 s the frame would take."""
    got: list[ConnectionClosed] = []

    async def serve(stream):
        await stream.send_all(accept_for(await read_request(stream)))
        await trio.sleep(500)  # a quiet plant: no frame has begun, so no deadline runs
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for byte in frame(0x1, b"x" * 100)[:-1]:  # never complete
                await stream.send_all(bytes([byte]))
                await trio.sleep(1)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        send, receive = trio.open_memory_channel(10)
        reader = ChannelReader("c", f"http://127.0.0.1:{port}/piwebapi", ["W"], send, heartbeat_rate=0,
                               read_timeout=30.0)
        assert reader.read_timeout is None and reader.message_timeout == 30.0
        with trio.fail_after(2000):
            began = trio.current_time()
            with pytest.raises(ConnectionClosed) as closed:
                await reader._connect_and_read()
            got.append(closed.value)
            elapsed = trio.current_time() - began
        nursery.cancel_scope.cancel()
    assert got[0].code == 1008 and "30 s" in got[0].reason
    assert 500 + 30 <= elapsed < 500 + 100  # virtual seconds: quiet 500 s allowed; the frame cut at 30 s


async def test_messages_each_within_the_deadline_are_never_cut(autojump_clock):
    """A stream that never stops (a partial frame always in the buffer) is timed message by message."""
    payloads = [bytes([65 + i]) * 1000 for i in range(10)]

    async def script(stream, request):
        await stream.send_all(accept_for(request))
        for p in payloads:
            wire = frame(0x1, p)
            await stream.send_all(wire[:500])
            await trio.sleep(3)
            await stream.send_all(wire[500:] + frame(0x1, b"next", final=False))
            await trio.sleep(3)
            await stream.send_all(frame(0x0, b"!"))
        await stream.receive_some(100)

    async def client(ws):
        for p in payloads:
            assert await ws.get_message() == p
            assert await ws.get_message() == b"next!"

    await with_server(script, client, message_timeout=5.0, seconds=1000)  # 60 virtual seconds in all


async def test_an_upgrade_answer_cut_short_is_given_up_at_the_connect_timeout(autojump_clock):
    """The 101's status line and then nothing: the handshake has a deadline of its own."""

    async def serve(stream):
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\n")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        send, receive = trio.open_memory_channel(10)
        reader = ChannelReader("c", f"http://127.0.0.1:{port}/piwebapi", ["W"], send, heartbeat_rate=0)
        with trio.fail_after(1000), pytest.raises(trio.TooSlowError):
            await reader._connect_and_read()
        nursery.cancel_scope.cancel()


# 6. Handshake headers, close codes, UTF-8 -----------------------------------------------------------------

def _answer_101(request: bytes, upgrade: bytes | None, connection: bytes | None) -> bytes:
    answer = accept_for(request).replace(b"Upgrade: websocket\r\n", b"").replace(b"Connection: Upgrade\r\n", b"")
    extra = (b"Upgrade: " + upgrade + b"\r\n" if upgrade is not None else b"") + \
            (b"Connection: " + connection + b"\r\n" if connection is not None else b"")
    return answer.replace(b"\r\n", b"\r\n" + extra, 1)


@pytest.mark.parametrize(("upgrade", "connection", "missing"), [
    (None, b"Upgrade", "Upgrade: websocket"),
    (b"h2c", b"Upgrade", "Upgrade: websocket"),
    (b"websocket", None, "Connection: Upgrade"),
    (b"websocket", b"keep-alive", "Connection: Upgrade"),
])
async def test_a_101_without_the_upgrade_headers_is_a_handshake_error(upgrade, connection, missing):
    async def script(stream, request):
        await stream.send_all(_answer_101(request, upgrade, connection))
        await stream.receive_some(100)

    with pytest.raises(HandshakeError, match=missing):
        await with_server(script, never_reached)


async def test_a_101_with_the_headers_in_other_cases_and_lists_is_accepted():
    async def script(stream, request):
        await stream.send_all(_answer_101(request, b"WebSocket", b"keep-alive, upgrade") + frame(0x1, b"ok"))
        await stream.receive_some(100)

    async def client(ws):
        assert await ws.get_message() == b"ok"

    await with_server(script, client)


@pytest.mark.parametrize(("payload", "code", "answer"), [
    (struct.pack("!H", 1000), 1000, struct.pack("!H", 1000)),
    (struct.pack("!H", 3001) + b"app", 3001, struct.pack("!H", 3001)),
    (b"", 1005, b""),  # no code: the close is answered without one
    (struct.pack("!H", 999), 1002, struct.pack("!H", 1002)),
    (struct.pack("!H", 1005), 1002, struct.pack("!H", 1002)),
    (struct.pack("!H", 1006), 1002, struct.pack("!H", 1002)),
    (struct.pack("!H", 1015), 1002, struct.pack("!H", 1002)),
    (struct.pack("!H", 2999), 1002, struct.pack("!H", 1002)),
    (struct.pack("!H", 5000), 1002, struct.pack("!H", 1002)),
    (b"\x03", 1002, struct.pack("!H", 1002)),  # a 1-byte payload
    (struct.pack("!H", 1000) + b"\xff\xfe", 1007, struct.pack("!H", 1007)),  # a reason that is not UTF-8
], ids=["1000", "3001", "none", "999", "1005", "1006", "1015", "2999", "5000", "1-byte", "reason-not-utf8"])
async def test_a_valid_close_is_echoed_and_an_invalid_one_answered_1002(payload, code, answer):
    answers: list[bytes] = []

    async def script(stream, request):
        await stream.send_all(accept_for(request) + frame(0x8, payload))
        opcode, body = await ClientFrames(stream).next()
        assert opcode == 0x8
        answers.append(body)

    async def client(ws):
        await expect_close(ws, code)

    await with_server(script, client)
    assert answers == [answer]


async def test_invalid_utf8_in_a_text_message_closes_with_1007_wherever_it_is_read():
    """Alone, behind a good message in the same read (``buffered_message`` leaves it to ``get_message``),
    or across fragments; a character split between fragments is valid, and binary messages are not text."""
    codes: list[int] = []
    snow = "☃".encode()

    async def script(stream, request):
        await stream.send_all(accept_for(request) + frame(0x2, b"\xff") + frame(0x1, b'{"t":"' + snow + b'"}')
                              + frame(0x1, b"x" + snow[:1], final=False) + frame(0x0, snow[1:]) + frame(0x1, b"good")
                              + frame(0x1, b'{"t":"\xc3\x28"}'))
        codes.append(await ClientFrames(stream).close_code())

    async def client(ws):
        await trio.sleep(0.2)  # usually all in one read; the answers are the same if not
        got = [await ws.get_message()]
        while (more := ws.buffered_message()) is not None:
            got.append(more)
        got += [await ws.get_message() for _ in range(4 - len(got))]
        assert got == [b"\xff", b'{"t":"' + snow + b'"}', b"x" + snow, b"good"]
        assert ws.buffered_message() is None
        await expect_close(ws, 1007)

    await with_server(script, client, receive_buffer_size=1 << 20)
    assert codes == [1007]
