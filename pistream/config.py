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
    username: str | None = None
    password: str | None = None
    flush_rows: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 100_000
    flush_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    duration: Positive | None = None
    app_id: str | None = None
    heartbeat_rate: Annotated[int, msgspec.Meta(ge=0, le=3600)] = 5
    stall_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    state_dir: str = DEFAULT_STATE_DIR
    max_url_length: Annotated[int, msgspec.Meta(ge=512, le=65_536)] = 6000
    skip_unknown: bool = False
    storage_options: dict[str, str] = {}
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


FIELDS = set(Settings.__struct_fields__)


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
        if name == "password" and value:
            value = "***"
        elif name == "storage_options" and value:
            value = {k: "***" for k in value}
        fields.append(f"{name}={value!r}")
    return f"Settings({', '.join(fields)})"


Settings.__repr__ = _settings_repr  # type: ignore[method-assign,assignment]
