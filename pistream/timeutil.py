"""ISO 8601 UTC timestamps as PI Web API writes them, to and from integer microseconds since the epoch.

PI sends 0 to 7 fractional digits (.NET ticks are 100 ns) and ``Z`` or ``+00:00``; Delta stores
microseconds, and PI Data Archive resolution is about 15 us, so the 7th digit is truncated.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pyarrow as pa

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ISO = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?\s*(Z|[+-]\d{2}:?\d{2})?$",
    re.IGNORECASE,
)
TIMESTAMP_US = pa.timestamp("us", tz="UTC")


def parse_iso_us(text: str) -> int:
    """Microseconds since the epoch for one ISO 8601 timestamp; a missing zone means UTC. ValueError if bad."""
    m = _ISO.match(text.strip())
    if not m:
        raise ValueError(f"not an ISO 8601 timestamp: {text!r}")
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    dt = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=UTC)
    micros = int((fraction or "").ljust(6, "0")[:6])
    offset = timedelta(0)
    if zone and zone.upper() != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    delta = dt - offset - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + micros


def format_iso(us: int) -> str:
    """ISO 8601 UTC with ``Z`` and as many fractional digits as needed (0 to 6)."""
    dt = EPOCH + timedelta(microseconds=us)
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if dt.microsecond:
        base += "." + f"{dt.microsecond:06d}".rstrip("0")
    return base + "Z"


_EPOCH_NAIVE = datetime(1970, 1, 1)


def to_us(text: str) -> int:
    """Fast path for ``parse_iso_us``: ``datetime.fromisoformat`` (C) handles what PI sends (7 digits
    are truncated to 6). Raises ValueError for text that is not a timestamp."""
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return parse_iso_us(text)
    if dt.tzinfo is None:
        delta = dt - _EPOCH_NAIVE
    else:
        delta = dt - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
