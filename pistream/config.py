"""Settings: defaults, overlaid by a TOML config file, overlaid by command-line options and PISTREAM_*
environment variables (click reads those). Validated once, with bounds, into a frozen ``Settings``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from .errors import ConfigError

DEFAULT_TABLE = "pistream-data/pi_events"
DEFAULT_STATE_DIR = "pistream-data/state"

Positive = Annotated[float, msgspec.Meta(gt=0)]


class Settings(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Every setting pistream has; each can live in the config file under the same name."""

    tags: str | None = None
    url: str | None = None
    table: str = DEFAULT_TABLE
    server: str | None = None
    simulate: bool = False
    sim_rate: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 1.0
    auth: Literal["auto", "none", "basic", "bearer", "oidc", "kerberos"] = "auto"
    username: str | None = None
    password: str | None = None
    token: str | None = None
    oidc_issuer: str | None = None
    oidc_client_id: str | None = None
    oidc_client_secret: str | None = None
    oidc_scope: str | None = None
    ca_bundle: str | None = None
    insecure: bool = False
    flush_rows: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 1_000_000
    flush_bytes: Annotated[int, msgspec.Meta(ge=1 << 20, le=1 << 34)] = 64 << 20
    flush_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    flush_idle_seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 1.0
    duration: Positive | None = None
    app_id: str | None = None
    heartbeat_rate: Annotated[int, msgspec.Meta(ge=0, le=3600)] = 5
    silence_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    stall_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    reread_seconds: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 2.0
    state_dir: str = DEFAULT_STATE_DIR
    max_url_length: Annotated[int, msgspec.Meta(ge=512, le=65_536)] = 6000
    skip_unknown: bool = False
    storage_options: dict[str, str] = {}
    databricks_profile: str | None = None
    warehouse_id: str | None = None
    location: str | None = None
    maintenance_interval: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 600.0
    stats_interval: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 60.0
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    metrics_host: str = "127.0.0.1"
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_file: str | None = None
    log_file_max_mb: Annotated[float, msgspec.Meta(ge=0.001, le=1 << 20)] = 10.0
    log_file_backups: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 5
    # pistream backfill only: the range (PI time or ISO 8601) and the recorded-values calls at a time.
    start: str | None = None
    end: str | None = None
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=32)] = 4


def auth_kind(settings: Settings) -> str:
    """``auth = auto`` picks what the given credentials imply."""
    if settings.auth != "auto":
        return settings.auth
    if settings.oidc_client_id:
        return "oidc"
    if settings.token:
        return "bearer"
    if settings.username:
        return "basic"
    return "none"


FIELDS = set(Settings.__struct_fields__)
# Settings that are secrets: read from PISTREAM_<NAME> or the config file, never from the command line.
SECRET_SETTINGS = ("password", "token", "oidc_client_secret")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The config file's settings as a dict (dashes in keys accepted as underscores)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found: check --config") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    table = data.get("pistream", data)  # either top-level keys or a [pistream] table
    return {key.replace("-", "_"): value for key, value in table.items()}


def build_settings(file_values: dict[str, Any], cli_values: dict[str, Any], source: str = "config") -> Settings:
    """Merge (command line wins over the file) and validate; one ConfigError names the bad setting."""
    unknown = sorted(set(file_values) - FIELDS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting {', '.join(unknown)}; known settings: {', '.join(sorted(FIELDS))}"
        )
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    try:
        settings = msgspec.convert(merged, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {_describe(exc)}") from None
    if not settings.url and not settings.simulate:
        raise ConfigError("no PI Web API given: pass --url https://HOST/piwebapi (or --simulate to try "
                          "pistream against its built-in simulator)")
    if not settings.tags:
        raise ConfigError("no tags file given: pass --tags PATH (one PI point path per line)")
    if settings.app_id == "pistream:maintenance":  # lake.lease.LEASE_APP_ID: the maintenance lease's own
        raise ConfigError("--app-id pistream:maintenance is the table maintenance lease's id: choose another")
    if settings.maintenance_interval and settings.maintenance_interval < 10:
        raise ConfigError("--maintenance-interval must be 0 (off) or at least 10 seconds")
    if auth_kind(settings) == "oidc" and not (settings.oidc_client_id and settings.oidc_client_secret):
        raise ConfigError("OIDC needs a client: pass --oidc-client-id and set PISTREAM_OIDC_CLIENT_SECRET")
    if auth_kind(settings) == "bearer" and not settings.token:
        raise ConfigError("--auth bearer needs a token: set PISTREAM_TOKEN (or token in the config file)")
    if auth_kind(settings) == "basic" and not settings.username:
        raise ConfigError("--auth basic needs --username (the password comes from PISTREAM_PASSWORD)")
    return settings


def _describe(exc: msgspec.ValidationError) -> str:
    """msgspec says '... - at `$.flush_rows`'; turn that into '--flush-rows: ...'."""
    text = str(exc)
    if " - at `$." in text:
        message, _, where = text.partition(" - at `$.")
        name = where.rstrip("`").split(".")[0].split("[")[0]
        return f"--{name.replace('_', '-')}: {message}"
    return text


def _settings_repr(self: Settings) -> str:
    """Settings as text, with the password masked: settings may be logged, secrets never."""
    fields = []
    for name in Settings.__struct_fields__:
        value = getattr(self, name)
        if name in SECRET_SETTINGS and value:
            value = "***"
        elif name == "storage_options" and value:
            value = {k: "***" for k in value}
        fields.append(f"{name}={value!r}")
    return f"Settings({', '.join(fields)})"


Settings.__repr__ = _settings_repr  # type: ignore[method-assign,assignment]
