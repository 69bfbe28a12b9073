"""A Databricks workspace: which one and with which credentials (as the Databricks CLI and SDK find them),
and a small REST client for it with one translation of its errors.

Where the settings come from, first found wins, per attribute (the Databricks SDK's order):
``DATABRICKS_HOST`` / ``DATABRICKS_TOKEN`` / ``DATABRICKS_CLIENT_ID`` / ``DATABRICKS_CLIENT_SECRET``, then the
profile in ``~/.databrickscfg`` (``DATABRICKS_CONFIG_FILE`` names another file) chosen by
``--databricks-profile``, else ``DATABRICKS_CONFIG_PROFILE``, else ``DEFAULT``.

Authentication: a personal access token, or OAuth machine-to-machine (client credentials against
``{host}/oidc/v1/token``, scope ``all-apis``, the token cached until shortly before it expires). Other
``auth_type`` values (Azure CLI, ...) go through the optional databricks-sdk (``pistream[databricks]``),
imported only then: it costs ~45 MB and ~0.9 s at start.

Calls are blocking (httpx): they run at start and, for credential refreshes, in the commit writer's worker
thread. Tokens never appear in messages or logs; ``repr`` masks them. Every call says ``User-Agent:
pistream/<version>``.

Which calls are tried again after a failure (``Workspace.call``): GETs, the OAuth token POST (a second token
is harmless), ``temporary-table-credentials`` (it only mints short-lived credentials) and a statement's
``cancel`` (cancelling twice is a no-op) after no connection, 429 or 5xx. Two POSTs change the workspace and
are sent with ``resend=False``: ``POST /api/2.0/sql/statements`` (each one queues a new statement) and
``POST /api/2.1/unity-catalog/tables``. They are sent again only when they surely did not arrive (no
connection, 429, 503); when one may have arrived without an answer (read timeout, a dropped connection,
500/502/504) ``WorkspaceUncertain`` says so, and the caller looks (GET the table) before creating again.
"""

from __future__ import annotations

import configparser
import os
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog

from .. import __version__
from ..errors import AuthError, ConfigError, PistreamError, SinkError

log = structlog.get_logger(__name__)

TOKEN_MARGIN = 60.0  # an OAuth token is renewed this long before it expires
REQUEST_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
ATTEMPTS = 4  # a call that meets 429/5xx or no connection is tried this often, with backoff
USER_AGENT = f"pistream/{__version__}"
RETRIED_STATUS = (429, 500, 502, 503, 504)
NOT_RECEIVED_STATUS = (429, 503)  # refused before any work: safe to send again, whatever the call
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)  # the request never left


def is_loopback(hostname: str | None) -> bool:
    return hostname is not None and (hostname.startswith("127.") or hostname in ("localhost", "::1"))


class WorkspaceUnavailable(SinkError):
    """The workspace did not answer (outage, 5xx, throttling): like storage down, retried by the caller."""


class WorkspaceUncertain(WorkspaceUnavailable):
    """A call that must not run twice went out, but no answer came: it may or may not have been carried out."""


class WorkspaceError(PistreamError):
    """The workspace answered with an error pistream cannot act on; ``code`` is its ``error_code``."""

    def __init__(self, message: str, status: int, code: str):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class WorkspaceConfig:
    """One workspace and its credentials; ``source`` says where they were found (for messages)."""

    host: str
    source: str
    token: str | None = field(default=None, repr=False)
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    auth_type: str | None = None

    @property
    def auth_kind(self) -> str:
        if self.token and self.auth_type in (None, "", "pat"):
            return "pat"
        if self.client_id and self.client_secret and self.auth_type in (None, "", "oauth-m2m"):
            return "oauth-m2m"
        return self.auth_type or "none"


def config_file_path(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("DATABRICKS_CONFIG_FILE") or Path.home() / ".databrickscfg").expanduser()


def _read_profiles(path: Path) -> dict[str, dict[str, str]]:
    """Every profile of the file; ``DEFAULT`` is a profile like the others (configparser would otherwise
    copy its keys into every section, which the Databricks tools do not do)."""
    parser = configparser.ConfigParser(default_section="\0", interpolation=None)
    try:
        with open(path, encoding="utf-8-sig") as handle:
            parser.read_file(handle)
    except FileNotFoundError:
        return {}
    except (OSError, configparser.Error) as exc:
        raise ConfigError(f"cannot read the Databricks config file {path}: {exc}; fix the file or set "
                          "DATABRICKS_CONFIG_FILE") from None
    return {name: {k.lower(): v.strip() for k, v in parser.items(name)} for name in parser.sections()}


def load_workspace_config(profile: str | None = None, environ: Mapping[str, str] | None = None
                          ) -> WorkspaceConfig:
    """The workspace to talk to, as the Databricks CLI would find it; one ConfigError names what is missing."""
    environ = os.environ if environ is None else environ
    path = config_file_path(environ)
    explicit = profile or environ.get("DATABRICKS_CONFIG_PROFILE")
    name = explicit or "DEFAULT"
    profiles = _read_profiles(path)
    if explicit and name not in profiles:
        known = ", ".join(sorted(profiles, key=str.lower)) or "none"
        raise ConfigError(f"Databricks profile {name!r} not found in {path} (profiles there: {known}): "
                          f"run `databricks auth login --profile {name}` or `databricks configure --profile "
                          f"{name}`, or pass --databricks-profile with one of the profiles")
    values = dict(profiles.get(name, {}))
    env_keys = {"host": "DATABRICKS_HOST", "token": "DATABRICKS_TOKEN", "client_id": "DATABRICKS_CLIENT_ID",
                "client_secret": "DATABRICKS_CLIENT_SECRET", "auth_type": "DATABRICKS_AUTH_TYPE"}
    from_env = [key for key, var in env_keys.items() if environ.get(var)]
    for key in from_env:
        values[key] = environ[env_keys[key]]
    source = f"profile {name} in {path}" if name in profiles else "the environment"
    if from_env and name in profiles:
        source += " and DATABRICKS_* variables"
    host = values.get("host", "").strip()
    if not host:
        raise ConfigError(f"no Databricks workspace host in {source}: set DATABRICKS_HOST, or run "
                          "`databricks configure` (or pass --databricks-profile NAME)")
    config = WorkspaceConfig(host=normalize_host(host), source=source, token=values.get("token") or None,
                             client_id=values.get("client_id") or None,
                             client_secret=values.get("client_secret") or None,
                             auth_type=(values.get("auth_type") or None))
    if config.auth_kind == "none":
        raise ConfigError(f"no Databricks credentials in {source}: set token (a personal access token) or "
                          "client_id and client_secret (a service principal's OAuth secret), e.g. "
                          "DATABRICKS_TOKEN or DATABRICKS_CLIENT_ID/DATABRICKS_CLIENT_SECRET")
    return config


def normalize_host(host: str) -> str:
    """``https://`` added where missing, no trailing slash; plain http only on loopback (tests, proxies)."""
    host = host.strip().rstrip("/")
    if "://" not in host:
        host = f"https://{host}"
    parts = urlsplit(host)
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ConfigError(f"Databricks host {host} uses plain http: tokens would travel unencrypted; use https://")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"Databricks host {host!r} is not a URL: set host to https://<workspace>")
    return f"{parts.scheme}://{parts.netloc}"


class _WorkspaceAuth(httpx.Auth):
    """The Authorization header for every call: a PAT as it is, an OAuth M2M token fetched and cached."""

    def __init__(self, config: WorkspaceConfig, client: httpx.Client):
        self.config = config
        self._client = client
        self._token: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()
        self._sdk_header: Any = None

    def auth_flow(self, request: httpx.Request):
        request.headers["Authorization"] = self._header()
        yield request

    def _header(self) -> str:
        kind = self.config.auth_kind
        if kind == "pat":
            return f"Bearer {self.config.token}"
        if kind == "oauth-m2m":
            with self._lock:
                if self._token is None or time.monotonic() >= self._expires:
                    self._fetch_m2m_token()
                return f"Bearer {self._token}"
        return self._sdk_authorization()

    def _fetch_m2m_token(self) -> None:
        url = f"{self.config.host}/oidc/v1/token"
        assert self.config.client_id and self.config.client_secret
        try:
            response = self._client.post(url, data={"grant_type": "client_credentials", "scope": "all-apis"},
                                         auth=(self.config.client_id, self.config.client_secret))
        except httpx.HTTPError as exc:
            raise WorkspaceUnavailable(f"Databricks OAuth token endpoint {url} unreachable: "
                                       f"{type(exc).__name__}; check the host and the network") from None
        if response.status_code in (400, 401, 403):
            raise AuthError(f"Databricks refused the OAuth client {self.config.client_id} ({response.status_code} "
                            f"{_oauth_error(response)}) from {self.config.source}: check client_id and "
                            "client_secret of the service principal (create a new OAuth secret if it expired)")
        if response.status_code >= 300:
            raise WorkspaceUnavailable(f"Databricks OAuth token endpoint answered {response.status_code}; "
                                       "retrying later")
        answer = response.json()
        self._token = str(answer["access_token"])
        lifetime = float(answer.get("expires_in", 3600))
        self._expires = time.monotonic() + max(lifetime - TOKEN_MARGIN, lifetime / 2)
        log.debug("databricks_token_fetched", expires_in=lifetime)

    def _sdk_authorization(self) -> str:
        """Other auth types through databricks-sdk, imported only here (it is large and slow to import)."""
        if self._sdk_header is None:
            try:
                from databricks.sdk.core import Config  # type: ignore[import-not-found]
            except ImportError:
                raise ConfigError(f"Databricks auth_type {self.config.auth_type!r} ({self.config.source}) "
                                  "needs the Databricks SDK: pip install 'pistream[databricks]', or use a "
                                  "personal access token or OAuth client credentials") from None
            sdk = Config(host=self.config.host, auth_type=self.config.auth_type)
            self._sdk_header = sdk.authenticate
        headers = self._sdk_header()
        return str(headers["Authorization"])


def _oauth_error(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body.get("error_description") or body.get("error") or "")
    except ValueError:
        return ""


class Workspace:
    """Blocking JSON calls to one workspace; errors become pistream errors that name the fix."""

    def __init__(self, config: WorkspaceConfig, *, transport: httpx.BaseTransport | None = None,
                 timeout: httpx.Timeout = REQUEST_TIMEOUT):
        self.config = config
        self.timeout = timeout
        self._client = httpx.Client(base_url=config.host, timeout=timeout, transport=transport,
                                    trust_env=not config.host.startswith("http://"),
                                    headers={"User-Agent": USER_AGENT})
        self._client.auth = _WorkspaceAuth(config, self._client)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, json: Any = None, params: Mapping[str, str] | None = None,
             *, resend: bool = True) -> dict[str, Any]:
        """One call, retried on 429/5xx/no connection with jittered backoff; the JSON answer, or an error.

        ``resend=False`` for a call that must not be carried out twice: it is sent again only when it surely
        did not arrive; ``WorkspaceUncertain`` when it may have been carried out without an answer."""
        response = self.request(method, path, json=json, params=params, resend=resend)
        return response.json() if response.content else {}

    def request(self, method: str, path: str, json: Any = None, params: Mapping[str, str] | None = None,
                *, content: bytes | None = None, resend: bool = True) -> httpx.Response:
        """``call`` for any answer (the Files API's bytes): the successful response, or the same errors."""
        delay = 0.5
        for attempt in range(1, ATTEMPTS + 1):
            try:
                response = self._client.request(method, path, json=json, params=params, content=content)
            except httpx.HTTPError as exc:
                failure = f"{type(exc).__name__}"
                if isinstance(exc, httpx.ReadTimeout):
                    failure += f" after {self.timeout.read} s"
                status = 0
                if not resend and not isinstance(exc, NOT_SENT):
                    raise self._uncertain(method, path, failure) from None
            else:
                status = response.status_code
                if status < 300:
                    return response
                if status not in RETRIED_STATUS:
                    raise self._error(response, method, path)
                failure = f"HTTP {status}"
                if not resend and status not in NOT_RECEIVED_STATUS:
                    raise self._uncertain(method, path, failure)
                retry_after = response.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    delay = max(delay, min(float(retry_after), 30.0))
            if attempt == ATTEMPTS:
                raise WorkspaceUnavailable(
                    f"Databricks workspace {self.config.host} did not answer {method} {path} "
                    f"({failure}, {ATTEMPTS} tries): check the workspace status and the network")
            log.warning("databricks_call_retried", path=path, failure=failure, status=status, attempt=attempt)
            time.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def _uncertain(self, method: str, path: str, failure: str) -> WorkspaceUncertain:
        return WorkspaceUncertain(
            f"Databricks workspace {self.config.host} gave no answer to {method} {path} ({failure}); not sent "
            "again, as it may have been carried out: pistream looks before trying again")

    def _error(self, response: httpx.Response, method: str, path: str) -> PistreamError:
        try:
            body = response.json()
        except ValueError:
            body = {}
        code = str(body.get("error_code") or body.get("error") or "")
        message = " ".join(str(body.get("message") or body.get("error_description") or response.reason_phrase
                               ).split()).rstrip(".")
        status = response.status_code
        if code and code != str(status):  # some errors carry the status as their code ("403 403: ...")
            where = f"Databricks {method} {path} answered {status} {code}"
        else:
            where = f"Databricks {method} {path} answered {status}"
        if message:
            where += f": {message}"
        if status == 401 or (status == 403 and "invalid access token" in message.lower()):
            return AuthError(f"{where}; the credentials of {self.config.source} were refused: create a new "
                             "personal access token (or OAuth secret) and update the profile")
        return WorkspaceError(where, status, code)
