"""The lease that lets exactly one maintainer at a time rewrite a table.

Why a lease: on deltalake 1.6.6 two optimizes of the same files at once both commit, and every row they
rewrote is then in the table twice (an optimize beside appenders is safe). The lease is an empty Delta
commit carrying the app transaction ``(pistream:maintenance, version)`` whose version is the lease's expiry
in milliseconds since the epoch (UTC). delta-rs fails a commit whose app id another commit used since its
snapshot (``CommitFailedError``), so of two maintainers that both saw the lease free exactly one commits and
the other backs off (measured: one winner in each of 50 two-way and 30 four-way races of threads holding
their own tables). A competitor reads the expiry from the snapshot it opens anyway
(``transaction_version``); the holder's name is in that commit's commitInfo. The holder renews the lease
from a thread every third of its time to live and releases it with an expiry in the past; a crashed
holder's lease expires. Clocks of maintainers must agree to well within the time to live.

The lease cannot fence the optimize commit itself (delta-rs 1.6.6 drops app transactions from optimize
commits), so each optimize is checked afterwards: its commit must carry no app transaction and leave the
sum of the table's ``num_records`` unchanged. A holder frozen longer than the time to live (a paused VM)
could still race a successor; that check then reports it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import structlog
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.exceptions import CommitFailedError, DeltaError

from ..errors import MaintenanceError
from .storage import redact_uri
from .tableaccess import StorageOptions, current_options, iso_ms, open_table, translated

log = structlog.get_logger(__name__)


# Never a writer's app id: a writer's default is pistream-HOSTNAME, and no host name has a colon (a host named
# "maintenance" would have made "pistream-maintenance" both).
LEASE_APP_ID = "pistream:maintenance"


LEASE_TTL = 30 * 60.0  # seconds; renewed every third of it while held


_HOLDER_SEARCH = 200  # commits searched for the lease holder's name (the expiry needs no search)


class Lease:
    """Exactly one maintainer per table (see the module docstring): ``with Lease(uri, options):`` or
    ``acquire()``/``release()``. Blocking calls; a keeper thread renews the lease while it is held."""

    def __init__(self, uri: str, storage_options: StorageOptions | None = None, *, holder: str | None = None,
                 ttl: float = LEASE_TTL, clock: Callable[[], float] = time.time):
        if ttl < 3:
            raise ValueError("the lease's time to live must be at least 3 seconds")
        self.uri = uri
        self.storage_options = storage_options
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self.ttl = ttl
        self.clock = clock
        self.expires_ms: int | None = None  # the version of the lease this object holds
        self.lost: str | None = None  # why the lease was lost while held
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

    def acquire(self) -> None:
        """Take the lease; MaintenanceError with ``held_until`` if another maintainer holds it."""
        options = current_options(self.uri, self.storage_options)
        with self._lock, translated("taking the maintenance lease", self.uri, options):
            table = open_table(self.uri, options)
            current = table.transaction_version(LEASE_APP_ID) or 0
            if current > self._now_ms():
                raise self._busy(table, current)
            version = max(current + 1, self._now_ms() + int(self.ttl * 1000))
            try:
                self._commit(table, version, "acquired")
            except CommitFailedError:  # another maintainer committed the lease since our snapshot
                table = open_table(self.uri, options)
                current = table.transaction_version(LEASE_APP_ID) or 0
                if current > self._now_ms():
                    raise self._busy(table, current) from None
                raise
            self.expires_ms, self.lost = version, None
        log.info("lease_acquired", table=self.display, holder=self.holder, expires=iso_ms(version))
        self._stop.clear()
        self._keeper = threading.Thread(target=self._keep, name="pistream-lease", daemon=True)
        self._keeper.start()

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
                        self._commit(table, self._now_ms(), "released")
                        log.info("lease_released", table=self.display, holder=self.holder)
            except Exception as exc:  # noqa: BLE001 - the lease expires by itself
                log.warning("lease_release_failed", table=self.display, error=str(exc),
                            expires=iso_ms(self.expires_ms))
            finally:
                self.expires_ms = None

    def open_table(self) -> DeltaTable:
        """A fresh snapshot of the table in which this lease is still held, for at least a third of its
        time to live; MaintenanceError if it was lost or could not be renewed."""
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
            if current - self._now_ms() < self.ttl * 1000 / 3:
                raise MaintenanceError(
                    f"the maintenance lease of {self.display} expires at {iso_ms(current)} and could not be "
                    "renewed (see lease_renewal_failed): the next step was not started")
            return table

    def _commit(self, table: DeltaTable, version: int, action: str) -> None:
        self._mine.add(version)
        try:
            table.create_write_transaction(
                [], mode="append", schema=table.schema(),
                partition_by=table.metadata().partition_columns or None,
                commit_properties=CommitProperties(
                    app_transactions=[Transaction(LEASE_APP_ID, version)],
                    custom_metadata={"pistream.lease_holder": self.holder, "pistream.lease_action": action,
                                     "pistream.lease_expires": iso_ms(version)}))
        except CommitFailedError:
            self._mine.discard(version)  # certainly not in the log
            raise

    def _keep(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._renew()
            except Exception as exc:  # noqa: BLE001 - tried again at the next tick; the lease holds till then
                log.warning("lease_renewal_failed", table=self.display, error=str(exc),
                            expires=iso_ms(self.expires_ms or 0))

    def _renew(self) -> None:
        options = current_options(self.uri, self.storage_options)
        with self._lock, translated("renewing the maintenance lease", self.uri, options):
            if self.lost is not None or self.expires_ms is None:
                return
            table = open_table(self.uri, options)
            current = table.transaction_version(LEASE_APP_ID) or 0
            if current not in self._mine:
                self.lost = f"another maintainer took it (now held until {iso_ms(current)})"
            else:
                version = max(current + 1, self._now_ms() + int(self.ttl * 1000))
                try:
                    self._commit(table, version, "renewed")
                    self.expires_ms = version
                    return
                except CommitFailedError:
                    self.lost = "another maintainer committed the lease while it was held"
        log.error("lease_lost", table=self.display, holder=self.holder, reason=self.lost)

    def _busy(self, table: DeltaTable, current: int) -> MaintenanceError:
        holder = lease_holder(table, current) or "another maintainer"
        return MaintenanceError(
            f"{holder} holds the maintenance lease of {self.display} until {iso_ms(current)} (it is "
            "optimizing or vacuuming the table): try again after that; a crashed holder's lease just expires",
            held_until=datetime.fromtimestamp(current / 1000, UTC))


def lease_holder(table: DeltaTable, expires_ms: int | None = None) -> str | None:
    """Who holds the table's lease (that expires at ``expires_ms``), from the commit that took or renewed it
    if it is among the last few hundred (the lease is renewed every third of its time to live)."""
    expires = iso_ms(expires_ms) if expires_ms is not None else None
    try:
        for commit in table.history(limit=_HOLDER_SEARCH):
            if "pistream.lease_action" in commit and expires in (None, commit.get("pistream.lease_expires")):
                return str(commit["pistream.lease_holder"])
    except (DeltaError, OSError):
        pass
    return None


@contextmanager
def leased(lease: Lease | None, uri: str, storage_options: StorageOptions | None) -> Iterator[Lease]:
    """The caller's lease, or one taken (and released) for this call."""
    if lease is not None:
        yield lease
        return
    with Lease(uri, storage_options) as own:
        yield own


@contextmanager
def no_lease() -> Iterator[Lease | None]:
    yield None
