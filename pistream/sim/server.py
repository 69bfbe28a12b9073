"""The simulator process: one TCP port serving PI Web API REST and WebSocket channels from a SimModel.

Layers, each replaceable on its own: ``connection`` (HTTP/1.1 bytes), ``rest`` (routing and answers),
``channel`` (what a channel pushes), ``websocket`` (frames). This module ties them together and adds what
spans them: authentication and the rate limit (``auth``), fault injection (``faults``), wire quirks, the
clock, TLS, and the ``emitted`` record the tests compare against.

Order of checks for every request: rate limit (429), the OIDC endpoints (no PI authentication), PI
authentication (401), then for REST the armed ``faults`` and the answer; for a channel upgrade the method,
``channels_enabled`` (403 when off), ``faults.reject_channels``, then the channel request itself.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec
import structlog
import trio

from pistream.sim.auth import Authenticator, RateLimiter
from pistream.sim.channel import ChannelSession, ChannelSpec, EmittedRange
from pistream.sim.connection import MAX_REQUEST_HEAD, HttpRequest, HttpResponse, serve_connection
from pistream.sim.faults import Faults, RestFault
from pistream.sim.model import SimModel
from pistream.sim.payloads import ENCODER, Quirks, Wire
from pistream.sim.rest import Reply, RestApi
from pistream.sim.websocket import HandshakeError, ServerWebSocket

log = structlog.get_logger(__name__)

CHANNELS_DISABLED_STATUS = 403
CHANNELS_DISABLED_MESSAGE = (
    "Channels are disabled on this PI Web API instance (configuration item EnableChannels is false)."
)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses: the only hosts bound without ``--allow-remote``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _rest_path(request: HttpRequest) -> str | None:
    """The lower-cased path below ``/piwebapi/`` (``streamsets/recorded``), None outside it."""
    path = request.path.lower()
    if path == "/piwebapi" or path.startswith("/piwebapi/"):
        return path[len("/piwebapi/") :].strip("/")
    return None


class Simulator:
    """A PI Web API simulator; start with ``sim = await nursery.start(Simulator(model).run)``.

    Options beyond the basics:

    - ``faults``: a ``Faults`` to start with (``sim.faults`` is always there to flip at run time).
    - ``quirks``: ``Quirks`` of the wire format (string flags, ``Value`` objects, 7-digit fractions,
      ``+00:00``).
    - ``bearer_tokens``: accepted Bearer tokens (an empty set enables Bearer with only issued tokens);
      ``oidc_clients``: ``{client_id: client_secret}`` for the token endpoint, whose tokens live
      ``token_lifetime`` seconds of ``clock``. Basic and Bearer may be combined.
    - ``channels_enabled=False``: upgrades answer 403 ``{"Errors": [...]}`` (EnableChannels false).
    - ``rate_limit``: at most that many requests per second per client IP, then 429 with ``Retry-After``.
    - ``max_request_head``: raise it for channel URLs with thousands of webIds (HTTP.sys allows 16 KiB).
    """

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
        faults: Faults | None = None,
        quirks: Quirks | None = None,
        bearer_tokens: Iterable[str] | None = None,
        oidc_clients: Mapping[str, str] | None = None,
        token_lifetime: float = 3600.0,
        channels_enabled: bool = True,
        rate_limit: int | None = None,
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
        self.wire = Wire(quirks)
        self.api = RestApi(model, self.now_us, self.wire)
        self.auth = Authenticator(
            basic_auth=basic_auth,
            bearer_tokens=bearer_tokens,
            oidc_clients=oidc_clients,
            token_lifetime=token_lifetime,
            clock=clock,
        )
        self.channels_enabled = channels_enabled
        self.rate_limiter = RateLimiter(rate_limit) if rate_limit is not None else None
        self.emitted: dict[str, EmittedRange] = {}
        self.sessions: set[ChannelSession] = set()  # open channels, for tests and fault injection
        self.channels_opened: list[tuple[str, ...]] = []  # each channel's WebIDs, in the order opened (tests)
        self.faults = faults or Faults()
        self.faults.bind(self.sessions)
        self.requests_served = 0

    def now_us(self) -> int:
        """Simulator time in integer microseconds since the epoch (UTC)."""
        return round(self.clock() * 1_000_000)

    @property
    def origin(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def url(self) -> str:
        return self.origin + "/piwebapi"

    @property
    def issuer(self) -> str:
        """The OIDC issuer (``/.well-known/openid-configuration`` below it), when ``oidc_clients`` is set."""
        return self.origin

    @property
    def token_url(self) -> str:
        return self.origin + "/oauth2/token"

    async def run(self, *, task_status: trio.TaskStatus[Simulator] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report ``self`` (with the real ``port``) as started, then serve until cancelled."""
        listener = await _bind(self.host, self.port)
        self.port = listener.socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._serve_stream, [listener])

    async def _serve_stream(self, stream: trio.SocketStream) -> None:
        try:
            client = str(stream.socket.getpeername()[0])
        except (OSError, IndexError, TypeError):
            client = ""
        wrapped: trio.abc.Stream = stream
        if self.ssl_context is not None:
            wrapped = trio.SSLStream(stream, self.ssl_context, server_side=True, https_compatible=True)
        try:
            await serve_connection(wrapped, self, max_request_head=self.max_request_head, client=client)
        except trio.BrokenResourceError:  # e.g. a failed TLS handshake
            pass
        finally:
            await trio.aclose_forcefully(wrapped)

    # -- HttpApp -----------------------------------------------------------------------------------------

    def _origin_of(self, request: HttpRequest) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{request.headers.get('host') or f'{self.host}:{self.port}'}"

    def _base_url(self, request: HttpRequest) -> str:
        return self._origin_of(request) + "/piwebapi"

    def _unauthorized(self, request: HttpRequest) -> HttpResponse | None:
        return self.auth.check(request)

    def _rate_limited(self, request: HttpRequest) -> HttpResponse | None:
        if self.rate_limiter is None:
            return None
        retry_after = self.rate_limiter.retry_after(request.client)
        return None if retry_after is None else self.rate_limiter.reject(retry_after)

    @staticmethod
    def _encode(reply: Reply) -> HttpResponse:
        body = b"" if reply.content is None else ENCODER.encode(reply.content)  # 201, 204: no body
        return HttpResponse(reply.status, body, list(reply.headers))

    @staticmethod
    def _fault_response(fault: RestFault) -> HttpResponse:
        headers = [] if fault.retry_after is None else [("Retry-After", str(fault.retry_after))]
        return HttpResponse.error(fault.status, fault.message, headers)

    async def handle_http(self, request: HttpRequest) -> HttpResponse:
        self.requests_served += 1
        limited = self._rate_limited(request)
        if limited is not None:
            return limited
        if self.auth.is_oidc_path(request.path):
            return self.auth.handle_oidc(request, self._origin_of(request))
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        path = _rest_path(request)
        if path is not None:
            fault = self.faults.take_rest_fault(path)
            if fault is not None:
                log.debug("rest_fault_served", path=path, status=fault.status)
                return self._fault_response(fault)
        reply = self.api.handle(
            request.method, request.target, request.body, request.headers, self._base_url(request)
        )
        if path is not None and reply.status == 200 and self.faults.wants_cut_short(path):
            cut = _cut_short(reply.content)
            if cut is not None:
                fault = self.faults.take_rest_fault(path, cut_short=True)
                assert fault is not None
                cut["WebException"] = {"StatusCode": 500, "Errors": [fault.message]}
                reply = reply._replace(content=cut)
        return self._encode(reply)

    async def handle_upgrade(
        self, request: HttpRequest, stream: trio.abc.Stream, trailing: bytes
    ) -> HttpResponse | None:
        self.requests_served += 1
        limited = self._rate_limited(request)
        if limited is not None:
            return limited
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        if request.method != "GET":
            return HttpResponse.error(405, "A WebSocket upgrade must be a GET request.")
        if not self.channels_enabled:
            return HttpResponse.error(CHANNELS_DISABLED_STATUS, CHANNELS_DISABLED_MESSAGE)
        rejection = self.faults.take_channel_rejection()
        if rejection is not None:
            return self._fault_response(rejection)
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
            self.model,
            spec,
            ws,
            now_us=self.now_us,
            poll_interval=self.poll_interval,
            emitted=self.emitted,
            faults=self.faults,
            wire=self.wire,
        )
        self.sessions.add(session)
        self.channels_opened.append(tuple(t.webid for t in spec.tags))
        log.debug("channel_opened", streams=len(spec.tags), initial=spec.include_initial_values)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            log.debug("channel_closed", streams=len(spec.tags), messages=session.messages_sent)


def _cut_short(content: Any) -> dict[str, Any] | None:
    """``content`` with half its items (half of each stream's, for stream sets), or None without items."""
    body = msgspec.to_builtins(content)
    if not isinstance(body, dict) or not isinstance(body.get("Items"), list):
        return None
    items = body["Items"]
    if items and all(isinstance(i, dict) and isinstance(i.get("Items"), list) for i in items):
        for stream in items:
            stream["Items"] = stream["Items"][: len(stream["Items"]) // 2]
    else:
        body["Items"] = items[: len(items) // 2]
    return body


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
