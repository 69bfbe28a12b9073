"""The simulator process: one TCP port serving PI Web API REST and WebSocket channels from a SimModel.

Layers, each replaceable on its own: ``connection`` (HTTP/1.1 bytes), ``rest`` (routing and answers),
``channel`` (what a channel pushes), ``websocket`` (frames). This module ties them together and adds what
spans them: authentication, the clock, TLS, and the ``emitted`` record the tests compare against.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import structlog
import trio

from pistream.sim.channel import ChannelSession, ChannelSpec, EmittedRange
from pistream.sim.connection import MAX_REQUEST_HEAD, HttpRequest, HttpResponse, serve_connection
from pistream.sim.model import SimModel
from pistream.sim.payloads import ENCODER
from pistream.sim.rest import Reply, RestApi
from pistream.sim.websocket import HandshakeError, ServerWebSocket

log = structlog.get_logger(__name__)

_AUTH_CHALLENGE = ("WWW-Authenticate", 'Basic realm="PI Web API"')


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses: the only hosts bound without ``--allow-remote``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Simulator:
    """A PI Web API simulator; start with ``sim = await nursery.start(Simulator(model).run)``."""

    def __init__(
        self,
        model: SimModel,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        poll_interval: float = 0.25,
        basic_auth: tuple[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        ssl_context: ssl.SSLContext | None = None,
        max_request_head: int = MAX_REQUEST_HEAD,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        self.model = model
        self.host = host
        self.port = port
        self.poll_interval = poll_interval
        self.basic_auth = basic_auth
        self.clock = clock
        self.ssl_context = ssl_context
        self.max_request_head = max_request_head
        self.api = RestApi(model, self.now_us)
        self.emitted: dict[str, EmittedRange] = {}
        self.sessions: set[ChannelSession] = set()  # open channels, for tests and fault injection
        self.requests_served = 0

    def now_us(self) -> int:
        """Simulator time in integer microseconds since the epoch (UTC)."""
        return round(self.clock() * 1_000_000)

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/piwebapi"

    async def run(self, *, task_status: trio.TaskStatus[Simulator] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report ``self`` (with the real ``port``) as started, then serve until cancelled."""
        listener = await _bind(self.host, self.port)
        self.port = listener.socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._serve_stream, [listener])

    async def _serve_stream(self, stream: trio.SocketStream) -> None:
        wrapped: trio.abc.Stream = stream
        if self.ssl_context is not None:
            wrapped = trio.SSLStream(stream, self.ssl_context, server_side=True, https_compatible=True)
        try:
            await serve_connection(wrapped, self, max_request_head=self.max_request_head)
        except trio.BrokenResourceError:  # e.g. a failed TLS handshake
            pass
        finally:
            await trio.aclose_forcefully(wrapped)

    # -- HttpApp -----------------------------------------------------------------------------------------

    def _base_url(self, request: HttpRequest) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{request.headers.get('host') or f'{self.host}:{self.port}'}/piwebapi"

    def _unauthorized(self, request: HttpRequest) -> HttpResponse | None:
        if self.basic_auth is None:
            return None
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = (
                    base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
                )
            except (binascii.Error, UnicodeDecodeError):
                user, password = "", ""
            expected_user, expected_password = self.basic_auth
            user_ok = hmac.compare_digest(user.encode(), expected_user.encode())
            password_ok = hmac.compare_digest(password.encode(), expected_password.encode())
            if user_ok and password_ok:
                return None
        return HttpResponse.error(401, "Authorization has been denied for this request.", [_AUTH_CHALLENGE])

    @staticmethod
    def _encode(reply: Reply) -> HttpResponse:
        return HttpResponse(reply.status, ENCODER.encode(reply.content), list(reply.headers))

    async def handle_http(self, request: HttpRequest) -> HttpResponse:
        self.requests_served += 1
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        reply = self.api.handle(
            request.method, request.target, request.body, request.headers, self._base_url(request)
        )
        return self._encode(reply)

    async def handle_upgrade(
        self, request: HttpRequest, stream: trio.abc.Stream, trailing: bytes
    ) -> HttpResponse | None:
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        if request.method != "GET":
            return HttpResponse.error(405, "A WebSocket upgrade must be a GET request.")
        spec = self.api.channel_spec(request.target)
        if isinstance(spec, Reply):
            return self._encode(spec)
        if request.headers.get("sec-websocket-version") != "13":
            return HttpResponse.error(
                426, "Only WebSocket version 13 is supported.", [("Sec-WebSocket-Version", "13")]
            )
        ws = ServerWebSocket(stream)
        try:
            await ws.accept(request.head, trailing)
        except HandshakeError as exc:
            return HttpResponse.error(400, f"Invalid WebSocket handshake: {exc}")
        try:
            await self.run_channel(spec, ws)
        finally:
            await ws.aclose(1001)
        return None

    async def drop_channels(self, code: int = 1001) -> None:
        """Close every open channel from the server side, as a PI Web API restart would."""
        async with trio.open_nursery() as nursery:
            for session in list(self.sessions):
                nursery.start_soon(session.close, code)

    async def run_channel(self, spec: ChannelSpec, ws: ServerWebSocket) -> None:
        """Push values for ``spec`` on the accepted ``ws`` until the client leaves."""
        session = ChannelSession(
            self.model, spec, ws, now_us=self.now_us, poll_interval=self.poll_interval, emitted=self.emitted
        )
        self.sessions.add(session)
        log.debug("channel_opened", streams=len(spec.tags), initial=spec.include_initial_values)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            log.debug("channel_closed", streams=len(spec.tags), messages=session.messages_sent)


async def _bind(host: str, port: int) -> trio.SocketListener:
    """One listening socket on the first address of ``host`` (one port, even for ``localhost``)."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, type_, proto, _, address = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        if hasattr(socket, "SO_REUSEADDR") and not hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def serve(
    model: SimModel,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[Simulator] = trio.TASK_STATUS_IGNORED,
    **kwargs: Any,
) -> None:
    """Run a Simulator until cancelled, logging its URL; ``kwargs`` go to ``Simulator``."""
    simulator = Simulator(model, host=host, port=port, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        log.info("simulator_started", url=simulator.url, tags=len(model.tags), rate=model.rate)
        task_status.started(simulator)
