"""A lean WebSocket client (RFC 6455) for PI Web API channels, over a Trio stream the caller owns.

Why not trio-websocket: at hundreds of thousands of values per second its per-frame machinery (a reader
task, wsproto's frame parser in Python, incremental UTF-8 decoding, a memory channel per connection) cost
more CPU than reading the values did. This client parses frame headers itself and hands each message's
payload on as ``bytes`` (text frames are not decoded: JSON readers take UTF-8 bytes). The handshake is
HTTP/1.1 through h11. No extensions are offered, so frames are never compressed.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct

import h11
import trio

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HANDSHAKE_BYTES = 64 * 1024  # of a refusal's body, which is read for its message
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class HandshakeError(Exception):
    """The server's answer to the upgrade is not a WebSocket handshake."""


class ConnectionRejected(Exception):
    """The server answered the upgrade with an HTTP status instead of 101."""

    def __init__(self, status_code: int, headers: list[tuple[bytes, bytes]], body: bytes):
        super().__init__(f"rejected with HTTP {status_code}")
        self.status_code = status_code
        self.headers = headers
        self.body = body


class ConnectionClosed(Exception):
    """The connection ended: a close frame (code, reason), a protocol error or the socket going away."""

    def __init__(self, code: int, reason: str):
        super().__init__(f"{code} {reason}".strip())
        self.code = code
        self.reason = f"{code} {reason}".strip()


async def connect(stream: trio.abc.Stream, host: str, resource: str, extra_headers: list[tuple[bytes, bytes]],
                  *, max_message_size: int, receive_buffer_size: int) -> WebSocket:
    """Upgrade ``stream`` (already connected, TLS done) to a WebSocket; raises ConnectionRejected with
    the server's status, headers and body if it refuses."""
    key = base64.b64encode(os.urandom(16))
    client = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=resource, headers=[
        (b"Host", host.encode()), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", key), (b"Sec-WebSocket-Version", b"13"), *extra_headers])
    await stream.send_all(client.send(request))
    response: h11.Response | h11.InformationalResponse | None = None
    body = bytearray()
    while True:
        try:
            event = client.next_event()  # h11 bounds the response head (16 KiB)
        except h11.RemoteProtocolError as exc:
            raise HandshakeError(f"invalid HTTP response to the upgrade: {exc}") from exc
        if event is h11.NEED_DATA:
            # The first read may well hold the 101 and the first frames after it: they are kept.
            data = await stream.receive_some(receive_buffer_size)
            if not data:
                if isinstance(response, h11.Response):
                    break  # a refusal cut short: report what came
                raise HandshakeError("connection closed during the WebSocket handshake")
            client.receive_data(bytes(data))
        elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            response = event
            break
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_HANDSHAKE_BYTES:
                break  # enough of a refusal's body for its message
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed) or event is h11.PAUSED:
            break
    if response is None:
        raise HandshakeError("no HTTP response to the WebSocket upgrade")
    headers = [(name.lower(), value) for name, value in response.headers]
    if response.status_code != 101:
        raise ConnectionRejected(response.status_code, headers, bytes(body))
    expected = base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())
    accept = dict(headers).get(b"sec-websocket-accept")
    if accept != expected:
        raise HandshakeError("the server's Sec-WebSocket-Accept does not match the key")
    if dict(headers).get(b"sec-websocket-extensions"):
        raise HandshakeError("the server chose a WebSocket extension that was not offered")
    trailing, _ = client.trailing_data
    return WebSocket(stream, bytearray(trailing), max_message_size=max_message_size,
                     receive_buffer_size=receive_buffer_size)


SCRATCH_MIN = 256 * 1024  # a fresh bytes object this large per read is mapped and zeroed by the kernel


def _take(buf: bytearray, head: int, length: int) -> bytes:
    """A frame's payload out of the front of the buffer, copied once (a bytearray slice would copy twice);
    deleting from the front of a bytearray does not move the rest."""
    with memoryview(buf) as view:
        payload = bytes(view[head:head + length])
    del buf[:head + length]
    return payload


class WebSocket:
    """Messages in, pings answered, closes reported. Frames from the server are never masked."""

    def __init__(self, stream: trio.abc.Stream, buffered: bytearray, *, max_message_size: int,
                 receive_buffer_size: int):
        self._stream = stream
        self._buffer = buffered
        self._max = max_message_size
        self._receive_size = receive_buffer_size
        self._fragments: list[bytes] = []
        self._fragment_bytes = 0
        # Plain TCP with large reads (few channels) reads into one buffer kept for the connection; smaller
        # reads come from malloc's heap cheaply, and kept buffers would add up over many channels.
        self._scratch = bytearray(receive_buffer_size) if isinstance(stream, trio.SocketStream) \
            and receive_buffer_size >= SCRATCH_MIN else None

    async def get_message(self) -> bytes:
        """The next text or binary message's payload."""
        while True:
            message = await self._next_frame()
            if message is not None:
                return message

    def buffered_message(self) -> bytes | None:
        """The next message if it is already received whole, as one final text or binary frame that is
        not part of a fragmented message; else None (``get_message`` then reads it, with every check).
        Lets a reader take all the frames one socket read brought in without awaiting each."""
        buf = self._buffer
        if len(buf) < 2 or self._fragments:
            return None
        first, length = buf[0], buf[1]
        if first not in (0x81, 0x82) or length & 0x80:  # FIN + text/binary, no reserved bits; unmasked
            return None
        head = 2
        if length == 126:
            if len(buf) < 4:
                return None
            head, length = 4, struct.unpack_from("!H", buf, 2)[0]
        elif length == 127:
            if len(buf) < 10:
                return None
            head, length = 10, struct.unpack_from("!Q", buf, 2)[0]
        if length > self._max or len(buf) < head + length:
            return None
        payload = _take(buf, head, length)
        return payload

    async def _next_frame(self) -> bytes | None:
        buf = self._buffer
        while len(buf) < 2:
            await self._fill()
        first, second = buf[0], buf[1]
        if second & 0x80:
            raise await self._fail(1002, "masked frame from the server")
        if first & 0x70:
            raise await self._fail(1002, "reserved bits set (no extension was negotiated)")
        length = second & 0x7F
        head = 2
        if length == 126:
            head = 4
            while len(buf) < head:
                await self._fill()
            length = struct.unpack_from("!H", buf, 2)[0]
        elif length == 127:
            head = 10
            while len(buf) < head:
                await self._fill()
            length = struct.unpack_from("!Q", buf, 2)[0]
        if self._fragment_bytes + length > self._max:
            raise await self._fail(1009, f"message larger than {self._max} bytes")
        while len(buf) < head + length:
            await self._fill(head + length - len(buf))
        payload = _take(buf, head, length)
        opcode = first & 0x0F
        final = bool(first & 0x80)
        if opcode in (OP_TEXT, OP_BINARY, OP_CONTINUATION):
            if (opcode == OP_CONTINUATION) != bool(self._fragments):
                raise await self._fail(1002, "unexpected continuation frame")
            if final and not self._fragments:
                return payload
            self._fragments.append(payload)
            self._fragment_bytes += length
            if not final:
                return None
            message = b"".join(self._fragments)
            self._fragments, self._fragment_bytes = [], 0
            return message
        if length > 125 or not final:
            raise await self._fail(1002, "invalid control frame")
        if opcode == OP_PING:
            await self._send(OP_PONG, payload)
            return None
        if opcode == OP_PONG:
            return None
        if opcode == OP_CLOSE:
            code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else 1005
            reason = payload[2:].decode("utf-8", "replace")
            await self._send_quietly(OP_CLOSE, payload[:2])
            raise ConnectionClosed(code, reason)
        raise await self._fail(1002, f"unknown opcode {opcode}")

    async def _fill(self, wanted: int = 0) -> None:
        # A big message's remainder in larger reads, but never one allocation of the whole maximum.
        size = max(self._receive_size, min(wanted, 16 << 20))
        if self._scratch is not None and size <= len(self._scratch):
            # Into the kept buffer: a fresh 1 MB bytes object per read cost page faults and zeroing
            # (~6 % of the process at 1 M values/s).
            got = await self._stream.socket.recv_into(self._scratch, size)  # type: ignore[attr-defined]
            if not got:
                raise ConnectionClosed(1006, "connection lost")
            with memoryview(self._scratch) as view:
                self._buffer += view[:got]
            return
        data = await self._stream.receive_some(size)
        if not data:
            raise ConnectionClosed(1006, "connection lost")
        self._buffer += data

    async def _fail(self, code: int, reason: str) -> ConnectionClosed:
        await self._send_quietly(OP_CLOSE, struct.pack("!H", code))
        return ConnectionClosed(code, reason)

    async def _send_quietly(self, opcode: int, payload: bytes) -> None:
        try:
            await self._send(opcode, payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _send(self, opcode: int, payload: bytes) -> None:
        """A masked control frame (clients must mask)."""
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await self._stream.send_all(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)
