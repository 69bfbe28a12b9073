r"""Deterministic PI values: the ground truth both the simulator and the tests compute from. No I/O.

Event ``k`` of tag ``i`` sits at ``k * period_us + phase(i)`` microseconds since the epoch, for every
``k >= 0``; its value and flags are pure functions of ``(kind, i, k)``. So any time range can be answered
without state, and a test can recompute exactly what a channel or a recorded query must have returned.

A tag is a PI point (``\\SERVER\NAME``) or an AF attribute (``\\AFSERVER\DB\Element|Attribute``, path-only
WebID ``P1AbE...``); both are streams with the same events.

Values by kind (``m = (k + i) % 50``; any kind, m == 7: I/O Timeout, m == 23: Shutdown, both ``Good: false``;
m == 31: ``Questionable: true``; with ``error_values``, m == 41: ``{"Errors": [...]}`` with ``Good: false``):

========== ============================== =====================================================
kind       wire ``Value``                 example
========== ============================== =====================================================
float      number                         ``50 + 40 sin(k/10 + i)``, 6 decimals
int        integer                        ``(13k + i) % 1000``
digital    state ``{"Name","Value",...}`` one of ``MODES`` (``IsSystem: false``)
string     string                         ``"batch-{i}-{k}"``
bool       true / false                   ``(k + i) % 3 != 0``
array      array of integers              ``[k % 10, (7k + i) % 100, i % 1000]``
timestamp  ISO 8601 string                the event time minus ``(k + i) % 3600`` seconds
========== ============================== =====================================================

What a correct client must write per event (``table_columns``; the ``groundtruth`` module compares with it):

================================ ========== ========================== =========== ============ ========
wire ``Value``                   value      value_text                 state_code  system_state good
================================ ========== ========================== =========== ============ ========
number (float or int)            the number null                       null        false        ``Good``
true / false                     1.0 / 0.0  ``"true"`` / ``"false"``   null        false        ``Good``
string (timestamp strings too)   null       the string, unchanged      null        false        ``Good``
array                            null       compact JSON (``[1,2,3]``) null        false        ``Good``
state ``{"Name","Value",...}``   null       ``Name``                   ``Value``   ``IsSystem`` ``Good``
``{"Errors": [a, b]}``           null       ``"a; b"``                 null        false        false
================================ ========== ========================== =========== ============ ========

Wire-only quirks of the server (flags as strings, a ``"Value"`` object instead of ``"Items"``, 7-digit
fractions, ``+00:00`` offsets, repeats and late or shuffled channel delivery) change nothing in this table:
the instant of a 7-digit timestamp is truncated (never rounded) to the microsecond of the model event.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from pistream.pi.webid import path_webid, upper_invariant
from pistream.sim.pitime import US_PER_SECOND, format_timestamp, parse_time

__all__ = [
    "ALL_KINDS",
    "ERROR_VALUE",
    "IO_TIMEOUT",
    "KINDS",
    "MODES",
    "SHUTDOWN",
    "SimEvent",
    "SimModel",
    "SimTag",
    "format_timestamp",
    "kind_for_name",
    "parse_time",
    "split_path",
    "table_columns",
]

KINDS = ("float", "int", "digital", "string")  # what ``generated`` cycles through by default
ALL_KINDS = (*KINDS, "bool", "array", "timestamp")
_UNITS = {"float": "degC", "int": "count"}
_UNIT_NAMES = {"degC": "degree Celsius", "count": "count"}
# bool and array values come from AF attributes in practice; as PI points they report these types.
_POINT_TYPES = {
    "float": "Float32",
    "int": "Int32",
    "digital": "Digital",
    "string": "String",
    "bool": "Int16",
    "array": "Blob",
    "timestamp": "Timestamp",
}
_AF_TYPES = {
    "float": "Double",
    "int": "Int32",
    "digital": "EnumerationValue",
    "string": "String",
    "bool": "Boolean",
    "array": "Int32[]",
    "timestamp": "DateTime",
}

# Shared, never mutated: values go straight to the JSON encoder.
MODES: tuple[dict[str, Any], ...] = tuple(
    {"Name": name, "Value": code, "IsSystem": False}
    for code, name in enumerate(("Off", "On", "Auto", "Manual"))
)
IO_TIMEOUT: dict[str, Any] = {"Name": "I/O Timeout", "Value": 246, "IsSystem": True}
SHUTDOWN: dict[str, Any] = {"Name": "Shutdown", "Value": 254, "IsSystem": True}
ERROR_VALUE: dict[str, Any] = {"Errors": ["[-11059] No Good Data For Calculation"]}
_JSON = msgspec.json.Encoder()

# Fractions of a second that make rendered timestamps carry 0, 1, 2, 3, 4, 5 and 6 fractional digits;
# the (i // 9) * 7919 term spreads larger tag sets over the period so they do not all tick at once.
_PHASE_PATTERN_US = (0, 500_000, 250_000, 100_000, 120_000, 123_000, 123_400, 123_450, 123_456)


@dataclass(frozen=True, slots=True)
class SimTag:
    r"""One simulated stream: a PI point, e.g. ``SimTag("SINUSOID", "SIMSRV", "float", 0)`` =
    ``\\SIMSRV\SINUSOID``, or an AF attribute when ``name`` holds ``|``, e.g.
    ``SimTag("DB\\Pump1|Flow", "AFSRV", "float", 1)`` = ``\\AFSRV\DB\Pump1|Flow``."""

    name: str
    server: str
    kind: str
    index: int
    # Archive quirks for history tests: several events at one timestamp (PI keeps all of them, in order),
    # and a point with no archived event before ``since_us`` (created later: an empty tag for older ranges).
    per_time: int = 1
    since_us: int = 0
    # Derived once: read for every event sent.
    path: str = field(init=False, repr=False, compare=False)
    webid: str = field(init=False, repr=False, compare=False)
    display_name: str = field(init=False, repr=False, compare=False)  # the wire "Name"

    def __post_init__(self) -> None:
        if self.kind not in ALL_KINDS:
            raise ValueError(f"unknown tag kind {self.kind!r}; expected one of {ALL_KINDS}")
        path = f"\\\\{self.server}\\{self.name}"
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "webid", path_webid(path))
        object.__setattr__(self, "display_name", self.name.rpartition("|")[2])

    @property
    def is_attribute(self) -> bool:
        return "|" in self.name

    @property
    def units(self) -> str:
        return _UNITS.get(self.kind, "")

    @property
    def units_name(self) -> str:
        return _UNIT_NAMES.get(self.units, "")

    @property
    def point_type(self) -> str:
        return _POINT_TYPES[self.kind]

    @property
    def af_type(self) -> str:
        return _AF_TYPES[self.kind]

    @property
    def digital_set(self) -> str:
        return "Modes" if self.kind == "digital" else ""


class SimEvent(NamedTuple):
    """One archived event, with ``value`` exactly as it goes on the wire (float, int, str or state dict)."""

    timestamp_us: int
    value: Any
    good: bool
    questionable: bool
    substituted: bool
    annotated: bool


def kind_for_name(name: str) -> str:
    """Deterministic kind from a tag (or attribute) name, so a tags file alone decides the types."""
    upper = name.upper()
    if any(word in upper for word in ("DIGITAL", "STATE", "MODE")):
        return "digital"
    if any(word in upper for word in ("STRING", "TEXT", "BATCH")):
        return "string"
    if any(word in upper for word in ("INT", "COUNT")):
        return "int"
    if any(word in upper for word in ("BOOL", "FLAG")):
        return "bool"
    if any(word in upper for word in ("ARRAY", "VECTOR")):
        return "array"
    if "TIMESTAMP" in upper:
        return "timestamp"
    return "float"


def split_path(path: str) -> tuple[str, str]:
    r"""``\\SERVER\NAME`` -> ``("SERVER", "NAME")``, ``\\AF\DB\Element|Attribute`` ->
    ``("AF", "DB\Element|Attribute")``; ValueError for anything else."""
    if not path.startswith("\\\\"):
        raise ValueError(f"not a PI point path (expected \\\\SERVER\\NAME): {path!r}")
    server, sep, name = path[2:].partition("\\")
    if "|" in path:
        element, _, attribute = name.partition("|")
        parts = element.split("\\")
        if (
            not server
            or not sep
            or len(parts) < 2
            or not all(parts)
            or not all(attribute.split("|"))
            or "\\" in attribute
        ):
            raise ValueError(
                f"not an AF attribute path (expected \\\\AFSERVER\\DATABASE\\ELEMENT|ATTRIBUTE): {path!r}"
            )
        return server, name
    if not server or not sep or not name or "\\" in name:
        raise ValueError(f"not a PI point path (expected \\\\SERVER\\NAME): {path!r}")
    return server, name


def table_columns(value: Any) -> tuple[float | None, str | None, int | None, bool]:
    """``(value, value_text, state_code, system_state)`` a correct client writes for a wire ``Value``
    (see the module docstring); ``good`` is the event's flag (false for errors)."""
    if isinstance(value, bool):
        return (1.0 if value else 0.0), ("true" if value else "false"), None, False
    if isinstance(value, int | float):
        return float(value), None, None, False
    if isinstance(value, str):
        return None, value, None, False
    if isinstance(value, dict):
        if "Errors" in value:
            return None, "; ".join(str(e) for e in value["Errors"]), None, False
        return None, value["Name"], value["Value"], bool(value["IsSystem"])
    return None, _JSON.encode(value).decode("utf-8"), None, False


def _upper(text: str) -> str:
    """``upper_invariant``, with a fast path for ASCII (100k-tag models look up many paths)."""
    return text.upper() if text.isascii() else upper_invariant(text)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class SimModel:
    """A set of tags, each producing one event per ``period_us = round(1e6 / rate)``.

    ``error_values`` adds ``{"Errors": [...]}`` values at known events (see the module docstring).

    Points can be created and deleted while the simulator runs (``add``, ``remove``; the REST API's
    ``POST dataservers/{webId}/points`` and ``DELETE points/{webId}`` call them): a deleted point is no longer
    found by path, WebID or name filter and its channels stop sending it, but ``find`` still knows it for the
    ground truth. A point created again under a deleted one's path is the same stream (same index, same
    events, its archive intact), so a client that reads the deleted time back gets the model's events.
    """

    def __init__(self, tags: Iterable[SimTag], rate: float = 1.0, *, error_values: bool = False) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 events/s, got {rate}")
        self.tags: list[SimTag] = list(tags)
        self.rate = rate
        self.error_values = error_values
        self.period_us = max(1, round(1_000_000 / rate))
        self._by_webid: dict[str, SimTag] = {}
        self._by_path: dict[str, SimTag] = {}
        for tag in self.tags:
            key = _upper(tag.path)
            if key in self._by_path:
                raise ValueError(f"duplicate tag {tag.path!r}")
            self._by_path[key] = tag
            self._by_webid[tag.webid] = tag
        servers: dict[str, str] = {}
        for tag in self.tags:
            if not tag.is_attribute:
                servers.setdefault(_upper(tag.server), tag.server)
        self.servers: list[str] = list(servers.values())  # PI Data Archives (AF servers are not listed)
        self.retired: dict[str, SimTag] = {}  # deleted points by WebID
        self.version = 0  # counts creations and deletions (caches of name filters key on it)
        self._next_index = max((t.index for t in self.tags), default=-1) + 1

    @classmethod
    def from_paths(cls, paths: Iterable[str], rate: float = 1.0, *, error_values: bool = False) -> SimModel:
        r"""Tags from ``\\SERVER\NAME`` point paths and ``\\AF\DB\Element|Attribute`` attribute paths
        (duplicates, compared case-insensitively, are skipped). The kind comes from the point name or the
        attribute name (``kind_for_name``)."""
        tags: list[SimTag] = []
        seen: set[str] = set()
        for path in paths:
            server, name = split_path(path.strip())
            key = _upper(f"{server}\\{name}")
            if key in seen:
                continue
            seen.add(key)
            tags.append(SimTag(name, server, kind_for_name(name.rpartition("|")[2]), len(tags)))
        return cls(tags, rate, error_values=error_values)

    @classmethod
    def generated(
        cls,
        n: int,
        rate: float = 1.0,
        server: str = "SIMSRV",
        *,
        kinds: tuple[str, ...] = KINDS,
        error_values: bool = False,
    ) -> SimModel:
        """``n`` tags ``SIM000000``, ``SIM000001``, ... with kinds cycling through ``kinds`` (by default
        float, int, digital, string; ``ALL_KINDS`` adds bool, array and timestamp)."""
        if not kinds:
            raise ValueError("kinds must not be empty")
        tags = (SimTag(f"SIM{i:06d}", server, kinds[i % len(kinds)], i) for i in range(n))
        return cls(tags, rate, error_values=error_values)

    # -- lookup ----------------------------------------------------------------------------------------

    def lookup(self, webid_or_path: str) -> SimTag | None:
        """By WebID (case-sensitive, it is base64) or by path (case-insensitive, like PI)."""
        if webid_or_path.startswith("\\"):
            return self._by_path.get(_upper(webid_or_path))
        return self._by_webid.get(webid_or_path)

    def find(self, webid: str) -> SimTag | None:
        """By WebID, deleted points included (the ground truth of what was once served)."""
        return self._by_webid.get(webid) or self.retired.get(webid)

    # -- points created and deleted at run time -------------------------------------------------------

    def add(self, path: str, kind: str | None = None) -> SimTag:
        r"""Create a point (``\\SERVER\NAME``) or attribute; a deleted one's path brings it back as it was.
        ValueError if it exists."""
        server, name = split_path(path.strip())
        key = _upper(f"\\\\{server}\\{name}")
        if key in self._by_path:
            raise ValueError(f"{path!r} exists already")
        revived = next((t for t in self.retired.values() if _upper(t.path) == key), None)
        if revived is not None:
            tag = self.retired.pop(revived.webid)
        else:
            tag = SimTag(name, server, kind or kind_for_name(name.rpartition("|")[2]), self._next_index)
            self._next_index += 1
        self.tags.append(tag)
        self._by_path[key] = tag
        self._by_webid[tag.webid] = tag
        if not tag.is_attribute and all(_upper(s) != _upper(server) for s in self.servers):
            self.servers.append(server)
        self.version += 1
        return tag

    def remove(self, webid_or_path: str) -> SimTag:
        """Delete a point or attribute; KeyError if there is none."""
        tag = self.lookup(webid_or_path)
        if tag is None:
            raise KeyError(webid_or_path)
        self.tags.remove(tag)
        del self._by_path[_upper(tag.path)]
        del self._by_webid[tag.webid]
        self.retired[tag.webid] = tag
        self.version += 1
        return tag

    def is_live(self, tag: SimTag) -> bool:
        """Not deleted (channels skip deleted points)."""
        return not self.retired or tag.webid not in self.retired

    # -- events ----------------------------------------------------------------------------------------

    def phase_us(self, tag: SimTag) -> int:
        i = tag.index
        return (
            _PHASE_PATTERN_US[i % len(_PHASE_PATTERN_US)] + (i // len(_PHASE_PATTERN_US)) * 7919
        ) % self.period_us

    def _k_range(self, tag: SimTag, start_us: int, end_us: int) -> tuple[int, int]:
        phase, n = self.phase_us(tag), tag.per_time
        k_lo = max(0, _ceil_div(max(start_us, tag.since_us) - phase, self.period_us)) * n
        k_hi = ((end_us - phase) // self.period_us) * n + n - 1
        return k_lo, k_hi

    def event(self, tag: SimTag, k: int) -> SimEvent:
        """Event number ``k`` (>= 0) of ``tag``."""
        return self._event(tag, k, (k // tag.per_time) * self.period_us + self.phase_us(tag))

    def _event(self, tag: SimTag, k: int, ts: int) -> SimEvent:
        i = tag.index
        m = (k + i) % 50
        if m == 7:
            return SimEvent(ts, IO_TIMEOUT, False, False, False, False)
        if m == 23:
            return SimEvent(ts, SHUTDOWN, False, False, False, False)
        if m == 41 and self.error_values:
            return SimEvent(ts, ERROR_VALUE, False, False, False, False)
        kind = tag.kind
        value: Any
        if kind == "float":
            value = round(50 + 40 * math.sin(k / 10 + i), 6)
        elif kind == "int":
            value = (k * 13 + i) % 1000
        elif kind == "digital":
            value = MODES[(k + i) % 4]
        elif kind == "string":
            value = f"batch-{i}-{k}"
        elif kind == "bool":
            value = (k + i) % 3 != 0
        elif kind == "array":
            value = [k % 10, (k * 7 + i) % 100, i % 1000]
        else:  # timestamp
            value = format_timestamp(ts - ((k + i) % 3600) * US_PER_SECOND)
        return SimEvent(ts, value, True, m == 31, False, False)

    def events(
        self, tag: SimTag, start_us: int, end_us: int, *, max_count: int | None = None, reverse: bool = False
    ) -> list[SimEvent]:
        """Events with ``start_us <= ts <= end_us``, oldest first (newest first with ``reverse``).

        ``max_count`` keeps the first ``max_count`` in that order without building the rest.
        """
        k_lo, k_hi = self._k_range(tag, start_us, end_us)
        if k_hi < k_lo:
            return []
        if max_count is not None:
            if reverse:
                k_lo = max(k_lo, k_hi - max_count + 1)
            else:
                k_hi = min(k_hi, k_lo + max_count - 1)
        ks = range(k_hi, k_lo - 1, -1) if reverse else range(k_lo, k_hi + 1)
        period, phase, make, n = self.period_us, self.phase_us(tag), self._event, tag.per_time
        if n > 1:
            return [make(tag, k, (k // n) * period + phase) for k in ks]
        return [make(tag, k, k * period + phase) for k in ks]

    def count(self, tag: SimTag, start_us: int, end_us: int) -> int:
        """``len(events(tag, start_us, end_us))`` without building them."""
        k_lo, k_hi = self._k_range(tag, start_us, end_us)
        return max(0, k_hi - k_lo + 1)

    def latest(self, tag: SimTag, at_us: int) -> SimEvent | None:
        """The last event with ``ts <= at_us`` (the value a snapshot read returns at that time)."""
        phase = self.phase_us(tag)
        slot = (at_us - phase) // self.period_us
        ts = slot * self.period_us + phase
        if slot < 0 or ts < tag.since_us:
            return None
        return self._event(tag, slot * tag.per_time + tag.per_time - 1, ts)  # the last event at that time

    def next_after(self, tag: SimTag, after_us: int) -> SimEvent:
        """The first event with ``ts > after_us``."""
        k_lo, _ = self._k_range(tag, after_us + 1, after_us + 1)
        return self.event(tag, k_lo)
