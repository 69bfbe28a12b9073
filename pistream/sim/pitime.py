r"""Time on the PI Web API wire: rendering event timestamps and parsing time query parameters.

Timestamps are integer microseconds since the Unix epoch (UTC) everywhere in the simulator, so that the
model, the server and the tests compare exact integers, never floats. ISO 8601 itself is the main
package's (``pistream.timeutil``): ``format_timestamp(us)`` renders exactly what ``format_iso`` does (with a
per-second cache, as it runs for every value sent), and the ISO part of a time parameter is converted by
``parse_iso_us``; a time parameter in PI time syntax (``*-1h``, ``t``, ``y``) is parsed by
``pistream.timeutil.parse_pi_time``, the same parser ``pistream backfill`` reads ``--start``/``--end`` with.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pistream.timeutil import parse_pi_time as parse_time  # noqa: F401 - one parser for client and server

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
