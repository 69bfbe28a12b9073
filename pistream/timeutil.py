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


# PI time syntax, as PI Web API reads startTime/endTime: also --start/--end of ``pistream backfill``.
_US_PER_SECOND = 1_000_000
_PI_ISO = (
    r"(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[Tt ](?P<hh>\d{2}):(?P<mi>\d{2})(?::(?P<ss>\d{2})(?:[.,](?P<frac>\d{1,9}))?)?)?"
    r"(?P<zone>[Zz]|[+-]\d{2}:?\d{2})?"
)
_BASE = re.compile(
    rf"\s*(?:(?P<star>\*)|(?P<today>today|t)|(?P<yesterday>yesterday|y)|{_PI_ISO})?", re.IGNORECASE
)
_OFFSET = re.compile(r"\s*(?P<sign>[+-])\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[a-z]+)", re.IGNORECASE)
_UNIT_US = {
    **dict.fromkeys(("ms", "millisecond", "milliseconds"), 1_000),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), _US_PER_SECOND),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60 * _US_PER_SECOND),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600 * _US_PER_SECOND),
    **dict.fromkeys(("d", "day", "days"), 86400 * _US_PER_SECOND),
    **dict.fromkeys(("w", "week", "weeks"), 7 * 86400 * _US_PER_SECOND),
}


def _iso_to_us(m: re.Match[str]) -> int:
    """The matched ISO time (date only, minutes only, ``,`` fractions: all PI accepts) via ``parse_iso_us``."""
    text = f"{m['date']}T{m['hh'] or '00'}:{m['mi'] or '00'}:{m['ss'] or '00'}"
    if m["frac"]:
        text += "." + m["frac"]
    return parse_iso_us(text + (m["zone"] or "Z"))


def _midnight_us(now_us: int) -> int:
    return now_us - now_us % (86400 * _US_PER_SECOND)


def parse_pi_time(text: str, now_us: int) -> int:
    """Parse a ``startTime``/``endTime`` query value into microseconds since the epoch (UTC).

    Accepts ISO 8601 (``Z``, ``+00:00`` or any offset, 0-9 fraction digits truncated to us; no zone = UTC,
    where a real server would use its local time) and PI time syntax: ``*``, ``t``/``today``,
    ``y``/``yesterday`` (UTC midnights) or an ISO time, followed by offsets like ``-10s``, ``+1m``, ``-2h``,
    ``-1d``, ``-1w``; a bare offset is relative to now. Raises ValueError for anything else.
    """
    base = _BASE.match(text)
    assert base is not None  # every part of _BASE is optional
    if base["star"]:
        us = now_us
    elif base["today"]:
        us = _midnight_us(now_us)
    elif base["yesterday"]:
        us = _midnight_us(now_us) - 86400 * _US_PER_SECOND
    elif base["date"]:
        try:
            us = _iso_to_us(base)
        except ValueError as exc:
            raise ValueError(f"cannot parse time string {text!r}: {exc}") from None
    else:
        us = now_us
    pos = base.end()
    matched_any = base.end() > len(text) - len(text.lstrip())
    while pos < len(text):
        if not text[pos:].strip():
            break
        m = _OFFSET.match(text, pos)
        unit = m["unit"].lower() if m else ""
        if m is None or unit not in _UNIT_US:
            raise ValueError(f"cannot parse time string {text!r}")
        step = round(float(m["num"]) * _UNIT_US[unit])
        us += step if m["sign"] == "+" else -step
        pos = m.end()
        matched_any = True
    if not matched_any:
        raise ValueError(f"cannot parse time string {text!r}")
    return us
