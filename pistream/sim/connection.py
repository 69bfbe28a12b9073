"""HTTP/1.1 on one accepted stream (keep-alive, h11), handing WebSocket upgrades to the application.

Only bytes and h11 events here: what to answer is the application's business (``HttpApp``), so TLS (wrap
the stream before calling ``serve_connection``) and fault injection (an app that stalls or answers 503)
need no change in this module.
"""

from __future__ import annotations

import http
from dataclasses import dataclass, field
from typing import Protocol, cast

import h11
import trio

from pistream.sim.payloads import ENCODER, errors

RECEIVE_SIZE = 65536
MAX_REQUEST_HEAD = 16384  # HTTP.sys MaxRequestBytes: request line + headers
MAX_BODY = 64 * 1024 * 1024
IDLE_TIMEOUT = 120.0  # HTTP.sys idle connection timeout
JSON_CONTENT_TYPE = "application/json; charset=utf-8"


@dataclass
class HttpRequest:
    """A complete request: h11's head plus the body."""

    head: h11.Request
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names; repeated ones joined by ","
    client: str = ""  # the peer's IP address, when known

    @classmethod
    def from_h11(cls, head: h11.Request, body: bytes, client: str = "") -> HttpRequest:
        headers: dict[str, str] = {}
        for name, value in head.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]},{text}" if key in headers else text
        return cls(head, body, headers, client)

    @property
    def path(self) -> str:
        """The target's path, without the query."""
        return self.target.partition("?")[0]

    @property
    def method(self) -> str:
        return self.head.method.decode("ascii")

    @property
    def target(self) -> str:
        return self.head.target.decode("latin-1")

    @property
    def is_websocket_upgrade(self) -> bool:
        connection = {token.strip().lower() for token in self.headers.get("connection", "").split(",")}
        return "upgrade" in connection and self.headers.get("upgrade", "").lower() == "websocket"


@dataclass
class HttpResponse:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = JSON_CONTENT_TYPE

    @classmethod
    def error(cls, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> HttpResponse:
        return cls(status, ENCODER.encode(errors(message)), headers or [])


class HttpApp(Protocol):
    async def handle_http(self, request: HttpRequest) -> HttpResponse: ...

    async def handle_upgrade(
        self, request: HttpRequest, stream: trio.abc.Stream, trailing: bytes
    ) -> HttpResponse | None:
        """Serve the WebSocket on ``stream`` until it ends and return None, or return a rejection."""
        ...


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> object:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(cast(bytes, await stream.receive_some(RECEIVE_SIZE)))
            continue
        return event


async def send_response(
    conn: h11.Connection, stream: trio.abc.Stream, response: HttpResponse, *, close: bool
) -> None:
    overridden = {name.lower() for name, _ in response.headers}
    defaults = [("Server", "pistream-sim"), ("Cache-Control", "no-cache")]
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        *((name, value) for name, value in defaults if name.lower() not in overridden),
        *response.headers,
    ]
    if close:
        headers.append(("Connection", "close"))
    try:
        reason = http.HTTPStatus(response.status).phrase.encode("ascii")
    except ValueError:
        reason = b""
    head = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason)) or b""
    body = (conn.send(h11.Data(data=response.body)) or b"") if response.body else b""
    tail = conn.send(h11.EndOfMessage()) or b""
    if len(body) < RECEIVE_SIZE:
        await stream.send_all(head + body + tail)
    else:  # no copy of a big body
        await stream.send_all(head)
        await stream.send_all(body)
        if tail:
            await stream.send_all(tail)


async def serve_connection(
    stream: trio.abc.Stream,
    app: HttpApp,
    *,
    max_request_head: int = MAX_REQUEST_HEAD,
    max_body: int = MAX_BODY,
    idle_timeout: float = IDLE_TIMEOUT,
    client: str = "",
) -> None:
    """Serve requests on ``stream`` until the client closes, asks to close, idles out or upgrades.

    ``client`` (the peer address) is passed on in every ``HttpRequest``. Does not close ``stream``: the
    caller owns it.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_request_head)
    try:
        while True:
            try:
                request = await _read_request(conn, stream, max_request_head, max_body, idle_timeout, client)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint
                    message = "Bad Request - Request Too Long" if status == 431 else f"Bad Request: {exc}"
                    await send_response(conn, stream, HttpResponse.error(400, message), close=True)
                return
            except _BodyTooLarge:
                await send_response(
                    conn, stream, HttpResponse.error(413, "Request body too large."), close=True
                )
                return
            except _HeadTooLarge:
                await send_response(
                    conn, stream, HttpResponse.error(400, "Bad Request - Request Too Long"), close=True
                )
                return
            if request is None:
                return
            if request.is_websocket_upgrade:
                rejection = await app.handle_upgrade(request, stream, conn.trailing_data[0])
                if rejection is not None:
                    await send_response(conn, stream, rejection, close=True)
                return
            response = await app.handle_http(request)
            await send_response(conn, stream, response, close=False)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # MUST_CLOSE (client asked for it, or HTTP/1.0)
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        return


class _BodyTooLarge(Exception):
    pass


class _HeadTooLarge(Exception):
    pass


def _head_size(head: h11.Request) -> int:
    """Bytes of request line + headers as sent (h11 only limits heads that arrive in pieces)."""
    return len(head.method) + len(head.target) + 12 + sum(len(n) + len(v) + 4 for n, v in head.headers) + 2


async def _read_request(
    conn: h11.Connection,
    stream: trio.abc.Stream,
    max_request_head: int,
    max_body: int,
    idle_timeout: float,
    client: str = "",
) -> HttpRequest | None:
    """The next request with its body, or None when the client closed or idled out."""
    event: object = None
    with trio.move_on_after(idle_timeout):
        event = await _next_event(conn, stream)
    if not isinstance(event, h11.Request):
        return None
    head = event
    if _head_size(head) > max_request_head:
        raise _HeadTooLarge
    body = bytearray()
    with trio.fail_after(idle_timeout):
        while not isinstance(event := await _next_event(conn, stream), h11.EndOfMessage):
            if isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body:
                    raise _BodyTooLarge
    return HttpRequest.from_h11(head, bytes(body), client)
