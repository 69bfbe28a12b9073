r"""Reading ``pistream.toml`` and the ``PISTREAM_*`` environment, with the mistakes people make on day one
named as what they are: a file Windows PowerShell 5 wrote as UTF-16, a Windows path in double quotes (TOML
reads ``\P`` as an escape, and ``\t`` silently as a tab), a unit after a number (``flush_seconds = 10s``), a
misspelt setting (``did you mean flush_seconds?``, with the file and line), a misspelt variable.

Knows nothing of the settings themselves: ``config`` passes the names it knows.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

ENV_PREFIX = "PISTREAM_"
# Variables pistream's tests, benchmarks and build read besides the settings: not misspellings.
OTHER_VARIABLES = frozenset({"PISTREAM_REQUIRE_CODEC", "PISTREAM_TEST_HARD_EXIT", "PISTREAM_DIFF_SECONDS",
                             "PISTREAM_DIFF_SEED"})
# Settings that name files or folders: a control character in one is a backslash TOML took as an escape.
PATH_SETTINGS = frozenset({"tags", "table", "state_dir", "log_file", "ca_bundle", "location"})
UNITS = {"_seconds": "seconds", "_interval": "seconds", "duration": "seconds", "_mb": "megabytes (MB)",
         "_bytes": "bytes", "_rows": "rows", "_rate": "events per second"}
SINGLE_QUOTE_HINT = ("write Windows paths in single quotes, which TOML keeps as they are, e.g. "
                     r"tags = 'C:\ProgramData\pistream\tags.txt' (or double each backslash)")


class ConfigFile(dict[str, Any]):
    """The settings of one config file (dashes in names read as underscores), and the line of each."""

    def __init__(self, path: str, values: Mapping[str, Any], lines: Mapping[str, int]):
        super().__init__(values)
        self.path = path
        self.lines = dict(lines)

    def where(self, name: str) -> str:
        """``config file 'x.toml' line 3`` for a setting of this file (or without the line if unknown)."""
        line = self.lines.get(name)
        return f"config file {self.path!r}" + (f" line {line}" if line else "")


def unit_of(name: str) -> str | None:
    """What a numeric setting counts, from its name (``flush_seconds``: seconds)."""
    return next((unit for suffix, unit in UNITS.items() if name.endswith(suffix)), None)


def suggestion(name: str, known: Iterable[str]) -> str:
    """`` (did you mean `flush_seconds`?)`` when a known name is close, else ``""``."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _decode(path: Path, data: bytes) -> str:
    """The file's text: UTF-8 with or without a BOM; UTF-16 (PowerShell 5's ``>`` and ``Out-File``) and
    other encodings are named, with the fix."""
    shown = str(path)
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(data) >= 2 and b"\x00" in data[:64]):
        raise ConfigError(
            f"config file {shown!r} is UTF-16 (what Windows PowerShell 5 writes with > or Out-File): save it as "
            f"UTF-8, e.g. in PowerShell: Get-Content '{shown}' | Set-Content -Encoding utf8 '{shown}.new', then "
            "use the new file (or save it as UTF-8 in Notepad)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"config file {shown!r} is not UTF-8 (line {line}, byte {exc.start}): save it as "
                          "UTF-8") from None


def _toml_error(path: Path, text: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    """TOML's own message, with the fix for the two mistakes it does not explain."""
    message = str(exc)
    where = re.search(r"\(at line (\d+), column \d+\)", message)
    line_no = int(where.group(1)) if where else 0
    lines = text.splitlines()
    line = lines[line_no - 1].strip() if 0 < line_no <= len(lines) else ""
    hint = ""
    if message.startswith(("Unescaped '\\'", "Invalid hex value", "Unknown escape")) or (
            "\\" in line and '"' in line and "escape" in message.lower()):
        hint = f"; a backslash in a double-quoted string starts an escape: {SINGLE_QUOTE_HINT}"
    else:
        number = re.match(r"^([A-Za-z_-]+)\s*=\s*-?[\d.]+\s*([A-Za-z]+)\s*(#.*)?$", line)
        if number:
            name = number.group(1).replace("-", "_")
            unit = unit_of(name)
            hint = (f"; numbers take no unit: write {name} = <number>" + (f", in {unit}" if unit else "")
                    + " (no quotes)")
    return ConfigError(f"config file {str(path)!r} is not valid TOML: {message}{hint}")


def _key_lines(text: str) -> dict[str, int]:
    """The line each top-level (or ``[pistream]``) key is set on, by name with underscores."""
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = re.match(r"""^\s*["']?([A-Za-z0-9_-]+)["']?\s*=""", line)
        if match:
            lines.setdefault(match.group(1).replace("-", "_"), number)
    return lines


def read_config_file(path: str | Path, known: Iterable[str]) -> ConfigFile:
    """The settings of a TOML file (top level, or under ``[pistream]``); every problem one ConfigError that
    names the file, the line where it can, and the fix."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found: check --config") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(path)!r} is a folder: --config names a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from exc
    text = _decode(path, data)
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(path, text, exc) from None
    table = parsed.get("pistream", parsed)  # either top-level keys or a [pistream] table
    if not isinstance(table, dict):
        raise ConfigError(f"config file {str(path)!r}: pistream must be a table ([pistream]), not a value")
    config = ConfigFile(str(path), {key.replace("-", "_"): value for key, value in table.items()}, _key_lines(text))
    known = set(known)
    for name in config:
        if name not in known:
            raise ConfigError(f"{config.where(name)}: unknown setting {name}{suggestion(name, known)}; the settings "
                              "are the long options with underscores (pistream --help)")
    for name in PATH_SETTINGS & set(config):
        value = config[name]
        if isinstance(value, str) and re.search(r"[\t\n\r\f\b]", value):
            raise ConfigError(f"{config.where(name)}: {name} holds a tab or line break where the path probably "
                              f"had a backslash (TOML reads \\t, \\n, \\r, \\f, \\b in double quotes as escapes): "
                              f"{SINGLE_QUOTE_HINT}")
    return config


def unknown_variables(environ: Mapping[str, str], known: Iterable[str]) -> list[str]:
    """``PISTREAM_*`` variables no setting reads, each with a suggestion if one is close (click ignores
    them silently)."""
    known = set(known) | OTHER_VARIABLES
    endings = [name.removeprefix(ENV_PREFIX) for name in known]  # compared without the common prefix
    unknown = []
    for name in sorted(environ):
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known:
            hint = suggestion(name.upper().removeprefix(ENV_PREFIX), endings).replace("`", f"`{ENV_PREFIX}", 1)
            unknown.append(f"{name}{hint}")
    return unknown
