"""pistream's WebSocket client against a raw loopback server that speaks exactly what each case needs:
fragments, pings, closes, refusals, oversized and malformed frames."""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio

from pistream.pi.websocket import (
    WEBSOCKET_GUID,
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocket,
    connect,
)

Script = Callable[[trio.SocketStream, bytes], Awaitable[None]]


def frame(opcode: int, payload: bytes, *, final: bool = True) -> bytes:
    """An unmasked server frame."""
    first = (0x80 if final else 0) | opcode
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


async def read_request(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(4096)
    return data


def accept_for(request: bytes) -> bytes:
    key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key"))
    accept = base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")


async def with_server(script: Script, client: Callable[[WebSocket], Awaitable[None]], *,
                      max_message_size: int = 1 << 20, headers: list[tuple[bytes, bytes]] | None = None,
                      receive_buffer_size: int = 7, message_timeout: float | None = None,
                      seconds: float = 10) -> None:
    async def serve(stream: trio.SocketStream) -> None:
        await script(stream, await read_request(stream))

    failure: Exception | None = None
    with trio.fail_after(seconds):
        async with trio.open_nursery() as nursery:
            [listener] = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
            port = listener.socket.getsockname()[1]
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                try:
                    ws = await connect(stream, f"127.0.0.1:{port}", "/piwebapi/streamsets/channel?webId=W",
                                       headers or [], max_message_size=max_message_size,
                                       receive_buffer_size=receive_buffer_size, message_timeout=message_timeout)
                    await client(ws)
                except (ConnectionRejected, HandshakeError) as exc:
                    failure = exc  # raised outside the nursery, not in an exception group
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def test_messages_whole_fragmented_and_after_pings_arrive_in_order():
    pongs: list[bytes] = []

    async def script(stream, request):
        assert b"Authorization: Bearer t0ken" in request and b"Sec-WebSocket-Version: 13" in request
        await stream.send_all(accept_for(request) + frame(0x1, b'{"Items":[]}'))  # in the handshake's read
        await stream.send_all(frame(0x1, b'{"Ite', final=False) + frame(0x9, b"hi")
                              + frame(0x0, b'ms":[1]', final=False) + frame(0x0, b"}"))
        await stream.send_all(frame(0x2, b"x" * 70_000))
        pongs.append(await stream.receive_some(100))

    async def client(ws):
        assert await ws.get_message() == b'{"Items":[]}'
        assert await ws.get_message() == b'{"Items":[1]}'
        assert await ws.get_message() == b"x" * 70_000

    await with_server(script, client, headers=[(b"Authorization", b"Bearer t0ken")])
    [pong] = pongs
    assert pong[0] == 0x8A and pong[1] == 0x80 | 2  # a masked pong with the ping's payload
    assert bytes(b ^ pong[2 + i % 4] for i, b in enumerate(pong[6:8])) == b"hi"


async def test_frames_sent_right_behind_the_101_in_the_same_read_are_kept():
    """A server that starts streaming at once: the first read holds the 101 and ~300 KB of frames."""
    payloads = [bytes([65 + i]) * 60_000 for i in range(5)]

    async def script(stream, request):
        await stream.send_all(accept_for(request) + b"".join(frame(0x1, p) for p in payloads))
        await trio.sleep(0.5)  # all of it is in the client's socket before it reads

    async def client(ws):
        for payload in payloads:
            assert await ws.get_message() == payload

    await with_server(script, client, receive_buffer_size=1 << 20)


async def test_messages_already_received_whole_are_taken_without_awaiting():
    """``buffered_message`` hands out what one read brought in, in order, and leaves everything else
    (pings, fragments, partial or oversized frames) to ``get_message``."""
    sizes = [10, 200, 70_000, 5]

    async def script(stream, request):
        frames = [frame(0x1, bytes([65 + i]) * n) for i, n in enumerate(sizes)]
        await stream.send_all(accept_for(request) + b"".join(frames) + frame(0x9, b"p") + frame(0x1, b"after")
                              + frame(0x1, b"frag", final=False) + frame(0x0, b"ment") + frame(0x2, b"z" * 300))
        await trio.sleep(0.3)
        await stream.send_all(frame(0x1, b"y" * 1000)[:500])
        await trio.sleep(0.3)
        await stream.send_all(frame(0x1, b"y" * 1000)[500:])
        await trio.sleep(0.3)

    async def client(ws):
        await trio.sleep(0.2)  # everything up to the partial frame is in the socket
        got = [await ws.get_message()]
        while (more := ws.buffered_message()) is not None:
            got.append(more)
        assert got == [bytes([65 + i]) * n for i, n in enumerate(sizes)]  # stopped at the ping
        assert await ws.get_message() == b"after"  # the ping answered on the way
        assert ws.buffered_message() is None  # a fragmented message is get_message's
        assert await ws.get_message() == b"fragment"
        assert ws.buffered_message() == b"z" * 300
        await trio.sleep(0.4)
        assert ws.buffered_message() is None  # half a frame
        assert await ws.get_message() == b"y" * 1000

    await with_server(script, client, receive_buffer_size=1 << 20)


async def test_close_frame_ends_with_the_servers_code_and_reason():
    async def script(stream, request):
        await stream.send_all(accept_for(request) + frame(0x8, struct.pack("!H", 1001) + b"going away"))
        assert (await stream.receive_some(100))[0] == 0x88  # the close is answered

    async def client(ws):
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.code == 1001 and "going away" in closed.value.reason

    await with_server(script, client)


@pytest.mark.parametrize(("bad", "code"), [
    (frame(0x1, b"x" * 2000), 1009),  # larger than the limit
    (bytes((0x81, 0x85)) + b"mask" + b"hello", 1002),  # masked by the server
    (bytes((0xC1, 0x01)) + b"x", 1002),  # RSV1 without an extension
    (frame(0x0, b"x"), 1002),  # continuation without a start
    (frame(0x9, b"x" * 126), 1002),  # control frame too long
])
async def test_protocol_violations_close_with_a_code(bad, code):
    async def script(stream, request):
        await stream.send_all(accept_for(request) + bad)
        await stream.receive_some(100)

    async def client(ws):
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.code == code

    await with_server(script, client, max_message_size=1000)


async def test_a_socket_that_goes_away_mid_frame_is_a_lost_connection():
    async def script(stream, request):
        await stream.send_all(accept_for(request) + frame(0x1, b"x" * 100)[:50])
        await stream.aclose()

    async def client(ws):
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.code == 1006

    await with_server(script, client)


async def never_reached(ws: WebSocket) -> None:
    raise AssertionError("the handshake should have failed")


async def test_refused_upgrade_reports_status_headers_and_body():
    body = b'{"Errors":["Channels are disabled"]}'

    async def script(stream, request):
        await stream.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nWWW-Authenticate: x\r\n"
                              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    with pytest.raises(ConnectionRejected) as rejected:
        await with_server(script, never_reached)
    assert rejected.value.status_code == 403 and rejected.value.body == body
    assert (b"www-authenticate", b"x") in rejected.value.headers


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: d3Jvbmc=\r\n\r\n",
    b"garbage\r\n\r\n",
])
async def test_a_bad_handshake_answer_is_a_handshake_error(answer):
    async def script(stream, request):
        await stream.send_all(answer)
        await stream.receive_some(100)

    with pytest.raises(HandshakeError):
        await with_server(script, never_reached)
