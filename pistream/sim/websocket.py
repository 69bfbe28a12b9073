"""Server side of one WebSocket, on wsproto, after the HTTP layer has parsed and accepted the upgrade.

wsproto (not trio-websocket) so that the simulator controls every byte: data frames are written directly
(pre-encoded frames later cost nothing), and fault injection can stop answering pings or cut the socket.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import cast

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request
from wsproto.utilities import RemoteProtocolError

RECEIVE_BUFFER_SIZE = 65536
CLOSE_TIMEOUT = 2.0  # seconds for our close frame and the peer's reply


class WebSocketClosed(Exception):
    """The peer went away or the socket was closed; the session should end quietly."""


class HandshakeError(ValueError):
    """The upgrade request is not a valid WebSocket handshake (nothing was sent yet)."""


def text_frame(payload: bytes) -> bytes:
    """One unmasked, final text frame (server to client) around UTF-8 ``payload``."""
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


class ServerWebSocket:
    """A server WebSocket over a Trio stream: handshake, data frames out, pings/close in."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._ws = WSConnection(ConnectionType.SERVER)
        self._send_lock = trio.StrictFIFOLock()
        self.closed = trio.Event()
        self.close_code: int | None = None
        self.answer_pings = True  # a fault injector can make the socket go silent
        self.mute_until = float("-inf")  # trio time until which nothing but a close reply is sent
        self._reading = False
        self._broken = False

    async def accept(self, request: h11.Request, trailing: bytes = b"") -> None:
        """Answer 101 to an upgrade request that h11 already parsed; ``trailing`` = bytes read past it."""
        try:
            self._ws.initiate_upgrade_connection(list(request.headers), request.target)
        except RemoteProtocolError as exc:
            raise HandshakeError(str(exc)) from None
        if not any(isinstance(event, Request) for event in self._ws.events()):
            raise HandshakeError("not a WebSocket upgrade request")
        await self._send_raw(self._ws.send(AcceptConnection()))
        if trailing:
            try:
                self._ws.receive_data(trailing)
            except RemoteProtocolError:
                self.closed.set()

    @property
    def muted(self) -> bool:
        return trio.current_time() < self.mute_until

    async def wait_unmuted(self) -> None:
        """Return once the socket may send again (at once when it is not muted)."""
        while (until := self.mute_until) > trio.current_time():  # noqa: ASYNC110 - may be extended
            await trio.sleep_until(until)

    def abort(self, *, reset: bool = True) -> None:
        """Cut the connection now, without a close frame: an RST with ``reset``, else a plain close.

        Synchronous: tasks blocked on the socket wake up with ClosedResourceError and end quietly.
        """
        self._broken = True
        self.closed.set()
        stream: object = self._stream
        while isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if isinstance(stream, trio.SocketStream):
            sock = stream.socket
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    @property
    def is_open(self) -> bool:
        return self._ws.state is ConnectionState.OPEN and not self.closed.is_set()

    async def send_text(self, payload: bytes) -> None:
        """Send one text message (``payload`` must be UTF-8). Raises WebSocketClosed once closed."""
        await self.send_frame(text_frame(payload))

    async def send_frame(self, frame: bytes) -> None:
        """Send already framed bytes (see ``text_frame``)."""
        await self._send_raw(frame, data_frame=True)

    async def _send_raw(self, data: bytes, *, data_frame: bool = False) -> None:
        async with self._send_lock:
            # Checked under the lock: no data frame may follow our close frame.
            if self._broken or (data_frame and not self.is_open):
                raise WebSocketClosed("WebSocket is closed")
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._broken = True
                self.closed.set()
                raise WebSocketClosed(str(exc)) from None
            except BaseException:
                self._broken = True  # cancelled mid-frame: the byte stream is no longer framed
                raise

    async def run_reader(self) -> None:
        """Read until the peer closes or the socket breaks: answer pings and the close handshake.

        Client messages carry nothing for a channel and are dropped.
        """
        self._reading = True
        try:
            while not self.closed.is_set():
                for event in self._ws.events():
                    if isinstance(event, Ping) and self.answer_pings and not self.muted:
                        await self._send_raw(self._ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        self.close_code = event.code
                        if self._ws.state is ConnectionState.REMOTE_CLOSING:
                            await self._send_raw(self._ws.send(event.response()))
                        return
                try:
                    data = await self._stream.receive_some(RECEIVE_BUFFER_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                try:
                    self._ws.receive_data(cast(bytes, data))
                except RemoteProtocolError:
                    return
        except WebSocketClosed:
            return
        finally:
            self._reading = False
            self.closed.set()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close handshake (bounded in time), then close the socket.

        While ``run_reader`` runs, wait for the peer's close reply before closing TCP: closing with the
        reply unread would reset the connection and could destroy data the peer has not read yet.
        """
        try:
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                if self._ws.state is ConnectionState.OPEN and not self._broken:
                    await self._send_raw(self._ws.send(CloseConnection(code=code, reason=reason)))
                if self._reading:
                    await self.closed.wait()
        except WebSocketClosed:
            pass
        finally:
            self.closed.set()
            await trio.aclose_forcefully(self._stream)
