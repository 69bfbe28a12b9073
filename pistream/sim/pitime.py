r"""Time on the PI Web API wire: rendering event timestamps and parsing time query parameters.

Timestamps are integer microseconds since the Unix epoch (UTC) everywhere in the simulator, so that the
model, the server and the tests compare exact integers, never floats. ISO 8601 itself is the main
package's (``pistream.timeutil``): ``format_timestamp(us)`` renders exactly what ``format_iso`` does (with a
per-second cache, as it runs for every value sent), and the ISO part of a time parameter is converted by
``parse_iso_us``. PI time syntax (``*-1h``, ``t``, ``y``) is the simulator's own.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from pistream.timeutil import parse_iso_us

US_PER_SECOND = 1_000_000
_EPOCH = datetime(1970, 1, 1)

# "YYYY-MM-DDTHH:MM:SS" per whole second, cached: formatting is on the hot path of every channel message.
_prefix_cache: dict[int, str] = {}
_PREFIX_CACHE_MAX = 1 << 16


def _second_prefix(seconds: int) -> str:
    prefix = _prefix_cache.get(seconds)
    if prefix is None:
        if len(_prefix_cache) >= _PREFIX_CACHE_MAX:
            _prefix_cache.clear()
        prefix = (_EPOCH + timedelta(seconds=seconds)).isoformat()
        _prefix_cache[seconds] = prefix
    return prefix


def format_timestamp(us: int, digits: int | None = None) -> str:
    """ISO 8601 UTC with ``Z``, as PI Web API writes it.

    ``digits=None`` trims trailing zeros (0 to 6 fractional digits: ``...:05Z``, ``...:05.5Z``,
    ``...:05.123456Z``), the same text as ``pistream.timeutil.format_iso``; an int 0..7 forces that many
    digits (7 = .NET ticks, always ending in 0 here).
    """
    seconds, frac = divmod(us, US_PER_SECOND)
    prefix = _prefix_cache.get(seconds) or _second_prefix(seconds)
    if digits is None:
        return "%s.%sZ" % (prefix, ("%06d" % frac).rstrip("0")) if frac else prefix + "Z"  # noqa: UP031 - fastest
    if not 0 <= digits <= 7:
        raise ValueError(f"digits must be 0..7, got {digits}")
    if digits == 0:
        return prefix + "Z"
    return f"{prefix}.{f'{frac:06d}0'[:digits]}Z"


_ISO = (
    r"(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[Tt ](?P<hh>\d{2}):(?P<mi>\d{2})(?::(?P<ss>\d{2})(?:[.,](?P<frac>\d{1,9}))?)?)?"
    r"(?P<zone>[Zz]|[+-]\d{2}:?\d{2})?"
)
_BASE = re.compile(
    rf"\s*(?:(?P<star>\*)|(?P<today>today|t)|(?P<yesterday>yesterday|y)|{_ISO})?", re.IGNORECASE
)
_OFFSET = re.compile(r"\s*(?P<sign>[+-])\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[a-z]+)", re.IGNORECASE)
_UNIT_US = {
    **dict.fromkeys(("ms", "millisecond", "milliseconds"), 1_000),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), US_PER_SECOND),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60 * US_PER_SECOND),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600 * US_PER_SECOND),
    **dict.fromkeys(("d", "day", "days"), 86400 * US_PER_SECOND),
    **dict.fromkeys(("w", "week", "weeks"), 7 * 86400 * US_PER_SECOND),
}


def _iso_to_us(m: re.Match[str]) -> int:
    """The matched ISO time (date only, minutes only, ``,`` fractions: all PI accepts) via ``parse_iso_us``."""
    text = f"{m['date']}T{m['hh'] or '00'}:{m['mi'] or '00'}:{m['ss'] or '00'}"
    if m["frac"]:
        text += "." + m["frac"]
    return parse_iso_us(text + (m["zone"] or "Z"))


def _midnight_us(now_us: int) -> int:
    return now_us - now_us % (86400 * US_PER_SECOND)


def parse_time(text: str, now_us: int) -> int:
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
        us = _midnight_us(now_us) - 86400 * US_PER_SECOND
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
