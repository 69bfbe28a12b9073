"""Fault injection: what goes wrong on real sites, switched on and off at run time by tests.

``sim.faults`` (one ``Faults`` per ``Simulator``; pass ``Simulator(model, faults=Faults(...))`` to start with
some on) holds:

- channel faults on the channels open now: ``kill_channels()`` (sockets cut, no close frame),
  ``silence(seconds)`` (no data, heartbeats or pongs while TCP stays up), and from now on
  ``slow(seconds_per_message)``;
- REST faults, counted: ``fail_rest(status, count, prefix=...)`` (500/503/429 with ``Retry-After`` and
  ``{"Errors": [...]}``), ``cut_short(count, prefix=...)`` (200 with a non-null ``WebException`` and half the
  items), ``reject_channels(status, count)`` (upgrade requests refused);
- delivery options read at every poll: ``shuffle``, ``late_fraction``, ``repeat_last`` (see ``Faults``).

Ground truth stays exact: the model is untouched, and ``Simulator.emitted`` counts each event once, when
it is first sent (repeats are not counted again; a late event counts when it is finally sent, and one that
is still held back when its channel ends is never sent: it is listed in ``late_lost`` instead).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pistream.sim.model import SimEvent, SimTag

REST_FAULT_STATUSES = frozenset({429, 500, 502, 503, 504})
_MASK = 0xFFFFFFFF


class _Session(Protocol):
    def kill(self, *, reset: bool) -> None: ...

    def silence(self, seconds: float) -> None: ...


@dataclass
class RestFault:
    """One armed REST fault: answers the next ``remaining`` requests under ``prefix``."""

    status: int  # 200 for cut_short
    remaining: int
    prefix: str  # lower-case path below /piwebapi/, "" for every request
    retry_after: int | None
    message: str

    def matches(self, path: str) -> bool:
        """Whole segments: prefix ``streams`` matches ``streams/{webId}/recorded``, not ``streamsets``."""
        prefix = self.prefix
        return self.remaining > 0 and (
            not prefix or path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/")
        )


def _normalize_prefix(prefix: str | None) -> str:
    text = (prefix or "").strip().strip("/").lower()
    return text.removeprefix("piwebapi").lstrip("/")


def _unit(*parts: int) -> float:
    """A deterministic number in [0, 1) from integers (a small integer hash, no global state)."""
    h = 0x9E3779B9
    for part in parts:
        h = ((h ^ (part & _MASK) ^ (part >> 32 & _MASK)) * 0x85EBCA6B) & _MASK
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & _MASK
        h ^= h >> 16
    return h / 2**32


class Faults:
    """Faults and delivery quirks of one simulator; every method is synchronous and takes effect at once.

    Delivery options (read at every channel poll, so they can be flipped while channels are open):

    - ``shuffle``: each message lists its streams, and each stream its events, in random order.
    - ``late_fraction``: that fraction of events (chosen by a hash of tag and timestamp, so the same
      events every run) is held back one poll and then sent after the newer events of the next message.
      Their timestamps lag the newest one sent by at most two poll intervals (plus any ``slow`` delay).
    - ``repeat_last``: the fraction of (stream, message) pairs whose newest event is sent again at the
      start of that stream's next message (``1.0`` or ``True``: always) — the "same value sent again" quirk.
    - ``seed``: seeds the shuffle and the hashes.
    """

    def __init__(
        self, *, shuffle: bool = False, late_fraction: float = 0.0, repeat_last: float = 0.0, seed: int = 0
    ) -> None:
        for name, value in (("late_fraction", late_fraction), ("repeat_last", repeat_last)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        self.shuffle = shuffle
        self.late_fraction = float(late_fraction)
        self.repeat_last = float(repeat_last)
        self.seed = seed
        self.message_delay = 0.0
        self.rest_faults: list[RestFault] = []
        self.channel_rejections: list[RestFault] = []
        self.late_lost: list[tuple[str, int]] = []  # (webid, timestamp_us) held back when a channel ended
        self.rest_faults_served = 0
        self.channels_killed = 0
        self._sessions: Iterable[_Session] = ()
        self._sessions_started = 0

    def bind(self, sessions: Iterable[_Session]) -> None:
        """Called by the Simulator: the live set of open channel sessions."""
        self._sessions = sessions

    # -- channels --------------------------------------------------------------------------------------

    def kill_channels(self, *, reset: bool = True) -> int:
        """Cut every open channel's TCP connection without a close frame: with ``reset`` an RST
        (``SO_LINGER`` 0), else a plain close (FIN). Returns how many were cut.

        Messages already handed to the kernel may never reach the client: a correct client reads the gap
        back over REST from what it last received.
        """
        sessions = list(self._sessions)
        for session in sessions:
            session.kill(reset=reset)
        self.channels_killed += len(sessions)
        return len(sessions)

    def silence(self, seconds: float) -> int:
        """Channels open now send nothing — no data, heartbeats or pongs — for ``seconds`` (TCP stays
        open). Values of the silent time are sent in one message afterwards, if the client is still there.
        A client's close frame is still answered, so a client that gives up is not held for its close
        timeout. Channels opened later are not affected. Returns how many channels went silent."""
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        sessions = list(self._sessions)
        for session in sessions:
            session.silence(seconds)
        return len(sessions)

    def slow(self, seconds_per_message: float) -> None:
        """From now on at least ``seconds_per_message`` between two messages of a channel (0 ends it);
        each message then carries everything since the previous one."""
        if seconds_per_message < 0 or not math.isfinite(seconds_per_message):
            raise ValueError(f"seconds_per_message must be >= 0, got {seconds_per_message}")
        self.message_delay = seconds_per_message

    # -- REST ------------------------------------------------------------------------------------------

    def fail_rest(
        self,
        status: int = 503,
        count: int = 1,
        *,
        prefix: str | None = None,
        retry_after: int | None = 1,
        message: str | None = None,
    ) -> None:
        """The next ``count`` REST requests whose path (below ``/piwebapi/``, case-insensitive) starts
        with the whole segments of ``prefix`` (e.g. ``"streamsets/recorded"``, ``"streams"``; None: any)
        answer ``status`` with
        ``{"Errors": [message]}`` and, unless ``retry_after`` is None, ``Retry-After: <seconds>``.
        Channel upgrades are not REST requests: see ``reject_channels``."""
        if status not in REST_FAULT_STATUSES:
            raise ValueError(f"status must be one of {sorted(REST_FAULT_STATUSES)}, got {status}")
        text = (
            message
            or {
                429: "Too many requests: the rate limit of this client was exceeded.",
                500: "An internal server error occurred (simulated fault).",
                502: "Bad gateway (simulated fault).",
                503: "The service is temporarily unavailable (simulated fault).",
                504: "Gateway timeout (simulated fault).",
            }[status]
        )
        self.rest_faults.append(
            RestFault(status, _count(count), _normalize_prefix(prefix), retry_after, text)
        )

    def cut_short(self, count: int = 1, *, prefix: str | None = None) -> None:
        """The next ``count`` REST answers with ``Items`` under ``prefix`` come back 200 but cut short: half
        the items (of each stream, for stream sets) and a non-null ``WebException``."""
        message = "The response was cut short: the server ran out of time (simulated fault)."
        self.rest_faults.append(RestFault(200, _count(count), _normalize_prefix(prefix), None, message))

    def reject_channels(self, status: int = 503, count: int = 1, *, retry_after: int | None = 1) -> None:
        """The next ``count`` channel upgrade requests are refused with ``status`` (after authentication)."""
        if status not in REST_FAULT_STATUSES:
            raise ValueError(f"status must be one of {sorted(REST_FAULT_STATUSES)}, got {status}")
        message = f"Channel refused with {status} (simulated fault)."
        self.channel_rejections.append(RestFault(status, _count(count), "", retry_after, message))

    def reset(self) -> None:
        """Disarm everything: REST faults, rejections, slowness and the delivery options."""
        self.rest_faults.clear()
        self.channel_rejections.clear()
        self.message_delay = 0.0
        self.shuffle = False
        self.late_fraction = 0.0
        self.repeat_last = 0.0

    # -- used by the server and the channel sessions ---------------------------------------------------

    def take_rest_fault(self, path: str, *, cut_short: bool = False) -> RestFault | None:
        """The armed fault for a request to ``path`` (lower-case, below /piwebapi/), consuming one use:
        a failing status, or with ``cut_short`` a cut-short answer (asked once the answer has items)."""
        for fault in self.rest_faults:
            if fault.matches(path) and (fault.status == 200) == cut_short:
                fault.remaining -= 1
                self.rest_faults_served += 1
                self.rest_faults = [f for f in self.rest_faults if f.remaining > 0]
                return fault
        return None

    def wants_cut_short(self, path: str) -> bool:
        return any(f.status == 200 and f.matches(path) for f in self.rest_faults)

    def take_channel_rejection(self) -> RestFault | None:
        for fault in self.channel_rejections:
            if fault.remaining > 0:
                fault.remaining -= 1
                self.channel_rejections = [f for f in self.channel_rejections if f.remaining > 0]
                return fault
        return None

    @property
    def reorders(self) -> bool:
        """Whether channel messages need more than the plain in-order path."""
        return self.shuffle or self.late_fraction > 0 or self.repeat_last > 0

    def session_rng(self) -> random.Random:
        self._sessions_started += 1
        return random.Random(self.seed * 1_000_003 + self._sessions_started)

    def is_late(self, tag: SimTag, event: SimEvent) -> bool:
        return (
            self.late_fraction > 0 and _unit(self.seed, 1, tag.index, event.timestamp_us) < self.late_fraction
        )

    def repeats(self, tag: SimTag, event: SimEvent) -> bool:
        return self.repeat_last > 0 and _unit(self.seed, 2, tag.index, event.timestamp_us) < self.repeat_last


def _count(count: int) -> int:
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return count
