"""A PI Web API ``streamsets/channel`` reader, on pistream's own WebSocket client (``websocket``).

It connects with the auth headers computed up front (WebSocket clients cannot answer a 401 challenge),
decodes each frame with msgspec and hands ``(received_us, message)`` downstream through a bounded channel,
so a slow sink slows the reader. Any close, error or silence past the watchdog reconnects with backoff.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit, urlunsplit

import msgspec
import structlog
import trio

from ..backoff import Backoff
from ..errors import AuthError, ChannelError, ChannelRefusedError, UnreachableError
from .auth import AuthProvider, NoAuth
from .flow import Connected, Incoming, Live, LiveBatch
from .messages import FRAME_ERRORS, StreamSetMessage, channel_decoder
from .websocket import ConnectionClosed, ConnectionRejected, HandshakeError, WebSocket, connect

log = structlog.get_logger(__name__)

# The largest message a channel may send: its tags x this, at least MIN_MESSAGE_LIMIT. A stream takes
# ~400 bytes of JSON with its first value and ~150 a value after that, so 16 KiB is ~100 values of each tag
# in one message (a 1 Hz site sends one), or a long string value; the first message with initial values,
# one value a stream, is ~40x under it. ``--max-message-mb`` sets one limit for every channel instead.
MESSAGE_BYTES_PER_TAG = 16 * 1024
MIN_MESSAGE_LIMIT = 1024 * 1024
RECEIVE_BUFFER_SIZE = 1024 * 1024  # 4 KiB (the default) halves throughput, see DESIGN.md
RECEIVE_BUDGET = 64 * 1024 * 1024  # all channels' receive buffers together
MIN_RECEIVE_BUFFER = 64 * 1024


def receive_buffer_size(channels: int) -> int:
    """1 MiB per channel for a few channels; with hundreds, a share of a fixed budget (at least 64 KiB,
    which still reads ~0.75 M values/s): each buffer is allocated on every read."""
    return max(MIN_RECEIVE_BUFFER, min(RECEIVE_BUFFER_SIZE, RECEIVE_BUDGET // max(1, channels)))


def message_limit(tags: int) -> int:
    """The default limit on one message of a channel of ``tags`` streams, in bytes (2.8 MiB for the ~180
    streams of a 6,000-character URL); a larger message closes the channel with 1009."""
    return max(MIN_MESSAGE_LIMIT, tags * MESSAGE_BYTES_PER_TAG)


CONNECT_TIMEOUT = 30.0  # TCP, TLS and the upgrade's answer, each
RAW_FRAME_MIN = 256  # smaller frames (heartbeats) are decoded by the reader


@dataclass
class ChannelStats:
    messages: int = 0
    heartbeats: int = 0
    malformed: int = 0
    connects: int = 0
    pauses: int = 0


class PipelineStalled(Exception):
    """The flusher took nothing for ``stall_timeout`` seconds: the channel closes instead of letting the
    server (or the socket) hold an ever-growing backlog. Reconnecting later reads the pause back."""

    def __init__(self, item: Live | LiveBatch | Connected):
        super().__init__("pipeline stalled")
        self.item = item


def websocket_base(base_url: str) -> str:
    """``https://host/piwebapi`` -> ``wss://host/piwebapi`` (and http -> ws)."""
    parts = urlsplit(base_url.rstrip("/"))
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path, "", ""))


def channel_url(base_url: str, webids: Sequence[str], *, include_initial_values: bool,
                heartbeat_rate: int) -> str:
    params: list[tuple[str, str]] = [("webId", w) for w in webids]
    params.append(("includeInitialValues", "true" if include_initial_values else "false"))
    if heartbeat_rate > 0:
        params.append(("heartbeatRate", str(heartbeat_rate)))
    return f"{websocket_base(base_url)}/streamsets/channel?{urlencode(params)}"


def shard_webids(base_url: str, webids: Sequence[str], max_url_length: int) -> list[list[str]]:
    """Split webIds so that each channel URL stays under ``max_url_length`` (HTTP.sys limits)."""
    overhead = len(channel_url(base_url, [], include_initial_values=True, heartbeat_rate=999))
    shards: list[list[str]] = []
    current: list[str] = []
    size = overhead
    for w in webids:
        cost = len("webId=&") + len(w)
        if current and size + cost > max_url_length:
            shards.append(current)
            current, size = [], overhead
        current.append(w)
        size += cost
    if current:
        shards.append(current)
    return shards


class ChannelReader:
    """Reads one streamset channel until cancelled, reconnecting whenever it breaks."""

    def __init__(
        self,
        name: str,
        base_url: str,
        webids: Sequence[str],
        send_channel: trio.MemorySendChannel[Incoming],
        *,
        auth: AuthProvider | None = None,
        ssl_context: ssl.SSLContext | None = None,
        auth_hint: str = "check --username and the PISTREAM_PASSWORD variable",
        heartbeat_rate: int = 5,
        read_timeout: float | None = 30.0,
        stall_timeout: float = 30.0,
        receive_buffer: int = RECEIVE_BUFFER_SIZE,
        max_message_size: int | None = None,
        raw_frames: bool = False,
    ):
        self.name = name
        # Initial values are not optional: each stream's current value marks where its gap fill ends.
        self.base_url = base_url
        self.heartbeat_rate = heartbeat_rate
        self.webids = list(webids)
        self.send_channel = send_channel
        self.auth = auth or NoAuth()
        self.auth_hint = auth_hint
        self.ssl_context = ssl_context
        # With heartbeats on, silence longer than a few heartbeat periods means a dead socket, not a
        # quiet plant; without them, silence proves nothing.
        self.read_timeout = read_timeout if heartbeat_rate > 0 else None
        # A message that has begun must end within it, heartbeats or not: a server trickling a frame
        # byte by byte (or stopping mid-frame) is not a quiet plant.
        self.message_timeout = read_timeout
        self.max_message_size = max_message_size or message_limit(len(self.webids))
        self.stall_timeout = stall_timeout
        self.receive_buffer = receive_buffer
        # The stream side reads big frames' text straight into columns when its C frame codec is
        # built (``stream.columns.FRAME_CODEC``); the composition root says so.
        self.raw_frames = raw_frames
        self.stats = ChannelStats()
        self.connected = False  # a WebSocket is open and being read (for the periodic stats)
        self.backoff = Backoff()

    @property
    def url(self) -> str:
        """The channel's URL, built for each connection and not kept: it holds every webId (~6 KB for
        ~180 streams), ~10 MB over the channels of 100,000 tags if each reader kept its copies."""
        return channel_url(self.base_url, self.webids, include_initial_values=True,
                           heartbeat_rate=self.heartbeat_rate)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read and reconnect until cancelled; only refusals that retrying cannot heal end it."""
        task_status.started()
        async with self.send_channel:
            while True:
                try:
                    await self._connect_and_read()
                except ConnectionRejected as exc:
                    self._raise_if_final(exc)
                    reason = f"rejected with HTTP {exc.status_code}"
                except PipelineStalled as stalled:
                    # The socket is closed already, so the server is not left to queue up values;
                    # the message in hand goes on once there is room, the rest comes from the archive.
                    self.stats.pauses += 1
                    log.warning("channel_paused", channel=self.name, reason="pipeline stalled",
                                stalled_seconds=self.stall_timeout)
                    await self.send_channel.send(stalled.item)
                    log.info("channel_resuming", channel=self.name)
                    continue
                except (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError,
                        trio.TooSlowError, UnreachableError) as exc:  # the last: an OIDC issuer not answering
                    reason = _reason(exc)
                delay = self.backoff.next_delay()
                log.warning("channel_disconnected", channel=self.name, reason=reason, retry_in=round(delay, 2))
                await trio.sleep(delay)

    def _raise_if_final(self, exc: ConnectionRejected) -> None:
        """Refused credentials or a server without channels will not heal by retrying.

        REST has accepted the same credentials before any channel opens, so a 403 on the upgrade is read
        as "no channels here" (EnableChannels false answers so), not as a password problem."""
        said = _rejection_text(exc)
        if exc.status_code == 401:
            raise AuthError(
                f"PI Web API refused the channel's credentials (401{said}): {self.auth_hint}"
            ) from exc
        if exc.status_code in (400, 414):
            raise ChannelRefusedError(
                f"PI Web API refused the channel request ({exc.status_code}{said}): the URL may be too long for "
                "the server; lower --max-url-length"
            ) from exc
        if exc.status_code in (403, 404, 405, 501):
            raise ChannelRefusedError(
                f"PI Web API refused the channel ({exc.status_code}{said}): channels are disabled on this server "
                "or for this account; set EnableChannels to true in the PI Web API configuration "
                "(System Configuration) and restart PI Web API"
            ) from exc

    async def _connect_and_read(self) -> None:
        """One connection's life."""
        async with self._connection() as ws:
            await self._read(ws)

    async def probe(self) -> None:
        """Open the channel once and close it (``pistream check``): raises what a run would meet at its start,
        a refusal that retrying cannot heal as AuthError or ChannelRefusedError, anything else as ChannelError."""
        try:
            async with self._connection():
                pass
        except ConnectionRejected as exc:
            self._raise_if_final(exc)
            raise ChannelError(f"PI Web API refused the channel (HTTP {exc.status_code}"
                               f"{_rejection_text(exc)}): check the PI Web API log") from exc
        except (ConnectionClosed, HandshakeError, OSError, trio.TooSlowError) as exc:
            raise ChannelError(f"cannot open a channel to {websocket_base(self.base_url)} ({_reason(exc)}): "
                               "check that WebSocket upgrades reach PI Web API (proxies, firewalls)") from exc

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[WebSocket]:
        """An open WebSocket on the channel URL. pistream owns the TCP/TLS stream and always closes it."""
        url = self.url
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        host = parts.hostname or "localhost"
        port = parts.port or (443 if secure else 80)
        resource = parts.path + (f"?{parts.query}" if parts.query else "")
        host_header = host if port in (80, 443) else f"{host}:{port}"
        with trio.fail_after(CONNECT_TIMEOUT):
            if secure:
                stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                    host, port, ssl_context=self.ssl_context or ssl.create_default_context(),
                    https_compatible=True)
            else:
                stream = await trio.open_tcp_stream(host, port)
        try:
            # Computed afresh for each connection: Negotiate tokens are single-use, OIDC ones expire.
            headers = [(k.encode(), v.encode()) for k, v in (await self.auth.headers(url)).items()]
            with trio.fail_after(CONNECT_TIMEOUT):
                ws = await connect(stream, host_header, resource, headers,
                                   max_message_size=self.max_message_size,
                                   receive_buffer_size=self.receive_buffer, message_timeout=self.message_timeout)
            del url, parts, resource, headers  # not held while the connection lasts
            yield ws
        finally:
            # No close handshake: on a stop or a failure the socket just goes; the server copes.
            self.connected = False
            await trio.aclose_forcefully(stream)

    async def _read(self, ws: WebSocket) -> None:
        self.stats.connects += 1
        self.connected = True
        log.info("channel_connected", channel=self.name, streams=len(self.webids))
        await self._send_or_pause(Connected(tuple(self.webids)))
        frame: bytes | None
        while True:
            if self.read_timeout is not None:
                with trio.fail_after(self.read_timeout):
                    frame = await ws.get_message()
            else:
                frame = await ws.get_message()
            received_us = time.time_ns() // 1000
            self.backoff.reset()
            batch: list[Live] = []
            while frame is not None:  # and every other frame the same read brought in whole
                if self.raw_frames and len(frame) >= RAW_FRAME_MIN:
                    # Read into columns by the flusher, in bulk; heartbeats are small and decoded here.
                    self.stats.messages += 1
                    batch.append(Live(received_us, None, frame, self.name))
                else:
                    message = self._decode(frame)
                    if message is not None:
                        batch.append(Live(received_us, message))
                frame = ws.buffered_message()
            if batch:
                await self._send_or_pause(batch[0] if len(batch) == 1 else LiveBatch(batch))
            del batch  # its frames (~50 KB each) are not held while the next ones are awaited

    async def _send_or_pause(self, item: Live | LiveBatch | Connected) -> None:
        """Hand a message on; if the pipeline stays full (storage down), stop reading this channel."""
        try:
            self.send_channel.send_nowait(item)
            return
        except trio.WouldBlock:
            pass
        with trio.move_on_after(self.stall_timeout):
            await self.send_channel.send(item)
            return
        raise PipelineStalled(item)

    def _decode(self, frame: str | bytes) -> StreamSetMessage | None:
        """The frame's values, or None for a heartbeat or a malformed frame (logged and counted)."""
        try:
            message = channel_decoder.decode(frame)
        except FRAME_ERRORS as exc:
            self.stats.malformed += 1
            log.error("frame_malformed", channel=self.name, error=str(exc), size=len(frame))
            return None
        if message.web_exception is not None:
            log.warning("frame_cut_short", channel=self.name, web_exception=str(message.web_exception))
        if not message.items:
            self.stats.heartbeats += 1
            return None
        self.stats.messages += 1
        return message


def _rejection_text(exc: ConnectionRejected) -> str:
    """``": <the server's Errors>"`` from a refused upgrade's body, or "" (bounded: it goes in a message)."""
    try:
        errors = msgspec.json.decode(exc.body or b"{}", type=_Errors).Errors
    except msgspec.DecodeError:
        errors = None
    text = "; ".join(str(e) for e in errors or ())
    for name, value in exc.headers or ():
        said = re.search(rb'error_description="([^"]*)"', value) if name.lower() == b"www-authenticate" else None
        if said:
            text += f"; the server says: {said.group(1).decode('utf-8', 'replace')}"
    return f": {text[:300]}" if text else ""


class _Errors(msgspec.Struct):
    Errors: list[object] | None = None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "no message or heartbeat within the read timeout"
    if isinstance(exc, ConnectionClosed):
        if exc.code == 1009:
            return f"closed ({exc.reason}); if the server's messages are that large, raise --max-message-mb"
        return f"closed ({exc.reason})"
    return str(exc) or type(exc).__name__
