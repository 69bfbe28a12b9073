r"""The tags file: one PI point path (``\\SERVER\TAG``), AF attribute path, bare tag name or name mask
(``\\SERVER\FIC*``, ``TI-1??-PV``: PI's ``*`` and ``?``) per line.

Windows editors leave a UTF-8 BOM and CRLF line ends; people leave comments, blank lines, stray spaces and
duplicates. All of that is accepted; duplicates are reported once. A bare name needs a default server. A mask
stands for the points of its server whose names match it, found when the tags are resolved (``discovery``).
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TagsFileError

EXAMPLE_LINE = r"\\PISRV01\SINUSOID"


def is_mask(path: str) -> bool:
    """Whether a full path is a name mask (PI's ``*`` and ``?`` in the point name)."""
    return "*" in path or "?" in path


@dataclass
class TagList:
    r"""The listed tags' full paths (``\\SERVER\TAG`` or ``\\AF\DB\Element|Attribute``) in file order,
    the name masks apart, and the lines that repeat one as (line number, path). Paths only, no object per
    line: at 100,000 tags those were ~300,000 small objects alive through tag resolution, a high-water mark
    pymalloc then keeps."""

    paths: list[str]
    duplicates: list[tuple[int, str]] = field(default_factory=list)
    masks: list[str] = field(default_factory=list)  # name masks (``\\SERVER\FIC*``) in file order


def _full_path(text: str, default_server: str | None, line_no: int, source: str) -> str:
    if text.startswith("\\\\"):
        server, sep, rest = text[2:].partition("\\")
        if not server or not sep or not rest.strip("\\"):
            raise TagsFileError(
                f"{source}:{line_no}: {text!r} is not a PI point path: write it as \\\\SERVER\\TAG, "
                f"e.g. {EXAMPLE_LINE}"
            )
        _check_mask(text, server, line_no, source)
        return text
    if text.startswith("\\"):
        raise TagsFileError(
            f"{source}:{line_no}: {text!r} starts with a single backslash: a PI path starts with two, "
            f"e.g. {EXAMPLE_LINE}"
        )
    if not default_server:
        raise TagsFileError(
            f"{source}:{line_no}: bare tag name {text!r} needs a server: pass --server NAME "
            f"(or write the full path, e.g. {EXAMPLE_LINE})"
        )
    path = f"\\\\{default_server.strip(chr(92))}\\{text}"
    _check_mask(path, default_server, line_no, source)
    return path


def _check_mask(path: str, server: str, line_no: int, source: str) -> None:
    """Masks name PI points of one server: no wildcard in the server, none in AF paths."""
    if not is_mask(path):
        return
    if is_mask(server):
        raise TagsFileError(
            f"{source}:{line_no}: {path!r} has a wildcard in the server name: a mask matches point names of one "
            f"server, e.g. \\\\PISRV01\\FIC*"
        )
    if "|" in path:
        raise TagsFileError(
            f"{source}:{line_no}: {path!r} is an AF attribute mask: pistream resolves masks of PI point names "
            f"only; list the attributes one per line (or mask the PI points behind them)"
        )


def parse_tags(text: str, default_server: str | None = None, source: str = "<tags>") -> TagList:
    """Parse the text of a tags file; paths compare case-insensitively, as PI does."""
    text = text.removeprefix("\ufeff")
    paths: list[str] = []
    masks: list[str] = []
    duplicates: list[tuple[int, str]] = []
    seen: set[str] = set()
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        path = _full_path(line, default_server, line_no, source)
        key = path.casefold()
        if key in seen:
            duplicates.append((line_no, path))
            continue
        seen.add(key)
        (masks if is_mask(path) else paths).append(path)
    if not paths and not masks:
        raise TagsFileError(
            f"{source} lists no tags (only blank lines or comments): add one PI point path per line, "
            f"e.g. {EXAMPLE_LINE}"
        )
    return TagList(paths, duplicates, masks)


def read_tags_file(path: str | Path, default_server: str | None = None) -> TagList:
    """Read and parse a tags file, turning every file problem into one TagsFileError."""
    return decode_tags(read_tags_bytes(path), path, default_server)


def read_tags_bytes(path: str | Path) -> bytes:
    """The tags file's bytes; every file problem as one TagsFileError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TagsFileError(
            f"tags file {str(path)!r} not found: pass --tags PATH to a file with one PI point path per line"
        ) from None
    except IsADirectoryError:
        raise TagsFileError(f"tags file {str(path)!r} is a folder: pass --tags PATH to a text file") from None
    except OSError as exc:
        raise TagsFileError(f"cannot read tags file {str(path)!r}: {exc.strerror}") from exc
    return data


def decode_tags(data: bytes, path: str | Path, default_server: str | None = None) -> TagList:
    """Parse a tags file's bytes (read with ``read_tags_bytes``)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TagsFileError(
            f"tags file {str(path)!r} is not UTF-8 (byte {exc.start}): save it as UTF-8"
        ) from exc
    return parse_tags(text, default_server, source=str(path))


def fleet_shard(path: str, count: int) -> int:
    """The shard (1 to ``count``) a tag belongs to under ``--shard K/N``: from SHA-256 of its full path
    (NFC, case-folded, as PI compares), so every process on every platform and Python version agrees."""
    key = unicodedata.normalize("NFC", path).casefold().encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % count + 1


def shard_paths(paths: list[str], shard: int, count: int) -> list[str]:
    """The paths of shard ``shard`` of ``count``, in file order."""
    return [p for p in paths if fleet_shard(p, count) == shard]
