"""The PI Web API REST client (httpx): root check, bulk tag resolution, name masks, recorded values.

Every call has a timeout; every failure leaves this module as one PistreamError that names the cause and
the option that fixes it. Credentials ride in headers built by ``auth`` and never appear in messages.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote, urlsplit

import httpx
import msgspec
import structlog
import trio

from ..errors import AuthError, ConnectError, ServerError, UnknownTagsError, UnreachableError
from ..timeutil import format_iso
from .auth import AuthProvider, HttpxAuth, NoAuth
from .messages import StreamSetMessage, channel_decoder
from .tls import certificate_issuer
from .webid import dataserver_webid, path_webid

log = structlog.get_logger(__name__)

Decoded = TypeVar("Decoded")

DEFAULT_TIMEOUT = 30.0
LOOKUP_CHUNK = 500  # paths per points/multiple request, within the URL length budget
POINTS_PAGE = 1000  # points per dataservers/{webId}/points page (the endpoint's default maxCount)
MAX_POINT_PAGES = 10_000  # 10 M points: a server that never says "no more" cannot keep us paging
REQUESTED_WITH = {"X-Requested-With": "pistream"}


class PIPoint(msgspec.Struct, rename="pascal"):
    """A PI point or an AF attribute, as ``points/multiple`` / ``attributes/multiple`` describe them: only
    the fields pistream uses are decoded (at 100,000 tags every other one was a str per tag)."""

    web_id: str | None = None
    engineering_units: str | None = None
    default_units_name_abbreviation: str | None = None  # attributes


class _Errors(msgspec.Struct, rename="pascal"):
    errors: list[str] | None = None


class _PointItem(msgspec.Struct, rename="pascal"):
    identifier: str | None = None
    object: PIPoint | None = None
    exception: _Errors | None = None


class _PointsMultiple(msgspec.Struct, rename="pascal"):
    items: list[_PointItem] | None = None


class _FoundPoint(msgspec.Struct, rename="pascal"):
    name: str | None = None
    path: str | None = None
    engineering_units: str | None = None


class _PointsPage(msgspec.Struct, rename="pascal"):
    items: list[_FoundPoint] | None = None
    web_exception: object | None = None


_points_decoder = msgspec.json.Decoder(_PointsMultiple)
_page_decoder = msgspec.json.Decoder(_PointsPage)
_errors_decoder = msgspec.json.Decoder(_Errors)


@dataclass
class ResolvedTags:
    """The tags the server confirmed, in the order listed: the WebIDs pistream subscribes with and their
    units (one str per distinct unit). Parallel lists, not an object per tag: at 100,000 tags those were
    ~500,000 small objects at startup, whose high-water mark pymalloc keeps for the whole run."""

    paths: list[str]
    webids: list[str]
    uoms: list[str | None]

    def __len__(self) -> int:
        return len(self.paths)


def _error_text(response: httpx.Response) -> str:
    try:
        errors = _errors_decoder.decode(response.content).errors
    except msgspec.DecodeError:
        errors = None
    return "; ".join(errors) if errors else f"HTTP {response.status_code}"


def _origin(base_url: str) -> str:
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything behind it: causes, contexts and the members of exception groups (httpx on
    trio wraps an ``ssl`` or ``socket`` error three levels deep, and failed connects in a group)."""
    found: list[BaseException] = []
    todo = [exc]
    while todo:
        current = todo.pop()
        if any(current is seen for seen in found):
            continue
        found.append(current)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
    return found


def certificate_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error behind a transport failure, if that is what it was."""
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause
    return None


def translate_transport_error(exc: Exception, base_url: str, issuer: str | None = None) -> ConnectError:
    """One clear message for a failure to reach the server at all (DNS, refused, TLS, timeout). A server
    that did not answer is an ``UnreachableError`` (it may answer later: retried at start); a certificate
    pistream does not trust stays a ``ConnectError`` (exit 2: a person must pass --ca-bundle)."""
    where = _origin(base_url)
    causes = _causes(exc)
    text = next((str(c) for c in causes if str(c)), type(exc).__name__)
    certificate = certificate_failure(exc)
    if certificate is not None or "CERTIFICATE_VERIFY_FAILED" in text:
        return untrusted_certificate_error(base_url, str(certificate or text), issuer)
    if isinstance(exc, httpx.TimeoutException):
        return UnreachableError(f"PI Web API at {where} did not answer in time ({text}): check --url and the network")
    gaierror = next((c for c in causes if isinstance(c, socket.gaierror)), None)
    if gaierror is not None or "Name or service not known" in text or "nodename nor servname" in text:
        detail = f" ({gaierror.strerror})" if gaierror is not None and gaierror.strerror else ""
        return UnreachableError(f"cannot resolve the host of {where}{detail}: check the host name in --url")
    if any(isinstance(c, ConnectionRefusedError) for c in causes) or "refused" in text.lower():
        return UnreachableError(f"connection to {where} refused: is PI Web API running there? check --url")
    return UnreachableError(f"cannot reach PI Web API at {where} ({text}): check --url and the network")


def untrusted_certificate_error(base_url: str, detail: str, issuer: str | None = None) -> ConnectError:
    """Name who issued the certificate, and the option that makes pistream trust it (``issuer``: from
    ``tls.certificate_issuer``, which callers in the event loop run in a thread)."""
    reason = detail.split("certificate verify failed:")[-1] if "verify failed" in detail else detail
    reason = re.sub(r"\s*\(_ssl\.c:\d+\)", "", reason).strip(" )'\"")
    if "mismatch" in reason.lower() or "doesn't match" in reason.lower():
        return ConnectError(
            f"TLS certificate of {_origin(base_url)} names another host ({reason}): use the host name the "
            "certificate was issued for in --url"
        )
    who = f"issued by {issuer}" if issuer else "issuer unknown"
    return ConnectError(
        f"TLS certificate of {_origin(base_url)} is not trusted ({who}; {reason}): pass --ca-bundle PATH with "
        "that CA's certificate (PEM), or add the CA to the operating system's trust store"
    )


class PiWebApi:
    """A PI Web API session; use as ``async with PiWebApi(url, headers=...) as api``."""

    def __init__(
        self,
        base_url: str,
        *,
        auth: AuthProvider | None = None,
        verify: ssl.SSLContext | bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        max_url_length: int = 6000,
        auth_hint: str = "check --username and the PISTREAM_PASSWORD variable",
    ):
        self.base_url = base_url.rstrip("/")
        self.max_url_length = max_url_length
        self.auth_hint = auth_hint
        self._client = httpx.AsyncClient(
            base_url=self.base_url + "/",
            auth=HttpxAuth(auth or NoAuth()),
            verify=verify,
            timeout=timeout,
            follow_redirects=False,
        )

    async def __aenter__(self) -> PiWebApi:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.aclose()

    async def _get(self, path: str, params: list[tuple[str, str]] | None = None) -> httpx.Response:
        try:
            response = await self._client.get(path, params=tuple(params or ()))
        except httpx.TransportError as exc:
            issuer = None
            if certificate_failure(exc) is not None:  # who issued it: a blocking fetch, so in a thread
                parts = urlsplit(self.base_url)
                issuer = await trio.to_thread.run_sync(certificate_issuer, parts.hostname or "", parts.port or 443)
            raise translate_transport_error(exc, self.base_url, issuer) from exc
        if response.status_code in (401, 403):
            challenge = response.headers.get("WWW-Authenticate", "")
            scheme = challenge.split(" ")[0]
            said = re.search(r'error_description="([^"]*)"', challenge)
            offered = f"; the server asks for {scheme}" if scheme else ""
            offered += f" and says: {said.group(1)}" if said else ""
            raise AuthError(
                f"PI Web API refused the credentials ({response.status_code}: {_error_text(response)}"
                f"{offered}): {self.auth_hint}"
            )
        return response

    async def check_root(self) -> None:
        """Fail early, with a clear message, when the URL is not a reachable PI Web API."""
        response = await self._get("")
        if response.status_code == 404:
            raise ConnectError(
                f"{self.base_url} is not a PI Web API root (404): --url must end in /piwebapi"
            )
        if response.status_code == 429 or response.status_code >= 500:  # starting, overloaded: retried at start
            raise RetryableError(f"PI Web API at {self.base_url} answered {response.status_code}: "
                                 f"{_error_text(response)}", _retry_after(response))
        if response.status_code >= 400:
            raise ServerError(f"PI Web API at {self.base_url} answered {response.status_code}: "
                              f"{_error_text(response)}")

    async def recorded(self, webids: list[str], start_us: int, end_time: str, max_count: int,
                       decode: Callable[[bytes], Decoded | None] | None = None) -> StreamSetMessage | Decoded:
        """One ``streamsets/recorded`` call (no paging: the caller re-asks for streams cut at max_count).
        ``decode`` may read the answer first (the history reader's columns); where it returns None, msgspec
        decodes it, and reports it when it is not PI Web API JSON."""
        params = [("webId", w) for w in webids] + [
            ("startTime", format_iso(start_us)), ("endTime", end_time), ("boundaryType", "Inside"),
            ("maxCount", str(max_count)),
        ]
        response = await self._get("streamsets/recorded", params)
        if response.status_code == 429 or response.status_code >= 500:
            raise RetryableError(f"recorded values: HTTP {response.status_code} ({_error_text(response)})",
                                 _retry_after(response))
        if response.status_code != 200:
            raise ServerError(f"recorded values refused ({response.status_code}: {_error_text(response)})")
        if decode is not None:
            decoded = decode(response.content)
            if decoded is not None:
                return decoded
        try:
            message = channel_decoder.decode(response.content)
        except msgspec.DecodeError as exc:
            raise RetryableError(f"recorded values answer is not PI Web API JSON: {exc}", None) from exc
        if message.web_exception is not None:
            raise RetryableError(f"recorded values answer cut short: {message.web_exception}", None)
        return message

    def _chunks(self, endpoint: str, paths: list[str]) -> Iterable[list[str]]:
        """Split lookups so that no request URL exceeds the configured length (HTTP.sys limits)."""
        base = len(self.base_url) + len(f"/{endpoint}?webIdType=PathOnly")
        chunk: list[str] = []
        size = base
        for p in paths:
            cost = len("&path=") + len(quote(p, safe=""))
            if chunk and (size + cost > self.max_url_length or len(chunk) >= LOOKUP_CHUNK):
                yield chunk
                chunk, size = [], base
            chunk.append(p)
            size += cost
        if chunk:
            yield chunk

    async def resolve(self, paths: list[str], concurrency: int = 4) -> tuple[ResolvedTags, list[str]]:
        """Confirm client-computed path-only WebIDs in bulk, points and AF attributes alike, a few
        requests at a time; returns (resolved in the given order, unknown paths)."""
        webids: dict[str, str] = {}
        uoms: dict[str, str | None] = {}
        units: dict[str, str] = {}  # one str per distinct unit
        limiter = trio.CapacityLimiter(concurrency)
        points = [p for p in paths if "|" not in p]
        attributes = [p for p in paths if "|" in p]

        async def lookup(endpoint: str, chunk: list[str]) -> None:
            async with limiter:
                await self._lookup(endpoint, chunk, webids, uoms, units)

        async with trio.open_nursery() as nursery:
            for endpoint, group in (("points/multiple", points), ("attributes/multiple", attributes)):
                for chunk in self._chunks(endpoint, group):
                    nursery.start_soon(lookup, endpoint, chunk)
        found = [p for p in paths if p in webids]
        resolved = ResolvedTags(found, [webids[p] for p in found], [uoms[p] for p in found])
        return resolved, [p for p in paths if p not in webids]

    async def find_points(self, mask: str, page_size: int = POINTS_PAGE) -> ResolvedTags:
        r"""The points a name mask (``\\SERVER\FIC*``) matches, in the server's order: ``GET
        dataservers/{webId}/points?nameFilter=`` page by page (``startIndex``, ``maxCount``) until a page
        comes back short. The server's WebID is computed (path-only), so this is one call per page."""
        server, _, name_filter = mask[2:].partition("\\")
        endpoint = f"dataservers/{dataserver_webid(mask[:2] + server)}/points"
        start = 0
        paths: list[str] = []
        uoms: list[str | None] = []
        units: dict[str, str] = {}
        for _ in range(MAX_POINT_PAGES):
            params = [("nameFilter", name_filter), ("startIndex", str(start)), ("maxCount", str(page_size)),
                      ("selectedFields", "Items.Name;Items.Path;Items.EngineeringUnits")]
            response = await self._get_with_retry(endpoint, params)
            if response.status_code == 404:
                raise ServerError(f"mask {mask}: PI Data Archive {server!r} not found ({_error_text(response)}): "
                                  "check the server name in the tags file")
            if response.status_code != 200:
                raise ServerError(f"mask {mask}: point search failed ({response.status_code}: "
                                  f"{_error_text(response)})")
            try:
                page = _page_decoder.decode(response.content)
            except msgspec.DecodeError as exc:
                raise ServerError(f"mask {mask}: point search answer is not PI Web API JSON: {exc}") from exc
            if page.web_exception is not None:
                raise ServerError(f"mask {mask}: point search answer cut short: {page.web_exception}")
            items = page.items or []
            start += len(items)
            for item in items:
                path = item.path or (f"\\\\{server}\\{item.name}" if item.name else None)
                if path is None:
                    continue
                paths.append(path)
                uom = item.engineering_units or None
                uoms.append(units.setdefault(uom, uom) if uom else None)
            if len(items) < page_size:
                break
        else:
            raise ServerError(f"mask {mask}: more than {MAX_POINT_PAGES * page_size} points: narrow the mask")
        return ResolvedTags(paths, [path_webid(p) for p in paths], uoms)

    async def _lookup(self, endpoint: str, chunk: list[str], webids: dict[str, str],
                      uoms: dict[str, str | None], units: dict[str, str]) -> None:
        """Resolve one chunk of paths into ``webids`` and ``uoms`` (by path); unknown paths are left out."""
        params = [("webIdType", "PathOnly")] + [("path", p) for p in chunk]
        response = await self._get_with_retry(endpoint, params)
        if response.status_code == 429 or response.status_code >= 500:
            raise RetryableError(f"tag lookup failed ({response.status_code}: {_error_text(response)})",
                                 _retry_after(response))
        if response.status_code not in (200, 207):
            raise ServerError(f"tag lookup failed ({response.status_code}: {_error_text(response)})")
        try:
            items = _points_decoder.decode(response.content).items or []
        except msgspec.DecodeError as exc:
            raise ServerError(f"tag lookup answer is not PI Web API JSON: {exc}") from exc
        by_identifier = {(item.identifier or "").casefold(): item for item in items}
        for path in chunk:
            item = by_identifier.get(path.casefold())
            if item is None or item.object is None:
                continue
            found = item.object
            webid = path_webid(path)
            if found.web_id and found.web_id != webid:
                log.debug("webid_differs", tag=path, computed=webid, server=found.web_id)
            webids[path] = webid
            uom = found.engineering_units or found.default_units_name_abbreviation or None
            uoms[path] = units.setdefault(uom, uom) if uom else None

    async def _get_with_retry(self, path: str, params: list[tuple[str, str]],
                              attempts: int = 6) -> httpx.Response:
        """GET, honouring 429 and Retry-After (and riding out 502/503) a bounded number of times."""
        delay = 0.5
        for attempt in range(1, attempts + 1):
            response = await self._get(path, params)
            if response.status_code not in (429, 502, 503) or attempt == attempts:
                return response
            wait = _retry_after(response)
            wait = min(60.0, wait if wait is not None else delay)
            log.warning("request_throttled", path=path, status=response.status_code, retry_in=wait)
            await trio.sleep(wait)
            delay = min(30.0, delay * 2)
        raise AssertionError("unreachable")


class RetryableError(ServerError):
    """429 or 5xx: the server may answer later; ``retry_after`` is its hint in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None):
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None


def unknown_tags_error(unknown: list[str], total: int, listing: str | None = None) -> UnknownTagsError:
    """All unknown tags in one message: the first few named, the count, where the full list is, the fix."""
    shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    where = f" (all of them in {listing})" if listing and len(unknown) > 5 else ""
    return UnknownTagsError(
        f"{len(unknown)} of {total} tags are not known to PI Web API: {shown}{where}; "
        "fix or remove them in the tags file (or pass --skip-unknown to go on without them)",
        unknown,
    )
