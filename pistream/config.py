"""Settings: defaults, overlaid by a TOML config file, overlaid by command-line options and PISTREAM_*
environment variables (click reads those). Validated once, with bounds, into a frozen ``Settings``.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from .configfile import ConfigFile, read_config_file, suggestion, unit_of
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
    stop_timeout: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 30.0
    app_id: str | None = None
    shard: str | None = None  # "K/N": this process streams shard K (1-based) of N of the tags file
    heartbeat_rate: Annotated[int, msgspec.Meta(ge=0, le=3600)] = 5
    silence_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    stall_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    reread_seconds: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 2.0
    state_dir: str = DEFAULT_STATE_DIR
    max_url_length: Annotated[int, msgspec.Meta(ge=512, le=65_536)] = 6000
    max_message_mb: Annotated[float, msgspec.Meta(gt=0, le=4096)] | None = None  # None: by the channel's tags
    skip_unknown: bool = False
    rediscover_interval: Annotated[float, msgspec.Meta(ge=0, le=30 * 86_400)] = 3600.0  # 0: only on change/SIGHUP
    storage_options: dict[str, str] = {}
    databricks_profile: str | None = None
    warehouse_id: str | None = None
    warehouse_wait: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 600.0
    location: str | None = None
    managed_write: Literal["copy-into", "zerobus"] = "copy-into"
    staging_volume: str | None = None
    zerobus_endpoint: str | None = None
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
    # the main command: read this far (30d, 12h, 90m, seconds) before each tag's first live value, behind it
    backfill: str | None = None


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
    """The config file's settings as a dict (dashes in keys accepted as underscores); a ``ConfigFile``
    that knows each setting's line, for messages."""
    return read_config_file(path, FIELDS)


def settings_from(config_path: str | None, options: dict[str, Any], environ: Mapping[str, str] | None = None
                  ) -> Settings:
    """The settings of one invocation: the config file, overlaid by the command line and PISTREAM_*
    variables (``options``, as click parsed them), with the secrets from the environment."""
    environ = os.environ if environ is None else environ
    file_values = load_config_file(config_path) if config_path else {}
    options = dict(options)
    for name in SECRET_SETTINGS:  # secrets: environment or config file only
        secret = environ.get(f"PISTREAM_{name.upper()}")
        if secret is not None:
            options[name] = secret
    return build_settings(file_values, options, source=config_path or "config")


def build_settings(file_values: dict[str, Any], cli_values: dict[str, Any], source: str = "config") -> Settings:
    """Merge (command line wins over the file) and validate; one ConfigError names the bad setting."""
    unknown = sorted(set(file_values) - FIELDS)
    if unknown:
        raise ConfigError(f"{source}: unknown setting {unknown[0]}{suggestion(unknown[0], FIELDS)}; the settings "
                          "are the long options with underscores (pistream --help)")
    given = {k: v for k, v in cli_values.items() if v is not None}
    merged = {**file_values, **given}
    try:
        settings = msgspec.convert(merged, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {_describe(exc, merged, file_values, set(given))}") from None
    if not settings.url and not settings.simulate:
        raise ConfigError("no PI Web API given: pass --url https://HOST/piwebapi (or --simulate to try "
                          "pistream against its built-in simulator)")
    if not settings.tags:
        raise ConfigError("no tags file given: pass --tags PATH (one PI point path per line)")
    if settings.app_id is not None and (not settings.app_id.strip() or settings.app_id.startswith("pistream:")):
        # "pistream:..." are pistream's own records in the table (the maintenance lease, writer claims)
        raise ConfigError(f"--app-id {settings.app_id!r}: an app id must not be empty or start with 'pistream:' "
                          "(pistream's own records in the table use those): choose another")
    shard = shard_of(settings)
    if shard is not None and "state_dir" not in merged:
        settings = msgspec.structs.replace(settings, state_dir=f"{DEFAULT_STATE_DIR}/shard-{shard[0]}-of-{shard[1]}")
    if settings.maintenance_interval and settings.maintenance_interval < 10:
        raise ConfigError("--maintenance-interval must be 0 (off) or at least 10 seconds")
    if auth_kind(settings) == "oidc" and not (settings.oidc_client_id and settings.oidc_client_secret):
        raise ConfigError("OIDC needs a client: pass --oidc-client-id and set PISTREAM_OIDC_CLIENT_SECRET")
    if auth_kind(settings) == "bearer" and not settings.token:
        raise ConfigError("--auth bearer needs a token: set PISTREAM_TOKEN (or token in the config file)")
    if auth_kind(settings) == "basic" and not settings.username:
        raise ConfigError("--auth basic needs --username (the password comes from PISTREAM_PASSWORD)")
    return settings


_SHARD = re.compile(r"\s*(\d{1,4})\s*/\s*(\d{1,4})\s*")


def shard_of(settings: Settings) -> tuple[int, int] | None:
    """``--shard K/N`` as (K, N), K counted from 1; None without it. ConfigError for anything else."""
    if settings.shard is None:
        return None
    match = _SHARD.fullmatch(settings.shard)
    k, n = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if not match or not 1 <= n <= 1024 or not 1 <= k <= n:
        raise ConfigError(f"--shard {settings.shard!r}: write K/N with 1 <= K <= N <= 1024, shards counted from 1 "
                          "(e.g. --shard 1/4 ... --shard 4/4 for four processes sharing one tags file)")
    return k, n


def default_app_id(settings: Settings, host: str | None = None) -> str:
    """The app id without ``--app-id``: ``pistream-HOST-<hash>[-sK-of-N]``, the hash of the tags file's
    absolute path. Two services on one host with their own tags files get their own ids; two processes with
    the same tags file (and shard) on one host get the same one, and the writer claim refuses the second."""
    assert settings.tags is not None
    path = os.path.normcase(os.path.abspath(settings.tags))
    digest = hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    shard = shard_of(settings)
    suffix = f"-s{shard[0]}-of-{shard[1]}" if shard else ""
    return f"{legacy_app_id(host)}-{digest}{suffix}"


def legacy_app_id(host: str | None = None) -> str:
    """The default app id of earlier versions: a site whose state file uses it keeps it (``pipeline.writer_app_id``)."""
    return f"pistream-{host or socket.gethostname()}"


def _describe(exc: msgspec.ValidationError, values: Mapping[str, Any] | None = None,
              file_values: Mapping[str, Any] | None = None, from_command_line: set[str] | None = None) -> str:
    """msgspec says '... - at `$.flush_rows`'; turn that into '--flush-rows: ...', and say where a value from
    the config file is and what unit a number is in when it was given as text ('10s')."""
    text = str(exc)
    if " - at `$." not in text:
        return text
    message, _, where = text.partition(" - at `$.")
    name = where.rstrip("`").split(".")[0].split("[")[0]
    value = (values or {}).get(name)
    if isinstance(value, str) and ("`float" in message or "`int" in message):
        unit = unit_of(name)
        message += (f" ({value!r} is text: write a plain number" + (f" of {unit}" if unit else "")
                    + f", without unit or quotes, e.g. {name} = 10)")
    if isinstance(file_values, ConfigFile) and name in file_values and name not in (from_command_line or ()):
        return f"--{name.replace('_', '-')}: {message} ({file_values.where(name)})"
    return f"--{name.replace('_', '-')}: {message}"


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
