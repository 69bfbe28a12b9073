r"""The REST side of the simulator: routing and the answers of the PI Web API endpoints pistream uses.

Functions of (method, target, body, time) and the model: no sockets here, so ``batch`` dispatches through the
same router and the HTTP layer (and later fault injection) stays separate. Paths match case-insensitively
after ``/piwebapi``, like IIS; WebIDs keep their case (they are base64). Two endpoints change the model, as
they change a PI Data Archive: ``POST dataservers/{webId}/points`` creates a point, ``DELETE points/{webId}``
deletes one (tests and ``pistream simulate --churn`` make a site whose points come and go).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import msgspec

from pistream.pi.webid import path_from_webid
from pistream.sim.channel import ChannelSpec
from pistream.sim.model import SimEvent, SimModel, SimTag
from pistream.sim.payloads import (
    DECODER,
    PointItem,
    StreamItems,
    TimedValues,
    Wire,
    attribute,
    data_server,
    errors,
    landing,
    point,
    select_fields,
    server_webid,
)
from pistream.sim.pitime import parse_time

MAX_RETURNED_ITEMS_PER_CALL = 150_000  # the server's MaxReturnedItemsPerCall default
MAX_URL_SEGMENT = 260  # HTTP.sys UrlSegmentMaxLength
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_KIND_OF_POINT_TYPE = {"float16": "float", "float32": "float", "float64": "float", "int16": "int", "int32": "int",
                       "digital": "digital", "string": "string", "timestamp": "timestamp", "blob": "array"}
_JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8"}


class Reply(NamedTuple):
    """A REST answer before encoding: status, a JSON-encodable body, extra headers."""

    status: int
    content: Any
    headers: tuple[tuple[str, str], ...] = ()


class HttpError(Exception):
    """Ends a request with ``status`` and ``{"Errors": [message, ...]}``."""

    def __init__(self, status: int, *messages: str) -> None:
        super().__init__(*messages)
        self.status = status
        self.messages = messages

    def reply(self) -> Reply:
        return Reply(self.status, errors(*self.messages))


@dataclass
class Query:
    """Query parameters by lower-cased name (PI Web API binds them case-insensitively)."""

    values: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, query: str) -> Query:
        out: dict[str, list[str]] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            out.setdefault(name.lower(), []).append(value)
        return cls(out)

    def all(self, name: str) -> list[str]:
        return self.values.get(name.lower(), [])

    def one(self, name: str, default: str | None = None) -> str | None:
        found = self.values.get(name.lower())
        return found[0] if found else default

    def integer(self, name: str, default: int, lo: int, hi: int, too_big: str | None = None) -> int:
        text = self.one(name)
        if text is None or text == "":
            return default
        try:
            value = int(text)
        except ValueError:
            raise HttpError(
                400, f"The value '{text}' of parameter '{name}' is not a valid integer."
            ) from None
        if value > hi and too_big:
            raise HttpError(400, too_big)
        if not lo <= value <= hi:
            raise HttpError(400, f"The value {value} of parameter '{name}' must be between {lo} and {hi}.")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        text = self.one(name)
        if text is None or text == "":
            return default
        if text.lower() in ("true", "1"):
            return True
        if text.lower() in ("false", "0"):
            return False
        raise HttpError(400, f"The value '{text}' of parameter '{name}' is not a valid boolean.")


@dataclass
class Context:
    """One request as the handlers see it."""

    method: str
    args: list[str]
    query: Query
    body: bytes
    base_url: str
    now_us: int


Handler = Callable[[Context], Reply]


def split_target(target: str) -> tuple[list[str], str]:
    """``/piwebapi/a/b?q`` -> (["a", "b"], "q"); HttpError 404 outside ``/piwebapi``."""
    parts = urlsplit(target)
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if any(len(s) > MAX_URL_SEGMENT for s in segments):
        raise HttpError(400, "Bad Request - Invalid URL")
    if not segments or segments[0].lower() != "piwebapi":
        raise HttpError(404, f"The resource '{parts.path}' was not found.")
    return segments[1:], parts.query


class RestApi:
    """Routes and answers REST requests from a SimModel at the simulator's current time."""

    def __init__(self, model: SimModel, now_us: Callable[[], int], wire: Wire | None = None) -> None:
        self.model = model
        self.now_us = now_us
        self.wire = wire or Wire()
        self._filter_cache: tuple[tuple[str, str, int], list[SimTag]] | None = None
        # (method, pattern); None in a pattern captures one segment (a WebID) into Context.args.
        self._routes: list[tuple[str, tuple[str | None, ...], Handler]] = [
            ("GET", (), self._landing),
            ("GET", ("dataservers",), self._dataservers),
            ("GET", ("dataservers", None), self._dataserver),
            ("GET", ("dataservers", None, "points"), self._dataserver_points),
            ("POST", ("dataservers", None, "points"), self._create_point),
            ("GET", ("points",), self._point_by_path),
            ("GET", ("points", "multiple"), self._points_multiple),
            ("GET", ("points", None), self._point_by_webid),
            ("DELETE", ("points", None), self._delete_point),
            ("GET", ("attributes",), self._attribute_by_path),
            ("GET", ("attributes", "multiple"), self._attributes_multiple),
            ("GET", ("attributes", None), self._attribute_by_webid),
            ("GET", ("streams", None, "recorded"), self._recorded),
            ("GET", ("streams", None, "value"), self._value),
            ("GET", ("streams", None, "end"), self._value),
            ("GET", ("streams", None, "channel"), self._channel_without_upgrade),
            ("GET", ("streamsets", "recorded"), self._streamset_recorded),
            ("GET", ("streamsets", "channel"), self._channel_without_upgrade),
            ("POST", ("batch",), self._batch),
        ]

    # -- dispatch --------------------------------------------------------------------------------------

    def handle(
        self, method: str, target: str, body: bytes, headers: Mapping[str, str], base_url: str
    ) -> Reply:
        """Answer one request; ``headers`` by lower-cased name."""
        method = method.upper()
        if method in _UNSAFE_METHODS and not headers.get("x-requested-with"):
            return HttpError(
                403, "This request requires the 'X-Requested-With' header (CSRF defense is enabled)."
            ).reply()
        return self._dispatch(method, target, body, base_url, self.now_us())

    def _dispatch(self, method: str, target: str, body: bytes, base_url: str, now_us: int) -> Reply:
        try:
            segments, query = split_target(target)
            handler, args = self._route(method, segments)
            parsed = Query.parse(query)
            reply = handler(Context(method, args, parsed, body, base_url, now_us))
            selected = parsed.one("selectedFields")
            if selected and reply.status < 300:
                reply = reply._replace(content=select_fields(reply.content, selected))
            return reply
        except HttpError as exc:
            return exc.reply()
        except ValueError as exc:  # time strings and other parameter parsing
            return Reply(400, errors(str(exc)))

    def _route(self, method: str, segments: list[str]) -> tuple[Handler, list[str]]:
        lowered = [s.lower() for s in segments]
        allowed = False
        for route_method, pattern, handler in self._routes:
            if len(pattern) != len(segments):
                continue
            if all(p is None or p == s for p, s in zip(pattern, lowered, strict=True)):
                if route_method == method:
                    return handler, [seg for p, seg in zip(pattern, segments, strict=True) if p is None]
                allowed = True
        if allowed:
            raise HttpError(405, f"The requested resource does not support http method '{method}'.")
        raise HttpError(404, f"The resource '/piwebapi/{'/'.join(segments)}' was not found.")

    # -- lookups -----------------------------------------------------------------------------------------

    def resolve_webid(self, webid: str) -> SimTag:
        """The stream (point or attribute) behind a WebID; HttpError 400 for a malformed one, 404 for an
        unknown one."""
        tag = self.model.lookup(webid)
        if tag is not None:
            return tag
        try:
            path_from_webid(webid)
        except ValueError:
            raise HttpError(400, f"Unknown or invalid WebID format: '{webid}'.") from None
        if webid[2:4] == "Ab":
            raise HttpError(404, f"The specified attribute was not found (WebID '{webid}').")
        raise HttpError(404, f"The specified PI Point was not found (WebID '{webid}').")

    def resolve_point(self, webid: str) -> SimTag:
        tag = self.resolve_webid(webid)
        if tag.is_attribute:
            raise HttpError(404, f"The specified PI Point was not found (WebID '{webid}').")
        return tag

    def resolve_attribute(self, webid: str) -> SimTag:
        tag = self.resolve_webid(webid)
        if not tag.is_attribute:
            raise HttpError(404, f"The specified attribute was not found (WebID '{webid}').")
        return tag

    def resolve_path(self, path: str) -> SimTag:
        """A PI point by ``\\\\SERVER\\NAME``."""
        tag = self.model.lookup(path) if path.startswith("\\") else None
        if tag is None or tag.is_attribute:
            raise HttpError(404, f"PI Point not found '{path}'.")
        return tag

    def resolve_attribute_path(self, path: str) -> SimTag:
        """An AF attribute by ``\\\\AFSERVER\\DB\\Element|Attribute``."""
        tag = self.model.lookup(path) if path.startswith("\\") else None
        if tag is None or not tag.is_attribute:
            raise HttpError(404, f"Attribute not found '{path}'.")
        return tag

    # -- handlers ----------------------------------------------------------------------------------------

    def _landing(self, ctx: Context) -> Reply:
        return Reply(200, landing(ctx.base_url))

    def _servers(self) -> dict[str, str]:
        return {server_webid(s): s for s in self.model.servers}

    def _dataservers(self, ctx: Context) -> Reply:
        path, name = ctx.query.one("path"), ctx.query.one("name")
        if path or name:
            wanted = (name or (path or "").lstrip("\\")).upper()
            for server in self.model.servers:
                if server.upper() == wanted:
                    return Reply(200, data_server(server, ctx.base_url, ctx.now_us))
            raise HttpError(404, f"PI Data Archive '{name or path}' not found.")
        items = [data_server(s, ctx.base_url, ctx.now_us) for s in self.model.servers]
        return Reply(200, StreamItems(Links={}, Items=items))

    def _server_of(self, webid: str) -> str:
        server = self._servers().get(webid)
        if server is None:
            raise HttpError(404, f"The specified PI Data Archive was not found (WebID '{webid}').")
        return server

    def _dataserver(self, ctx: Context) -> Reply:
        return Reply(200, data_server(self._server_of(ctx.args[0]), ctx.base_url, ctx.now_us))

    def _dataserver_points(self, ctx: Context) -> Reply:
        """Points of a server whose names match ``nameFilter`` (``*`` and ``?``, any case), a page of
        ``maxCount`` from ``startIndex``, in name order."""
        server = self._server_of(ctx.args[0]).upper()
        name_filter = (ctx.query.one("nameFilter") or "*").upper()
        start = ctx.query.integer("startIndex", 0, 0, 2**31 - 1)
        max_count = ctx.query.integer("maxCount", 1000, 1, MAX_RETURNED_ITEMS_PER_CALL)
        matches = self._matching_points(server, name_filter)
        items = [point(t, ctx.base_url) for t in matches[start : start + max_count]]
        return Reply(200, StreamItems(Links={}, Items=items))

    def _matching_points(self, server: str, name_filter: str) -> list[SimTag]:
        """The match list of the last name filter, kept while the model is unchanged: paging through
        100,000 matches asks the same question 100 times."""
        key = (server, name_filter, self.model.version)
        if self._filter_cache is None or self._filter_cache[0] != key:
            pattern = re.compile(fnmatch.translate(name_filter), re.DOTALL)
            found = [t for t in self.model.tags
                     if not t.is_attribute and t.server.upper() == server and pattern.match(t.name.upper())]
            found.sort(key=lambda t: t.name.upper())
            self._filter_cache = (key, found)
        return self._filter_cache[1]

    def _create_point(self, ctx: Context) -> Reply:
        """``POST dataservers/{webId}/points`` with ``{"Name": ..., "PointType": ...}``: 201 and a Location."""
        server = self._server_of(ctx.args[0])
        try:
            body = DECODER.decode(ctx.body) if ctx.body else None
        except msgspec.DecodeError as exc:
            raise HttpError(400, f"The point definition is not valid JSON: {exc}") from None
        name = body.get("Name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "*?\\|"):
            raise HttpError(400, "The point definition needs a 'Name' without * ? \\ or |.")
        point_type = body.get("PointType") if isinstance(body, dict) else None
        kind = _KIND_OF_POINT_TYPE.get(str(point_type).lower()) if point_type else None
        if point_type and kind is None:
            raise HttpError(400, f"PointType '{point_type}' is not supported by the simulator.")
        try:
            tag = self.model.add(f"\\\\{server}\\{name.strip()}", kind)
        except ValueError:
            raise HttpError(409, f"A PI Point named '{name}' already exists on '{server}'.") from None
        return Reply(201, None, (("Location", f"{ctx.base_url}/points/{tag.webid}"),))

    def _delete_point(self, ctx: Context) -> Reply:
        """``DELETE points/{webId}``: 204."""
        self.model.remove(self.resolve_point(ctx.args[0]).webid)
        return Reply(204, None)

    def _point_by_path(self, ctx: Context) -> Reply:
        path = ctx.query.one("path")
        if not path:
            raise HttpError(400, "The 'path' parameter is required.")
        return Reply(200, point(self.resolve_path(path), ctx.base_url))

    def _point_by_webid(self, ctx: Context) -> Reply:
        return Reply(200, point(self.resolve_point(ctx.args[0]), ctx.base_url))

    def _points_multiple(self, ctx: Context) -> Reply:
        return self._multiple(ctx, self.resolve_path, self.resolve_point, point)

    def _attribute_by_path(self, ctx: Context) -> Reply:
        path = ctx.query.one("path")
        if not path:
            raise HttpError(400, "The 'path' parameter is required.")
        return Reply(200, attribute(self.resolve_attribute_path(path), ctx.base_url))

    def _attribute_by_webid(self, ctx: Context) -> Reply:
        return Reply(200, attribute(self.resolve_attribute(ctx.args[0]), ctx.base_url))

    def _attributes_multiple(self, ctx: Context) -> Reply:
        return self._multiple(ctx, self.resolve_attribute_path, self.resolve_attribute, attribute)

    def _multiple(
        self,
        ctx: Context,
        by_path: Callable[[str], SimTag],
        by_webid: Callable[[str], SimTag],
        render: Callable[[SimTag, str], Any],
    ) -> Reply:
        """``points/multiple`` and ``attributes/multiple``: ``Items[{Identifier, Object, Exception}]``."""
        wanted = [("Path", p) for p in ctx.query.all("path")] + [("WebId", w) for w in ctx.query.all("webId")]
        if not wanted:
            raise HttpError(400, "At least one 'path' or 'webId' parameter is required.")
        items = []
        failed = False
        base_url = ctx.base_url
        for kind, identifier in wanted:
            try:
                tag = by_path(identifier) if kind == "Path" else by_webid(identifier)
            except HttpError as exc:
                failed = True
                items.append(PointItem(identifier, kind, None, errors(*exc.messages)))
            else:
                items.append(PointItem(identifier, kind, render(tag, base_url), None))
        return Reply(207 if failed else 200, StreamItems(Links={}, Items=items))

    def _recorded_events(self, tag: SimTag, ctx: Context) -> list[SimEvent]:
        q = ctx.query
        start = parse_time(q.one("startTime") or "*-1d", ctx.now_us)
        end = parse_time(q.one("endTime") or "*", ctx.now_us)
        max_count = q.integer(
            "maxCount",
            1000,
            1,
            MAX_RETURNED_ITEMS_PER_CALL,
            too_big=f"The maximum number of items per call ({MAX_RETURNED_ITEMS_PER_CALL}) was exceeded; "
            "request fewer items (maxCount) or raise MaxReturnedItemsPerCall.",
        )
        boundary = (q.one("boundaryType") or "Inside").lower()
        if boundary not in ("inside", "outside"):
            raise HttpError(400, f"boundaryType '{q.one('boundaryType')}' is not supported by the simulator.")
        reverse = start > end  # PI answers a backwards range newest first
        lo, hi = (end, start) if reverse else (start, end)
        hi = min(hi, ctx.now_us)  # nothing is archived in the future
        if boundary == "outside":
            before = self.model.latest(tag, lo - 1)
            if before is not None:
                lo = before.timestamp_us
            after = self.model.next_after(tag, hi)
            if after.timestamp_us <= ctx.now_us:
                hi = after.timestamp_us
        return self.model.events(tag, lo, hi, max_count=max_count, reverse=reverse)

    def _recorded(self, ctx: Context) -> Reply:
        tag = self.resolve_webid(ctx.args[0])
        events = self._recorded_events(tag, ctx)
        return Reply(
            200,
            TimedValues(
                Links={}, Items=self.wire.timed_values(events, tag.units), UnitsAbbreviation=tag.units
            ),
        )

    def _value(self, ctx: Context) -> Reply:
        tag = self.resolve_webid(ctx.args[0])
        event = self.model.latest(tag, ctx.now_us)
        if event is None:
            raise HttpError(404, f"No value for '{tag.path}'.")
        return Reply(200, self.wire.timed_value(event, tag.units))

    def _streamset_recorded(self, ctx: Context) -> Reply:
        webids = ctx.query.all("webId")
        if not webids:
            raise HttpError(400, "At least one 'webId' parameter is required.")
        items: list[Any] = []
        failed = False
        for webid in webids:
            try:
                tag = self.resolve_webid(webid)
            except HttpError as exc:
                failed = True
                items.append(
                    {
                        "WebId": webid,
                        "Items": [],
                        "WebException": {"StatusCode": exc.status, "Errors": list(exc.messages)},
                    }
                )
                continue
            items.append(self.wire.stream_values(tag, self._recorded_events(tag, ctx)))
        return Reply(207 if failed else 200, StreamItems(Links={}, Items=items))

    def _channel_without_upgrade(self, ctx: Context) -> Reply:
        raise HttpError(400, "Channels require a WebSocket upgrade request (Upgrade: websocket).")

    # -- channels --------------------------------------------------------------------------------------

    def channel_spec(self, target: str) -> ChannelSpec | Reply:
        """Validate a channel upgrade request: the spec to serve, or the error Reply to reject it with."""
        try:
            segments, query_text = split_target(target)
            lowered = [s.lower() for s in segments]
            query = Query.parse(query_text)
            if len(segments) == 3 and lowered[0] == "streams" and lowered[2] == "channel":
                webids = [segments[1]]
            elif lowered == ["streamsets", "channel"]:
                webids = query.all("webId")
                if not webids:
                    raise HttpError(400, "At least one 'webId' parameter is required.")
            else:
                raise HttpError(404, f"The resource '/piwebapi/{'/'.join(segments)}' is not a channel.")
            tags: list[SimTag] = []
            failures: list[HttpError] = []
            for webid in webids:
                try:
                    tags.append(self.resolve_webid(webid))
                except HttpError as exc:
                    failures.append(exc)
            if failures:
                status = 400 if any(f.status == 400 for f in failures) else 404
                raise HttpError(status, *(m for f in failures for m in f.messages))
            return ChannelSpec(
                tags=tuple(dict.fromkeys(tags)),  # a stream listed twice is served once
                include_initial_values=query.boolean("includeInitialValues", False),
                heartbeat_rate=query.integer("heartbeatRate", 0, 0, 2**31 - 1),
            )
        except HttpError as exc:
            return exc.reply()

    # -- batch -------------------------------------------------------------------------------------------

    def _batch(self, ctx: Context) -> Reply:
        try:
            requests = DECODER.decode(ctx.body)
        except msgspec.DecodeError as exc:
            raise HttpError(400, f"The batch request body is not valid JSON: {exc}") from None
        if not isinstance(requests, dict) or not all(isinstance(r, dict) for r in requests.values()):
            raise HttpError(400, "The batch request body must be an object of request objects.")
        results: dict[str, dict[str, Any]] = {}
        for request_id in _batch_order(requests):
            results[request_id] = self._batch_one(requests[request_id], requests, results, ctx)
        return Reply(207, {request_id: results[request_id] for request_id in requests})

    def _batch_one(
        self,
        request: dict[str, Any],
        requests: dict[str, Any],
        results: dict[str, dict[str, Any]],
        ctx: Context,
    ) -> dict[str, Any]:
        def fail(status: int, message: str) -> dict[str, Any]:
            return {"Status": status, "Headers": dict(_JSON_HEADERS), "Content": errors(message)}

        for parent in request.get("ParentIds") or []:
            if parent not in requests:
                return fail(400, f"Unknown parent request id '{parent}'.")
            if parent not in results:
                return fail(400, f"Circular dependency through parent request '{parent}'.")
            if not 200 <= results[parent]["Status"] < 300:
                return fail(409, f"The parent request '{parent}' failed.")
        if request.get("RequestTemplate"):
            return fail(400, "RequestTemplate is not supported by the simulator.")
        resource = request.get("Resource")
        if not isinstance(resource, str) or not resource:
            return fail(400, "The 'Resource' property is required.")
        try:
            resource = _substitute(resource, request.get("Parameters") or [], results)
        except ValueError as exc:
            return fail(400, str(exc))
        parts = urlsplit(resource)
        path = parts.path if parts.path.startswith("/") else "/piwebapi/" + parts.path
        if path.lower().rstrip("/") == "/piwebapi/batch":
            return fail(400, "Nested batch requests are not supported.")
        method = str(request.get("Method") or "GET").upper()
        content = request.get("Content")
        body = content.encode("utf-8") if isinstance(content, str) else b""
        target = path + ("?" + parts.query if parts.query else "")
        reply = self._dispatch(method, target, body, ctx.base_url, ctx.now_us)
        return {
            "Status": reply.status,
            "Headers": dict(_JSON_HEADERS),
            "Content": msgspec.to_builtins(reply.content),
        }


def _batch_order(requests: dict[str, Any]) -> list[str]:
    """Parents before children; members of a cycle come out where they are met (and then fail)."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(request_id: str) -> None:
        if state.get(request_id):
            return
        state[request_id] = 1
        for parent in requests[request_id].get("ParentIds") or []:
            if parent in requests and not state.get(parent):
                visit(parent)
        state[request_id] = 2
        order.append(request_id)

    for request_id in requests:
        visit(request_id)
    return order


_JSONPATH_TOKEN = re.compile(r"\.([^.\[\]]+)|\[(\*|\d+)\]|\['([^']*)'\]")


def _jsonpath(expr: str, root: dict[str, Any]) -> list[Any]:
    """The values ``$.Id.Content.Items[*].WebId`` selects from the batch results (a small JSONPath)."""
    if not expr.startswith("$"):
        raise ValueError(f"Parameter '{expr}' is not a JSONPath starting with '$'.")
    nodes: list[Any] = [root]
    pos = 1
    while pos < len(expr):
        m = _JSONPATH_TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"Cannot parse the JSONPath '{expr}'.")
        pos = m.end()
        key, index, quoted = m.group(1), m.group(2), m.group(3)
        out: list[Any] = []
        for node in nodes:
            if index == "*":
                out.extend(
                    node if isinstance(node, list) else node.values() if isinstance(node, dict) else []
                )
            elif index is not None:
                if isinstance(node, list) and int(index) < len(node):
                    out.append(node[int(index)])
            elif isinstance(node, dict):
                name = key if key is not None else quoted
                if name in node:
                    out.append(node[name])
                else:
                    out.extend(v for k, v in node.items() if k.lower() == name.lower())
        nodes = out
    return nodes


def _repeat_parameter(values: list[str]) -> Callable[[re.Match[str]], str]:
    """``name={0}`` with several values -> ``name=a&name=b``."""

    def repeat(m: re.Match[str]) -> str:
        return "&".join(f"{m[1]}={quote(v, safe='')}" for v in values)

    return repeat


def _substitute(resource: str, parameters: list[str], results: dict[str, dict[str, Any]]) -> str:
    """Fill ``{0}``, ``{1}``... from parent results; several values repeat the query parameter."""
    for j, expr in enumerate(parameters):
        values = [
            "true" if v is True else "false" if v is False else str(v) for v in _jsonpath(expr, results)
        ]
        if not values:
            raise ValueError(f"The parameter '{expr}' selected no value.")
        placeholder = "{" + str(j) + "}"
        if len(values) > 1:
            resource = re.sub(rf"([A-Za-z]+)={re.escape(placeholder)}", _repeat_parameter(values), resource)
        resource = resource.replace(placeholder, quote(values[0], safe=""))
    return resource
