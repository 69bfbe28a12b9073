r"""Deterministic PI values: the ground truth both the simulator and the tests compute from. No I/O.

Event ``k`` of tag ``i`` sits at ``k * period_us + phase(i)`` microseconds since the epoch, for every
``k >= 0``; its value and flags are pure functions of ``(kind, i, k)``. So any time range can be answered
without state, and a test can recompute exactly what a channel or a recorded query must have returned.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pistream.sim.pitime import format_timestamp, parse_time
from pistream.webid import point_webid, upper_invariant

__all__ = [
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
]

KINDS = ("float", "int", "digital", "string")
_UNITS = {"float": "degC", "int": "count", "digital": "", "string": ""}
_POINT_TYPES = {"float": "Float32", "int": "Int32", "digital": "Digital", "string": "String"}

# Shared, never mutated: values go straight to the JSON encoder.
MODES: tuple[dict[str, Any], ...] = tuple(
    {"Name": name, "Value": code, "IsSystem": False}
    for code, name in enumerate(("Off", "On", "Auto", "Manual"))
)
IO_TIMEOUT: dict[str, Any] = {"Name": "I/O Timeout", "Value": 246, "IsSystem": True}
SHUTDOWN: dict[str, Any] = {"Name": "Shutdown", "Value": 254, "IsSystem": True}

# Fractions of a second that make rendered timestamps carry 0, 1, 2, 3, 4, 5 and 6 fractional digits;
# the (i // 9) * 7919 term spreads larger tag sets over the period so they do not all tick at once.
_PHASE_PATTERN_US = (0, 500_000, 250_000, 100_000, 120_000, 123_000, 123_400, 123_450, 123_456)


@dataclass(frozen=True, slots=True)
class SimTag:
    r"""One simulated PI point, e.g. ``SimTag("SINUSOID", "SIMSRV", "float", 0)`` = ``\\SIMSRV\SINUSOID``."""

    name: str
    server: str
    kind: str
    index: int
    # Derived once: both are read for every event sent.
    path: str = field(init=False, repr=False, compare=False)
    webid: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown tag kind {self.kind!r}; expected one of {KINDS}")
        path = f"\\\\{self.server}\\{self.name}"
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "webid", point_webid(path))

    @property
    def units(self) -> str:
        return _UNITS[self.kind]

    @property
    def point_type(self) -> str:
        return _POINT_TYPES[self.kind]

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
    """Deterministic kind from a tag name, so a tags file alone decides the point types."""
    upper = name.upper()
    if any(word in upper for word in ("DIGITAL", "STATE", "MODE")):
        return "digital"
    if any(word in upper for word in ("STRING", "TEXT", "BATCH")):
        return "string"
    if any(word in upper for word in ("INT", "COUNT")):
        return "int"
    return "float"


def split_path(path: str) -> tuple[str, str]:
    r"""``\\SERVER\NAME`` -> ``("SERVER", "NAME")``; ValueError for anything else."""
    if not path.startswith("\\\\"):
        raise ValueError(f"not a PI point path (expected \\\\SERVER\\NAME): {path!r}")
    server, sep, name = path[2:].partition("\\")
    if not server or not sep or not name or "\\" in name:
        raise ValueError(f"not a PI point path (expected \\\\SERVER\\NAME): {path!r}")
    return server, name


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class SimModel:
    """A fixed set of tags, each producing one event per ``period_us = round(1e6 / rate)``."""

    def __init__(self, tags: Iterable[SimTag], rate: float = 1.0) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 events/s, got {rate}")
        self.tags: list[SimTag] = list(tags)
        self.rate = rate
        self.period_us = max(1, round(1_000_000 / rate))
        self._by_webid: dict[str, SimTag] = {}
        self._by_path: dict[str, SimTag] = {}
        for tag in self.tags:
            key = upper_invariant(tag.path)
            if key in self._by_path:
                raise ValueError(f"duplicate tag {tag.path!r}")
            self._by_path[key] = tag
            self._by_webid[tag.webid] = tag
        servers: dict[str, str] = {}
        for tag in self.tags:
            servers.setdefault(upper_invariant(tag.server), tag.server)
        self.servers: list[str] = list(servers.values())

    @classmethod
    def from_paths(cls, paths: Iterable[str], rate: float = 1.0) -> SimModel:
        r"""Tags from ``\\SERVER\NAME`` paths (duplicates, compared case-insensitively, are skipped)."""
        tags: list[SimTag] = []
        seen: set[str] = set()
        for path in paths:
            server, name = split_path(path.strip())
            key = upper_invariant(f"{server}\\{name}")
            if key in seen:
                continue
            seen.add(key)
            tags.append(SimTag(name, server, kind_for_name(name), len(tags)))
        return cls(tags, rate)

    @classmethod
    def generated(cls, n: int, rate: float = 1.0, server: str = "SIMSRV") -> SimModel:
        """``n`` tags ``SIM000000``, ``SIM000001``, ... with kinds cycling float, int, digital, string."""
        return cls((SimTag(f"SIM{i:06d}", server, KINDS[i % 4], i) for i in range(n)), rate)

    # -- lookup ----------------------------------------------------------------------------------------

    def lookup(self, webid_or_path: str) -> SimTag | None:
        """By WebID (case-sensitive, it is base64) or by path (case-insensitive, like PI)."""
        if webid_or_path.startswith("\\"):
            return self._by_path.get(upper_invariant(webid_or_path))
        return self._by_webid.get(webid_or_path)

    # -- events ----------------------------------------------------------------------------------------

    def phase_us(self, tag: SimTag) -> int:
        i = tag.index
        return (
            _PHASE_PATTERN_US[i % len(_PHASE_PATTERN_US)] + (i // len(_PHASE_PATTERN_US)) * 7919
        ) % self.period_us

    def _k_range(self, tag: SimTag, start_us: int, end_us: int) -> tuple[int, int]:
        phase = self.phase_us(tag)
        k_lo = max(0, _ceil_div(start_us - phase, self.period_us))
        k_hi = (end_us - phase) // self.period_us
        return k_lo, k_hi

    def event(self, tag: SimTag, k: int) -> SimEvent:
        """Event number ``k`` (>= 0) of ``tag``."""
        return self._event(tag, k, k * self.period_us + self.phase_us(tag))

    @staticmethod
    def _event(tag: SimTag, k: int, ts: int) -> SimEvent:
        i = tag.index
        m = (k + i) % 50
        if m == 7:
            return SimEvent(ts, IO_TIMEOUT, False, False, False, False)
        if m == 23:
            return SimEvent(ts, SHUTDOWN, False, False, False, False)
        kind = tag.kind
        value: Any
        if kind == "float":
            value = round(50 + 40 * math.sin(k / 10 + i), 6)
        elif kind == "int":
            value = (k * 13 + i) % 1000
        elif kind == "digital":
            value = MODES[(k + i) % 4]
        else:
            value = f"batch-{i}-{k}"
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
        period, phase, make = self.period_us, self.phase_us(tag), self._event
        return [make(tag, k, k * period + phase) for k in ks]

    def count(self, tag: SimTag, start_us: int, end_us: int) -> int:
        """``len(events(tag, start_us, end_us))`` without building them."""
        k_lo, k_hi = self._k_range(tag, start_us, end_us)
        return max(0, k_hi - k_lo + 1)

    def latest(self, tag: SimTag, at_us: int) -> SimEvent | None:
        """The last event with ``ts <= at_us`` (the value a snapshot read returns at that time)."""
        k = (at_us - self.phase_us(tag)) // self.period_us
        return self.event(tag, k) if k >= 0 else None

    def next_after(self, tag: SimTag, after_us: int) -> SimEvent:
        """The first event with ``ts > after_us``."""
        k_lo, _ = self._k_range(tag, after_us + 1, after_us + 1)
        return self.event(tag, k_lo)
