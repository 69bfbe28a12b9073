"""Who may call the simulator: Basic and Bearer authentication, an OIDC client-credentials token endpoint,
and a per-client-IP rate limit. Decisions only (``HttpRequest`` in, ``HttpResponse`` or None out): the
``server`` module calls them before routing.

Bearer tokens are accepted when listed in ``bearer_tokens`` or issued by the token endpoint and not expired
(by the simulator's clock). The token endpoint is an identity provider on the same port, outside
``/piwebapi``: ``GET /.well-known/openid-configuration`` names ``token_endpoint`` = ``/oauth2/token``, which
takes ``grant_type=client_credentials`` with ``client_id``/``client_secret`` in the form body
(client_secret_post) or as HTTP Basic (client_secret_basic).
"""

from __future__ import annotations

import base64
import binascii
import collections
import hmac
import math
import secrets
from collections.abc import Callable, Iterable, Mapping
from urllib.parse import parse_qsl

import trio

from pistream.sim.connection import HttpRequest, HttpResponse
from pistream.sim.payloads import ENCODER

BASIC_CHALLENGE = 'Basic realm="PI Web API"'
BEARER_CHALLENGE = 'Bearer realm="PI Web API"'
DISCOVERY_PATH = "/.well-known/openid-configuration"
TOKEN_PATH = "/oauth2/token"
MAX_ISSUED_TOKENS = 10_000
_DENIED = "Authorization has been denied for this request."


def _decode_basic(credentials: str) -> tuple[str, str] | None:
    try:
        user, sep, password = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class Authenticator:
    """Basic and/or Bearer checks; with none configured every request passes."""

    def __init__(
        self,
        *,
        basic_auth: tuple[str, str] | None = None,
        bearer_tokens: Iterable[str] | None = None,
        oidc_clients: Mapping[str, str] | None = None,
        token_lifetime: float = 3600.0,
        clock: Callable[[], float],
    ) -> None:
        if token_lifetime <= 0:
            raise ValueError(f"token_lifetime must be > 0 s, got {token_lifetime}")
        self.basic_auth = basic_auth
        self.bearer_tokens = frozenset(bearer_tokens or ())
        self.oidc_clients = dict(oidc_clients or {})
        self.bearer = bearer_tokens is not None or bool(self.oidc_clients)
        self.token_lifetime = token_lifetime
        self.clock = clock
        self._issued: dict[str, float] = {}  # token -> expiry (clock seconds), oldest first
        self.tokens_issued = 0

    @property
    def enabled(self) -> bool:
        return self.basic_auth is not None or self.bearer

    def check(self, request: HttpRequest) -> HttpResponse | None:
        """None when the request may pass, else the 401 answer with the challenges of every scheme."""
        if not self.enabled:
            return None
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        scheme = scheme.lower()
        credentials = credentials.strip()
        bearer_error = ""
        if scheme == "basic" and self.basic_auth is not None:
            decoded = _decode_basic(credentials)
            if decoded is not None:
                user_ok = _same(decoded[0], self.basic_auth[0])
                password_ok = _same(decoded[1], self.basic_auth[1])
                if user_ok and password_ok:
                    return None
        elif scheme == "bearer" and self.bearer:
            status = self.token_status(credentials)
            if status == "valid":
                return None
            bearer_error = (
                ', error="invalid_token", error_description="The access token expired"'
                if status == "expired"
                else ', error="invalid_token", error_description="The access token is not valid"'
            )
        challenges = []
        if self.basic_auth is not None:
            challenges.append(("WWW-Authenticate", BASIC_CHALLENGE))
        if self.bearer:
            challenges.append(("WWW-Authenticate", BEARER_CHALLENGE + bearer_error))
        return HttpResponse.error(401, _DENIED, challenges)

    def token_status(self, token: str) -> str:
        """``valid``, ``expired`` or ``unknown``."""
        if token and any(_same(token, known) for known in self.bearer_tokens):
            return "valid"
        expiry = self._issued.get(token)
        if expiry is None:
            return "unknown"
        return "valid" if self.clock() < expiry else "expired"

    def issue_token(self) -> str:
        """A new access token valid for ``token_lifetime`` seconds of the simulator's clock."""
        now = self.clock()
        for token, expiry in list(self._issued.items()):  # drop long-expired ones, keep the dict bounded
            if expiry < now - self.token_lifetime or len(self._issued) >= MAX_ISSUED_TOKENS:
                del self._issued[token]
        token = secrets.token_urlsafe(32)
        self._issued[token] = now + self.token_lifetime
        self.tokens_issued += 1
        return token

    # -- the identity provider -------------------------------------------------------------------------

    def is_oidc_path(self, path: str) -> bool:
        return bool(self.oidc_clients) and path in (DISCOVERY_PATH, TOKEN_PATH)

    def handle_oidc(self, request: HttpRequest, issuer: str) -> HttpResponse:
        if request.path == DISCOVERY_PATH:
            if request.method != "GET":
                return _oauth_error(405, "invalid_request", "Use GET.")
            document = {
                "issuer": issuer,
                "token_endpoint": issuer + TOKEN_PATH,
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
                "response_types_supported": ["token"],
            }
            return HttpResponse(200, ENCODER.encode(document))
        return self._token(request)

    def _token(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST":
            return _oauth_error(405, "invalid_request", "The token endpoint takes POST requests.")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            return _oauth_error(400, "invalid_request", "Send an application/x-www-form-urlencoded body.")
        try:
            form = dict(parse_qsl(request.body.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError:
            return _oauth_error(400, "invalid_request", "The form body is not UTF-8.")
        grant_type = form.get("grant_type")
        if not grant_type:
            return _oauth_error(400, "invalid_request", "grant_type is required.")
        if grant_type != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type", f"grant_type {grant_type!r} is not supported.")
        client_id, client_secret = form.get("client_id", ""), form.get("client_secret", "")
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            decoded = _decode_basic(credentials.strip())
            if decoded is not None:
                client_id, client_secret = decoded
        expected = self.oidc_clients.get(client_id)
        if expected is None or not _same(client_secret, expected):
            return _oauth_error(401, "invalid_client", "Unknown client or wrong client secret.")
        body = {
            "access_token": self.issue_token(),
            "token_type": "Bearer",
            "expires_in": max(1, math.floor(self.token_lifetime)),
        }
        return HttpResponse(200, ENCODER.encode(body), [("Cache-Control", "no-store")])


def _oauth_error(status: int, error: str, description: str) -> HttpResponse:
    return HttpResponse(status, ENCODER.encode({"error": error, "error_description": description}))


class RateLimiter:
    """At most ``limit`` requests per ``window`` seconds (sliding, Trio's clock) per client IP."""

    def __init__(self, limit: int, window: float = 1.0) -> None:
        if limit < 1:
            raise ValueError(f"rate limit must be >= 1 request per second, got {limit}")
        self.limit = limit
        self.window = window
        self._seen: dict[str, collections.deque[float]] = {}
        self.rejected = 0

    def retry_after(self, client: str) -> int | None:
        """None if the request may pass (it is counted), else the whole seconds to wait (>= 1)."""
        now = trio.current_time()
        times = self._seen.get(client)
        if times is None:
            if len(self._seen) > 10_000:  # forget idle clients; the map stays bounded
                self._seen = {c: t for c, t in self._seen.items() if t and t[-1] > now - self.window}
            times = self._seen[client] = collections.deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) < self.limit:
            times.append(now)
            return None
        self.rejected += 1
        return max(1, math.ceil(times[0] + self.window - now))

    def reject(self, retry_after: int) -> HttpResponse:
        return HttpResponse.error(
            429,
            "Too many requests: this client exceeded the rate limit; retry later.",
            [("Retry-After", str(retry_after))],
        )
