"""Authorization headers, computed before each request: WebSocket clients cannot answer a 401
challenge, so the same header must ride on the REST calls and on the channel upgrade alike.

Providers: Basic, Bearer (a given token), OIDC client credentials (token from the issuer's token
endpoint, refreshed before it expires) and Kerberos/Negotiate (a SPNEGO token for ``HTTP@host`` from
pyspnego: SSPI on Windows, GSSAPI on Linux). Secrets are held here and never logged or put in messages.
"""

from __future__ import annotations

import base64
import importlib.util
import sys
import time
from collections.abc import AsyncGenerator, Callable
from typing import Protocol
from urllib.parse import urlsplit

import httpx
import msgspec
import structlog

from ..errors import AuthError, ConfigError, UnreachableError

log = structlog.get_logger(__name__)

TOKEN_REFRESH_MARGIN = 60.0  # seconds before expiry


class AuthProvider(Protocol):
    async def headers(self, url: str) -> dict[str, str]:
        """The headers to send with a request to ``url``."""
        ...


class NoAuth:
    async def headers(self, url: str) -> dict[str, str]:
        return {}


class BasicAuth:
    def __init__(self, username: str, password: str):
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        self._header = {"Authorization": f"Basic {token}"}

    async def headers(self, url: str) -> dict[str, str]:
        return self._header

    def __repr__(self) -> str:
        return "BasicAuth(***)"


class BearerToken:
    def __init__(self, token: str):
        self._header = {"Authorization": f"Bearer {token}"}

    async def headers(self, url: str) -> dict[str, str]:
        return self._header

    def __repr__(self) -> str:
        return "BearerToken(***)"


class _Discovery(msgspec.Struct):
    token_endpoint: str


class _TokenAnswer(msgspec.Struct):
    access_token: str
    expires_in: float = 3600.0
    token_type: str = "Bearer"


class OidcClientCredentials:
    """OAuth 2.0 client credentials: discovers the token endpoint from the issuer, caches the token."""

    def __init__(self, issuer: str, client_id: str, client_secret: str, *, scope: str | None = None,
                 verify: object = True, timeout: float = 30.0):
        self.issuer = issuer.rstrip("/")
        self.client_id = client_id
        self._secret = client_secret
        self.scope = scope
        self._verify = verify
        self._timeout = timeout
        self._token: str | None = None
        self._expires_at = 0.0

    def __repr__(self) -> str:
        return f"OidcClientCredentials(issuer={self.issuer!r}, client_id={self.client_id!r})"

    async def headers(self, url: str) -> dict[str, str]:
        if self._token is None or time.monotonic() > self._expires_at - TOKEN_REFRESH_MARGIN:
            await self._refresh()
        return {"Authorization": f"Bearer {self._token}"}

    async def _refresh(self) -> None:
        discovery_url = f"{self.issuer}/.well-known/openid-configuration"
        async with httpx.AsyncClient(verify=self._verify, timeout=self._timeout) as client:  # type: ignore[arg-type]
            try:
                found = await client.get(discovery_url)
                if found.status_code != 200:
                    raise AuthError(f"OIDC discovery at {discovery_url} answered {found.status_code}: "
                                    "check --oidc-issuer")
                endpoint = msgspec.json.decode(found.content, type=_Discovery).token_endpoint
                form = {"grant_type": "client_credentials", "client_id": self.client_id,
                        "client_secret": self._secret}
                if self.scope:
                    form["scope"] = self.scope
                answer = await client.post(endpoint, data=form)
            except httpx.TransportError as exc:
                raise UnreachableError(f"cannot reach the OIDC issuer {self.issuer} ({type(exc).__name__}): "
                                       "check --oidc-issuer and the network") from exc
            except msgspec.DecodeError as exc:
                raise AuthError(f"OIDC discovery at {discovery_url} is not valid: {exc}") from exc
        if answer.status_code in (400, 401, 403):
            raise AuthError(f"the OIDC issuer refused client {self.client_id!r} ({answer.status_code}): "
                            "check --oidc-client-id and PISTREAM_OIDC_CLIENT_SECRET")
        if answer.status_code != 200:  # 5xx, 429: the issuer may answer later (retried at start)
            raise UnreachableError(f"the OIDC token endpoint answered {answer.status_code}: try again later")
        try:
            token = msgspec.json.decode(answer.content, type=_TokenAnswer)
        except msgspec.DecodeError as exc:
            raise AuthError(f"the OIDC token answer is not valid: {exc}") from exc
        self._token = token.access_token
        self._expires_at = time.monotonic() + token.expires_in
        log.info("oidc_token_acquired", issuer=self.issuer, client_id=self.client_id,
                 expires_in=token.expires_in)


def spnego_token(host: str) -> str:
    """A Kerberos/Negotiate token for ``HTTP@host`` from the current login (SSPI) or ticket cache."""
    try:
        import spnego
        import spnego.exceptions
    except ImportError as exc:  # pragma: no cover - pyspnego is a dependency
        raise ConfigError("Kerberos needs the pyspnego package: pip install pyspnego") from exc
    try:
        context = spnego.client(hostname=host, service="HTTP", protocol="negotiate")
        token = context.step()
    except spnego.exceptions.SpnegoError as exc:
        raise AuthError(
            f"no Kerberos credentials for HTTP/{host} ({_spnego_detail(exc)}): "
            "run kinit (Linux) or log on as the service account (Windows), or choose another --auth"
        ) from exc
    if not token:
        raise AuthError(f"Kerberos produced no token for HTTP/{host}: check the SPN and your ticket (klist)")
    return base64.b64encode(token).decode("ascii")


def _spnego_detail(exc: BaseException) -> str:
    """The innermost reason of pyspnego's nested "SpnegoError (1): SpnegoError (16): ..., Context: ..."
    text, plus the missing piece when this Python cannot do Kerberos at all (no gssapi on Linux: pyspnego
    then only tries NTLM, and even a valid kinit ticket would not be used)."""
    reason = None
    current: BaseException | None = exc
    while current is not None:
        reason = getattr(current, "_context_message", None) or reason or str(current)
        current = getattr(current, "base_error", None)
    detail = (reason or type(exc).__name__).rstrip(".")
    if sys.platform != "win32" and importlib.util.find_spec("gssapi") is None:
        detail += "; this Python has no Kerberos support: pip install 'pistream[kerberos]' (needs MIT krb5)"
    return detail


class NegotiateAuth:
    """Kerberos via SPNEGO; a fresh token per request, as each one is used once."""

    def __init__(self, token_for_host: Callable[[str], str] = spnego_token):
        self._token_for_host = token_for_host

    async def headers(self, url: str) -> dict[str, str]:
        host = urlsplit(url).hostname or ""
        return {"Authorization": f"Negotiate {self._token_for_host(host)}"}


class HttpxAuth(httpx.Auth):
    """Adapts a provider to httpx: the header is added to every request before it is sent."""

    def __init__(self, provider: AuthProvider):
        self.provider = provider

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        request.headers.update(await self.provider.headers(str(request.url)))
        yield request
