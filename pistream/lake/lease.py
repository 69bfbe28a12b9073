"""The lease that lets exactly one maintainer at a time rewrite a table, short and renewed, so a crash stops
maintenance for two minutes at most (at once when the crashed holder ran on this host).

Why a lease: on deltalake 1.6.6 two optimizes of the same files at once both commit, and every row they
rewrote is then in the table twice (an optimize beside appenders is safe). The lease is an empty Delta
commit carrying the app transaction ``(pistream:maintenance, version)`` whose version is the lease's expiry
in milliseconds since the epoch (UTC). delta-rs fails a commit whose app id another commit used since its
snapshot (``CommitFailedError``), so of two maintainers that both saw the lease free exactly one commits and
the other backs off. Clocks of maintainers must agree to well within the time to live.

Everything a taker needs is in the snapshot it opens anyway, as app transactions (no log search): the
expiry, ``pistream:maintenance:released`` (equal to the expiry when the holder released it), and
``pistream:maintenance:<step>``, when each step (compact, z_order, vacuum) last finished, so that "vacuum
daily" survives restarts. Who holds it (host, pid, process start: ``holder.Holder``) and since when is in
the lease commit's commitInfo, found by reading the log backwards (only when the lease is held, for
``maintenance status``, or to check whether a holder on this host is still running).

The holder renews the lease every quarter of its time to live (30 s of 2 min) from a thread, and a step
starts only while at least half of it is left, so a holder that cannot renew starts nothing more. A
lease that was not released is taken over:
- at once when its holder ran on this host and its process has ended (``holder.gone``): a dead process
  commits nothing more, so nothing needs fencing;
- after its expiry otherwise, and then the takeover commit also changes a table property
  (``pistream.maintenance.fence``). That is the fence: delta-rs refuses any commit whose snapshot predates
  a metadata change ("Metadata changed since last commit"), so an optimize the old holder planned before
  the takeover (it was frozen, or its storage hung past the expiry) fails at its commit and rewrites
  nothing twice. The price: appends in flight at that moment fail once too and are retried.
Not fenced: a vacuum's deletions (delta-rs deletes before its VACUUM END commit); it deletes only files
removed longer than the retention (24 h or more) ago, which no other maintainer's step still reads. delta-rs
has no hook between an optimize's writes and its commit, so a step in progress is not stopped when a
renewal fails: only the takeover's fence stops its commit. Each optimize is also checked afterwards (see
``optimize``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.exceptions import CommitFailedError

from ..errors import MaintenanceBusyError, MaintenanceError
from .holder import Holder, gone, this_process
from .storage import redact_uri, table_files
from .tableaccess import StorageOptions, current_options, iso_ms, open_table, translated

log = structlog.get_logger(__name__)


# Never a writer's app id: app ids starting with "pistream:" are refused for writers (config.build_settings).
LEASE_APP_ID = "pistream:maintenance"
RELEASED_APP_ID = "pistream:maintenance:released"
STEPS = ("compact", "z_order", "vacuum")
FENCE_PROPERTY = "pistream.maintenance.fence"


LEASE_TTL = 120.0  # seconds; renewed every quarter of it while held


_RECORD_SEARCH = 1000  # commits read back for the lease commit (the holder's name); 30 s of a busy fleet


def step_app_id(step: str) -> str:
    return f"{LEASE_APP_ID}:{step}"


@dataclass(frozen=True)
class LeaseState:
    """The table's lease as the log has it; times in ms since the epoch."""

    expires_ms: int  # 0: never taken
    released: bool
    holder: Holder | None = None  # from the lease commit, if found
    action: str | None = None  # of that commit: acquired, renewed, taken_over, released, broken
    since_ms: int | None = None  # when the holder took it
    renewed_ms: int | None = None  # the lease commit's time
    last_runs: dict[str, int | None] = field(default_factory=dict)  # step -> when it last finished

    def held(self, now_ms: int) -> bool:
        return not self.released and self.expires_ms > now_ms

    def to_dict(self, now_ms: int) -> dict[str, Any]:
        def when(ms: int | None) -> str | None:
            return iso_ms(ms) if ms else None

        return {"state": "held" if self.held(now_ms) else "released" if self.released or not self.expires_ms
                else "expired",
                "holder": self.holder.text() if self.holder else None,
                "holder_process": self.holder.to_dict() if self.holder else None,
                "holder_gone": gone(self.holder) if self.holder else None,
                "since": when(self.since_ms), "renewed": when(self.renewed_ms), "expires": when(self.expires_ms),
                "last_runs": {step: when(ms) for step, ms in self.last_runs.items()}}


def read_state(uri: str, options: Mapping[str, str], table: DeltaTable | None = None, *,
               find_holder: bool = True) -> LeaseState:
    """The lease in ``table`` (or a fresh snapshot) and when each step last ran; the holder from the log."""
    table = table if table is not None else open_table(uri, options)
    expires = table.transaction_version(LEASE_APP_ID) or 0
    released = expires == 0 or table.transaction_version(RELEASED_APP_ID) == expires
    runs = {step: table.transaction_version(step_app_id(step)) for step in STEPS}
    info = _lease_commit(uri, options, table, expires) if find_holder and expires else None
    if info is None:
        return LeaseState(expires, released, last_runs=runs)
    process = info.get("pistream.lease_process")
    holder = Holder.from_dict(json.loads(process)) if process else None
    if holder is None:  # a lease commit of an older pistream: its holder as text only
        holder = Holder.parse(str(info.get("pistream.lease_holder", "")))
    since = info.get("pistream.lease_since")
    return LeaseState(expires, released, holder, str(info.get("pistream.lease_action")),
                      int(since) if since else None, int(info.get("timestamp") or 0) or None, runs)


def _lease_commit(uri: str, options: Mapping[str, str], table: DeltaTable, expires_ms: int
                  ) -> dict[str, Any] | None:
    """The commitInfo of the lease commit that set ``expires_ms``, read newest first (bounded)."""
    files = table_files(uri, options)
    latest = table.version()
    for version in range(latest, max(-1, latest - _RECORD_SEARCH), -1):
        try:
            with files.open_input_stream(f"_delta_log/{version:020d}.json") as stream:
                lines = stream.read().decode().splitlines()
        except OSError:
            return None  # cleaned up past a checkpoint
        for line in lines:
            info = json.loads(line).get("commitInfo") if line.strip() else None
            if info is not None and info.get("pistream.lease_expires_ms") == str(expires_ms):
                return dict(info)
    return None


class Lease:
    """Exactly one maintainer per table (see the module docstring): ``with Lease(uri, options):`` or
    ``acquire()``/``release()``. Blocking calls; a keeper thread renews the lease while it is held."""

    def __init__(self, uri: str, storage_options: StorageOptions | None = None, *, holder: Holder | None = None,
                 role: str = "", ttl: float = LEASE_TTL, clock: Callable[[], float] = time.time):
        if ttl < 3:
            raise ValueError("the lease's time to live must be at least 3 seconds")
        self.uri = uri
        self.storage_options = storage_options
        self.holder = holder or this_process(role)
        self.ttl = ttl
        self.clock = clock
        self.expires_ms: int | None = None  # the version of the lease this object holds
        self.since_ms = 0
        self.lost: str | None = None  # why the lease was lost while held
        self.state: LeaseState | None = None  # as found when it was acquired (last_runs: when steps last ran)
        self._mine: set[int] = set()  # versions this object committed (a timed-out commit may have landed)
        self._lock = threading.Lock()  # one lease operation at a time: the keeper against the steps
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    @property
    def display(self) -> str:
        return redact_uri(self.uri)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def acquire(self, wait: float = 0.0, sleep: Callable[[float], None] = time.sleep) -> None:
        """Take the lease; if another maintainer holds it, MaintenanceBusyError, after waiting up to ``wait``
        seconds for it (checked every few seconds)."""
        deadline = self.clock() + wait
        while True:
            try:
                self._try_acquire()
                break
            except MaintenanceBusyError as busy:
                left = deadline - self.clock()
                if left <= 0:
                    raise
                log.info("lease_waiting", table=self.display, holder=busy.holder, seconds_left=round(left, 1))
                sleep(min(5.0, left))
        log.info("lease_acquired", table=self.display, holder=self.holder.text(), expires=iso_ms(self.expires_ms or 0))
        self._stop.clear()
        self._keeper = threading.Thread(target=self._keep, name="pistream-lease", daemon=True)
        self._keeper.start()

    def _try_acquire(self) -> None:
        options = current_options(self.uri, self.storage_options)
        with self._lock, translated("taking the maintenance lease", self.uri, options):
            table = open_table(self.uri, options)
            state = read_state(self.uri, options, table, find_holder=False)
            now = self._now_ms()
            action, fence = "acquired", False
            if not state.released:
                state = read_state(self.uri, options, table)
                if state.holder is not None and gone(state.holder):
                    action = "taken_over"  # a dead process commits nothing more: no fence needed
                    log.warning("lease_taken_over", table=self.display, previous=state.holder.text(),
                                reason="its process has ended", expires=iso_ms(state.expires_ms))
                elif state.held(now):
                    raise self._busy(state)
                else:
                    action, fence = "taken_over", True
                    log.warning("lease_taken_over", table=self.display, reason="it expired",
                                previous=state.holder.text() if state.holder else None,
                                expired=iso_ms(state.expires_ms))
            version = max(state.expires_ms + 1, now + int(self.ttl * 1000))
            self.since_ms = now
            try:
                self._commit(table, version, action, fence=fence)
            except CommitFailedError:  # another maintainer committed the lease since our snapshot
                state = read_state(self.uri, options)
                if state.held(self._now_ms()):
                    raise self._busy(state) from None
                raise
            self.expires_ms, self.lost, self.state = version, None, state

    def release(self) -> None:
        """Give the lease up (an expiry in the past). Never raises: a lease not released expires."""
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join()
            self._keeper = None
        with self._lock:
            if self.expires_ms is None:
                return
            try:
                options = current_options(self.uri, self.storage_options)
                with translated("releasing the maintenance lease", self.uri, options):
                    table = open_table(self.uri, options)
                    if self.lost is None and table.transaction_version(LEASE_APP_ID) in self._mine:
                        now = self._now_ms()
                        self._commit(table, now, "released", [Transaction(RELEASED_APP_ID, now)])
                        log.info("lease_released", table=self.display, holder=self.holder.text())
            except Exception as exc:  # noqa: BLE001 - the lease expires by itself
                log.warning("lease_release_failed", table=self.display, error=str(exc),
                            expires=iso_ms(self.expires_ms))
            finally:
                self.expires_ms = None

    def open_table(self) -> DeltaTable:
        """A fresh snapshot of the table in which this lease is still held, for at least half of its time
        to live; MaintenanceError if it was lost or could not be renewed."""
        options = current_options(self.uri, self.storage_options)
        with self._lock:
            if self.expires_ms is None:
                raise MaintenanceError(f"maintenance of {self.display} without its lease: acquire it first")
            with translated("reading the maintenance lease", self.uri, options):
                table = open_table(self.uri, options)
            current = table.transaction_version(LEASE_APP_ID) or 0
            if self.lost is None and current not in self._mine:
                self.lost = f"another maintainer took it (now held until {iso_ms(current)})"
            if self.lost is not None:
                raise MaintenanceError(f"lost the maintenance lease of {self.display}: {self.lost}; "
                                       "the next step was not started")
            self.expires_ms = current
            if current - self._now_ms() < self.ttl * 1000 / 2:
                raise MaintenanceError(
                    f"the maintenance lease of {self.display} expires at {iso_ms(current)} and could not be "
                    "renewed (see lease_renewal_failed): the next step was not started")
            return table

    def record(self, step: str) -> None:
        """Note in the table that ``step`` just finished (with a renewal). Never raises: the step is done;
        without the note the scheduler runs it again sooner than needed."""
        try:
            self._renew([Transaction(step_app_id(step), self._now_ms())])
        except Exception as exc:  # noqa: BLE001
            log.warning("maintenance_run_unrecorded", table=self.display, step=step, error=str(exc))

    def _commit(self, table: DeltaTable, version: int, action: str, extra: list[Transaction] | None = None,
                *, fence: bool = False) -> None:
        self._mine.add(version)
        properties = CommitProperties(
            app_transactions=[Transaction(LEASE_APP_ID, version), *(extra or [])],
            custom_metadata={"pistream.lease_holder": self.holder.text(),
                             "pistream.lease_process": json.dumps(self.holder.to_dict()),
                             "pistream.lease_action": action, "pistream.lease_since": str(self.since_ms),
                             "pistream.lease_expires": iso_ms(version), "pistream.lease_expires_ms": str(version)})
        try:
            if fence:  # a metadata change: fails every commit planned before it (see the module docstring)
                table.alter.set_table_properties(
                    {FENCE_PROPERTY: f"{iso_ms(self._now_ms())} {self.holder.text()}"}, raise_if_not_exists=False,
                    commit_properties=properties)
            else:
                table.create_write_transaction(
                    [], mode="append", schema=table.schema(),
                    partition_by=table.metadata().partition_columns or None, commit_properties=properties)
        except CommitFailedError:
            self._mine.discard(version)  # certainly not in the log
            raise

    def _keep(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._renew()
            except Exception as exc:  # noqa: BLE001 - tried again at the next tick; the lease holds till then
                log.warning("lease_renewal_failed", table=self.display, error=str(exc),
                            expires=iso_ms(self.expires_ms or 0))

    def _renew(self, extra: list[Transaction] | None = None) -> None:
        options = current_options(self.uri, self.storage_options)
        with self._lock, translated("renewing the maintenance lease", self.uri, options):
            if self.lost is not None or self.expires_ms is None:
                return
            table = open_table(self.uri, options)
            current = table.transaction_version(LEASE_APP_ID) or 0
            if current in self._mine:
                version = max(current + 1, self._now_ms() + int(self.ttl * 1000))
                try:
                    self._commit(table, version, "renewed", extra)
                    self.expires_ms = version
                    return
                except CommitFailedError:
                    current = open_table(self.uri, options).transaction_version(LEASE_APP_ID) or 0
                    if current in self._mine:  # another commit changed the metadata: try at the next tick
                        raise
            self.lost = f"another maintainer took it (now held until {iso_ms(current)})"
        log.error("lease_lost", table=self.display, holder=self.holder.text(), reason=self.lost)

    def _busy(self, state: LeaseState) -> MaintenanceBusyError:
        holder = state.holder.text() if state.holder else "another maintainer"
        renewed = f", renewed {iso_ms(state.renewed_ms)}" if state.renewed_ms else ""
        return MaintenanceBusyError(
            f"{holder} holds the maintenance lease of {self.display} until {iso_ms(state.expires_ms)}{renewed} "
            "(it is optimizing or vacuuming the table): nothing failed, run again later or wait for it with "
            f"--wait SECONDS; a lease its holder stopped renewing expires within {self.ttl:.0f} s",
            held_until=datetime.fromtimestamp(state.expires_ms / 1000, UTC), holder=holder)


def break_lease(uri: str, storage_options: StorageOptions | None, by: Holder,
                clock: Callable[[], float] = time.time) -> LeaseState:
    """Free the table's lease whoever holds it (an operator's last resort), with the fence of a takeover: a
    holder still running loses it and its optimize in flight cannot commit. Returns the lease as it was."""
    options = current_options(uri, storage_options)
    with translated("breaking the maintenance lease", uri, options):
        table = open_table(uri, options)
        before = read_state(uri, options, table)
        now = int(clock() * 1000)
        breaker = Lease(uri, storage_options, holder=by, clock=clock)
        breaker.since_ms = now
        breaker._commit(table, now, "broken", [Transaction(RELEASED_APP_ID, now)], fence=True)
    log.warning("lease_broken", table=redact_uri(uri), by=by.text(),
                previous=before.holder.text() if before.holder else None, expires=iso_ms(before.expires_ms))
    return before


def lease_holder(table: DeltaTable, uri: str, options: Mapping[str, str] | None = None) -> str | None:
    """Who holds (or last held) the table's lease, as ``host:pid:role``."""
    state = read_state(uri, dict(options or {}), table)
    return state.holder.text() if state.holder else None


@contextmanager
def leased(lease: Lease | None, uri: str, storage_options: StorageOptions | None, role: str = "",
           wait: float = 0.0) -> Iterator[Lease]:
    """The caller's lease, or one taken (waiting up to ``wait`` seconds) and released for this call."""
    if lease is not None:
        yield lease
        return
    own = Lease(uri, storage_options, role=role)
    own.acquire(wait)
    try:
        yield own
    finally:
        own.release()


@contextmanager
def no_lease() -> Iterator[Lease | None]:
    yield None
