"""A lean WebSocket client (RFC 6455) for PI Web API channels, over a Trio stream the caller owns.

Why not trio-websocket: at hundreds of thousands of values per second its per-frame machinery (a reader
task, wsproto's frame parser in Python, incremental UTF-8 decoding, a memory channel per connection) cost
more CPU than reading the values did. This client parses frame headers itself and hands each message's
payload on as ``bytes`` (text frames are not decoded: JSON readers take UTF-8 bytes). The handshake is
HTTP/1.1 through h11. No extensions are offered, so frames are never compressed.

Everything a server can make it hold is bounded: a message (its fragments each charged ``FRAME_CHARGE``
bytes on top of their payload, so a flood of empty fragments ends at the same limit), a control frame
(refused at its header when longer than 125 bytes, fragmented or of an unknown opcode), pongs (only the
latest ping is answered, once per socket read) and time (a message that has begun must end within
``message_timeout``, so a server trickling a frame byte by byte cannot hold the reader).
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import math
import os
import struct

import h11
import trio

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HANDSHAKE_BYTES = 64 * 1024  # of a refusal's body, which is read for its message
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
# Charged against the message limit for every frame of a fragmented message: more than a frame costs to
# take in (a frame of `00 00` is two bytes on the wire), so at most limit / 64 frames make one message.
FRAME_CHARGE = 64
CLOSE_SEND_SECONDS = 5.0


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
                  *, max_message_size: int, receive_buffer_size: int,
                  message_timeout: float | None = None) -> WebSocket:
    """Upgrade ``stream`` (already connected, TLS done) to a WebSocket; raises ConnectionRejected with
    the server's status, headers and body if it refuses. The caller bounds the handshake's time."""
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
    if _header(headers, b"upgrade").strip().lower() != b"websocket":
        raise HandshakeError("the server's 101 answer lacks 'Upgrade: websocket'")
    if b"upgrade" not in (token.strip().lower() for token in _header(headers, b"connection").split(b",")):
        raise HandshakeError("the server's 101 answer lacks 'Connection: Upgrade'")
    expected = base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())
    accept = dict(headers).get(b"sec-websocket-accept")
    if accept != expected:
        raise HandshakeError("the server's Sec-WebSocket-Accept does not match the key")
    if dict(headers).get(b"sec-websocket-extensions"):
        raise HandshakeError("the server chose a WebSocket extension that was not offered")
    trailing, _ = client.trailing_data
    return WebSocket(stream, bytearray(trailing), max_message_size=max_message_size,
                     receive_buffer_size=receive_buffer_size, message_timeout=message_timeout)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    """A header's values, joined with commas (HTTP's rule for repeated headers)."""
    return b",".join(value for key, value in headers if key == name)


SCRATCH_MIN = 256 * 1024  # a fresh bytes object this large per read is mapped and zeroed by the kernel


def _copy(buf: bytearray, head: int, length: int) -> bytes:
    """A frame's payload out of the buffer, copied once (a bytearray slice would copy twice)."""
    with memoryview(buf) as view:
        return bytes(view[head:head + length])


def _is_utf8(payload: bytes) -> bool:
    """Cheap where it is common: ``isascii`` scans ~12 GB/s without allocating; text beyond ASCII (units
    such as °C) is decoded, 14 GB/s for Latin-1 letters, 2 GB/s for others (measured here), in 64 KiB
    pieces: a whole message as ``str`` could take 4 bytes a character."""
    if payload.isascii():
        return True
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with memoryview(payload) as view:
            for start in range(0, len(view), 1 << 16):
                decoder.decode(view[start:start + (1 << 16)])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _valid_close_code(code: int) -> bool:
    """Codes a server may send (RFC 6455 §7.4: 1004-1006 and 1015 are never sent; 1012-1014 registered
    since; 3000-4999 for libraries and applications)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class WebSocket:
    """Messages in, pings answered, closes reported. Frames from the server are never masked."""

    def __init__(self, stream: trio.abc.Stream, buffered: bytearray, *, max_message_size: int,
                 receive_buffer_size: int, message_timeout: float | None = None):
        self._stream = stream
        self._buffer = buffered
        self._max = max_message_size
        self._receive_size = receive_buffer_size
        self._timeout = message_timeout
        self._deadline = math.inf  # of the frame or message in progress, set at the first read it needs
        self._partial: bytearray | None = None  # a fragmented message so far
        self._partial_text = False
        self._charged = 0  # its bytes, plus FRAME_CHARGE per frame
        self._pong: bytes | None = None  # the latest ping's payload, answered before the next read
        self.reads = 0  # socket reads (for tests: pongs sent never exceed them)
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
        if len(buf) < 2 or self._partial is not None:
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
        payload = _copy(buf, head, length)
        if first == 0x81 and not _is_utf8(payload):
            return None  # left in the buffer: get_message fails the connection on it
        del buf[:head + length]  # from the front of a bytearray: the rest does not move
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
        opcode = first & 0x0F
        final = first & 0x80
        length = second & 0x7F
        head = 2
        if opcode >= OP_CLOSE:  # a control frame: judged by its header, before any payload is read
            if opcode > OP_PONG:
                raise await self._fail(1002, f"unknown opcode {opcode}")
            if length > 125 or not final:
                raise await self._fail(1002, "invalid control frame (longer than 125 bytes or fragmented)")
            while len(buf) < head + length:
                await self._fill()
            await self._control(opcode, _copy(buf, head, length), head + length)
            return None
        if opcode > OP_BINARY:
            raise await self._fail(1002, f"unknown opcode {opcode}")
        if (opcode == OP_CONTINUATION) != (self._partial is not None):
            raise await self._fail(1002, "unexpected continuation frame" if opcode == OP_CONTINUATION
                                   else "a new message inside a fragmented one")
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
        fragmented = self._partial is not None or not final
        charged = self._charged + length + FRAME_CHARGE if fragmented else length
        if charged > self._max:
            raise await self._fail(1009, f"message larger than {self._max} bytes"
                                   + (" (counting 64 bytes a fragment)" if fragmented else ""))
        while len(buf) < head + length:
            await self._fill(head + length - len(buf))
        if not fragmented:
            message = _copy(buf, head, length)
            text = opcode == OP_TEXT
        else:
            if self._partial is None:
                self._partial, self._partial_text = bytearray(), opcode == OP_TEXT
            with memoryview(buf) as view:
                self._partial += view[head:head + length]  # no copy of its own per fragment
            self._charged = charged
            if not final:
                del buf[:head + length]
                return None
            message, text = bytes(self._partial), self._partial_text
            self._partial, self._charged = None, 0
        del buf[:head + length]
        self._deadline = math.inf
        if text and not _is_utf8(message):
            raise await self._fail(1007, "invalid UTF-8 in a text message")
        return message

    async def _control(self, opcode: int, payload: bytes, size: int) -> None:
        del self._buffer[:size]
        if self._partial is None:
            self._deadline = math.inf
        if opcode == OP_PING:
            # Answered before the next read, and only the latest one (RFC 6455 §5.5.3): a flood of pings
            # costs one pong per read, not one send per ping.
            self._pong = payload
        elif opcode == OP_CLOSE:
            if len(payload) == 1:
                raise await self._fail(1002, "close frame with a 1-byte payload")
            code = struct.unpack_from("!H", payload)[0] if payload else 1005
            if payload and not _valid_close_code(code):
                raise await self._fail(1002, f"invalid close code {code}")
            if not _is_utf8(payload[2:]):
                raise await self._fail(1007, "close reason is not UTF-8")
            await self._send_quietly(OP_CLOSE, payload[:2])
            raise ConnectionClosed(code, payload[2:].decode())

    async def _fill(self, wanted: int = 0) -> None:
        self.reads += 1
        if self._timeout is None or not (self._buffer or self._partial is not None):
            await self._receive(wanted)  # between messages: the caller's heartbeat watchdog times silence
            return
        # A frame or message has begun: it must end in time, however slowly its bytes come.
        if self._deadline == math.inf:
            self._deadline = trio.current_time() + self._timeout
        with trio.move_on_at(self._deadline):
            await self._receive(wanted)
            return
        raise await self._fail(1008, f"a message begun was not complete within {self._timeout:g} s")

    async def _receive(self, wanted: int) -> None:
        if self._pong is not None:
            pong, self._pong = self._pong, None
            await self._send(OP_PONG, pong)
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
        """A close frame, if the server takes it soon (one that reads nothing must not hold us)."""
        with trio.move_on_after(CLOSE_SEND_SECONDS):
            try:
                await self._send(opcode, payload)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    async def _send(self, opcode: int, payload: bytes) -> None:
        """A masked control frame (clients must mask), masked as one integer XOR (payloads ≤ 125 bytes)."""
        mask = os.urandom(4)
        n = len(payload)
        masked = (int.from_bytes(payload) ^ int.from_bytes((mask * 32)[:n])).to_bytes(n)
        await self._stream.send_all(bytes((0x80 | opcode, 0x80 | n)) + mask + masked)
