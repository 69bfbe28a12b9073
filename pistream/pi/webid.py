"""WebID 2.0 encoding, computed client-side so that no server call is needed per tag.

Layout: type char + version ``1`` + 2-char marker + optional owner char + payload, where payloads are
URL-safe base64 without ``=`` padding (see shared/PI-WEB-API.md).
"""

from __future__ import annotations

import base64
import struct
import uuid

POINT_MARKER = "DP"
DATASERVER_MARKER = "DS"
ATTRIBUTE_MARKER = "Ab"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def upper_invariant(text: str) -> str:
    """Upper-case like .NET ``ToUpperInvariant``: simple one-to-one mapping, char by char.

    Python's ``str.upper`` applies special casing (``ß`` -> ``SS``); .NET keeps such letters as they are.
    """
    out = []
    for ch in text:
        up = ch.upper()
        out.append(up if len(up) == 1 else ch)
    return "".join(out)


def _strip_leading_backslashes(path: str) -> str:
    return path[2:] if path.startswith("\\\\") else path


def point_webid(path: str) -> str:
    r"""Path-only WebID of a PI point, e.g. ``\\MyPIServer\sinusoid`` -> ``P1DPTVlQ...``."""
    return "P1" + POINT_MARKER + _b64(upper_invariant(_strip_leading_backslashes(path)).encode("utf-8"))


def dataserver_webid(path: str) -> str:
    r"""Path-only WebID of a PI Data Archive server, e.g. ``\\MyPIServer``."""
    return "P1" + DATASERVER_MARKER + _b64(upper_invariant(_strip_leading_backslashes(path)).encode("utf-8"))


def attribute_webid(path: str) -> str:
    r"""Path-only WebID of an AF attribute of an element, e.g. ``\\AF\DB\Element|Attribute``."""
    payload = upper_invariant(_strip_leading_backslashes(path)).encode("utf-8")
    return "P1" + ATTRIBUTE_MARKER + "E" + _b64(payload)


def path_webid(path: str) -> str:
    """Path-only WebID for a point path or, when it holds ``|``, an AF attribute path."""
    return attribute_webid(path) if "|" in path else point_webid(path)


def id_only_point_webid(server_id: uuid.UUID, point_id: int) -> str:
    """Id-only point WebID: server GUID in Microsoft byte order, then the point id as little-endian int32."""
    return "I1" + POINT_MARKER + _b64(server_id.bytes_le) + _b64(struct.pack("<i", point_id))


def path_from_webid(webid: str) -> str:
    r"""Inverse of the path-only encodings: the upper-cased path with its leading ``\\`` restored.

    Raises ValueError for anything that is not a path-only point, data server or attribute WebID.
    """
    if not webid.startswith("P1") or len(webid) < 5:
        raise ValueError(f"not a path-only WebID: {webid!r}")
    marker = webid[2:4]
    payload = webid[4:]
    if marker == ATTRIBUTE_MARKER:
        if not payload or payload[0] not in "EF":
            raise ValueError(f"attribute WebID without owner marker: {webid!r}")
        payload = payload[1:]
    elif marker not in (POINT_MARKER, DATASERVER_MARKER):
        raise ValueError(f"unsupported WebID marker {marker!r} in {webid!r}")
    try:
        return "\\\\" + _b64decode(payload).decode("utf-8")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed WebID payload in {webid!r}") from exc
