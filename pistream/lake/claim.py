"""The writer claim: at most one live process writes to a table with one app id.

Why: two processes with one app id read each other's transaction versions as their own and skip their own
commits as "already written" - values lost without a word. The claim is a Delta app transaction
``(pistream:claim:<app_id>, expiry in ms since the epoch)``, the device of the maintenance lease (``lease``):
taken by an empty commit, then carried again with a new expiry by every data commit of its holder, so it is
renewed for free while data flows (an empty commit renews it only after a third of its time to live without
one). delta-rs fails a commit whose app id another commit used since its snapshot, so of two processes taking
the claim at once exactly one wins, and a data commit of a holder that lost its claim cannot land after the
new holder's claim commit: it fails, finds the claim taken, and the process stops (exit 1).

Each claim commit's commitInfo says who holds it (host, pid, process start: ``holder``), which run of it
(``instance``), since when and until when; data commits also record their transaction version. So a second
process is refused at start naming the holder (exit 2); a holder on this host whose process has ended is taken
over at once, one on another host after its expiry; and a transaction version found already in the table is
this run's retried commit only if this run wrote it - any other writer is a loud error, never a skip.
Clocks of the writers' hosts must agree to well within the time to live.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
import trio
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.exceptions import CommitFailedError

from ..errors import ForeignWriterError, PistreamError, TableConflictError
from .holder import Holder, gone, process_start_ticks, this_process
from .tableaccess import iso_ms

log = structlog.get_logger(__name__)

CLAIM_PREFIX = "pistream:claim:"  # app ids of pistream's own records start with "pistream:"; a writer's never do
CLAIM_TTL = 60.0  # seconds: a crashed holder on another host blocks its app id this long at most
RECORD_KEY = "pistream.claim"  # the commitInfo field with a claim record (JSON)
_HISTORY_SEARCH = 500  # commits searched for a claim's holder or a transaction's writer
_TAKE_ATTEMPTS = 5
RELEASE_SECONDS = 5.0  # the release at the end of a run waits no longer for the storage
_LIVE_INSTANCES: set[str] = set()  # runs in this process that hold a claim (an earlier run's claim is free)


def claim_txn_id(app_id: str) -> str:
    return CLAIM_PREFIX + app_id


@dataclass(frozen=True)
class ClaimRecord:
    """What one commit says about the claim of an app id."""

    app_id: str
    instance: str  # one run of pistream (a restarted process is another run)
    holder: Holder
    since_ms: int
    expires_ms: int
    action: str  # taken, renewed, released, or commit (carried by a data commit)

    def to_json(self) -> str:
        return json.dumps({"app_id": self.app_id, "instance": self.instance, "holder": self.holder.to_dict(),
                           "since_ms": self.since_ms, "expires_ms": self.expires_ms, "action": self.action})

    @classmethod
    def from_commit(cls, commit: dict[str, Any]) -> ClaimRecord | None:
        try:
            data = json.loads(commit[RECORD_KEY])
            holder = Holder.from_dict(data["holder"])
            if holder is None:
                return None
            return cls(str(data["app_id"]), str(data["instance"]), holder, int(data["since_ms"]),
                       int(data["expires_ms"]), str(data["action"]))
        except (KeyError, TypeError, ValueError):
            return None

    def describe(self) -> str:
        return f"{self.holder.text()} (run {self.instance}, writing since {iso_ms(self.since_ms)})"

    def ended(self) -> bool:
        """Certainly not running any more: an earlier run in this process, or a process on this host that has
        ended. A holder on another host has not ended as far as this process can tell."""
        holder = self.holder
        if holder.host == socket.gethostname() and holder.pid == os.getpid() \
                and holder.start_ticks in (None, process_start_ticks(os.getpid())):
            return self.instance not in _LIVE_INSTANCES
        return gone(holder)


def _search(table: DeltaTable, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """The newest commit ``wanted``: among the last 20 first (each a read of object storage), then further."""
    for limit in (20, _HISTORY_SEARCH):
        for commit in table.history(limit=limit):
            if wanted(commit):
                return commit
    return None


def claim_record(table: DeltaTable, app_id: str, expires_ms: int) -> ClaimRecord | None:
    """The record of the commit that set the claim of ``app_id`` to ``expires_ms``, if among the last few
    hundred commits (the holder renews it every third of its time to live)."""
    commit = _search(table, lambda c: (r := ClaimRecord.from_commit(c)) is not None
                     and r.app_id == app_id and r.expires_ms == expires_ms)
    return ClaimRecord.from_commit(commit) if commit is not None else None


def transaction_writer(table: DeltaTable, app_id: str, txn_version: int) -> tuple[int, ClaimRecord | None] | None:
    """The table version of the commit that wrote ``(app_id, txn_version)`` and the claim it carried (None for
    a writer without a claim: an older pistream or another tool), if among the last few hundred commits."""
    commit = _search(table, lambda c: c.get("pistream.app_id") == app_id
                     and c.get("pistream.txn_version") == str(txn_version))
    if commit is None:
        return None
    return int(commit.get("version", -1)), ClaimRecord.from_commit(commit)


class WriterClaim:
    """One run's claim on one app id of one table (see the module docstring). The sink calls these methods
    with its table, from one thread at a time; ``table`` is a fresh snapshot for each."""

    def __init__(self, app_id: str, *, ttl: float = CLAIM_TTL, clock: Callable[[], float] = time.time,
                 holder: Holder | None = None):
        if ttl < 3:
            raise ValueError("the writer claim's time to live must be at least 3 seconds")
        self.app_id = app_id
        self.txn_id = claim_txn_id(app_id)
        self.holder = holder or this_process("writer")
        self.instance = uuid.uuid4().hex[:12]
        self.ttl = ttl
        self.clock = clock
        self.table = app_id  # how messages name the table (set by the sink)
        self.since_ms: int | None = None  # when this run took the claim; None until then
        self.txn_version = 0  # the app id's transaction version as this run knows the table to hold
        self.attempted = 0  # the newest transaction version this run tried to commit
        self.renewed_at = -math.inf  # clock() when a commit last renewed the claim
        self.lost: str | None = None
        self._mine: deque[int] = deque(maxlen=64)  # expiries this run committed (a timed-out commit may land)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _record(self, expires_ms: int, action: str) -> ClaimRecord:
        assert self.since_ms is not None
        return ClaimRecord(self.app_id, self.instance, self.holder, self.since_ms, expires_ms, action)

    def _next_expiry(self, table: DeltaTable) -> int:
        return max((table.transaction_version(self.txn_id) or 0) + 1, self._now_ms() + int(self.ttl * 1000))

    def take(self, table: DeltaTable) -> None:
        """Take the claim; TableConflictError (exit 2) naming the holder if another live process has it."""
        for attempt in range(_TAKE_ATTEMPTS):
            current = table.transaction_version(self.txn_id) or 0
            held = current > self._now_ms()
            record = claim_record(table, self.app_id, current) if held else None
            if held and (record is None or not record.ended()):
                raise self._held(record, current)
            self.since_ms = self._now_ms()
            expires = self._next_expiry(table)
            try:
                self._commit_empty(table, expires, "taken")
            except CommitFailedError:  # another process committed the claim since this snapshot
                if attempt == _TAKE_ATTEMPTS - 1:
                    raise
                table.update_incremental()
                continue
            table.update_incremental()
            self.txn_version = self.attempted = table.transaction_version(self.app_id) or 0
            _LIVE_INSTANCES.add(self.instance)
            previous: dict[str, Any] = {}
            if record is not None:  # taken over from a holder that has ended (an expired claim is just free)
                previous = {"previous": record.holder.text(), "reason": "ended"}
            log.info("claim_taken", app_id=self.app_id, table=self.table, run=self.instance,
                     expires=iso_ms(expires), txn_version=self.txn_version, **previous)
            return

    def check(self, table: DeltaTable) -> None:
        """ForeignWriterError (exit 1) if another process has taken the claim since this run committed it."""
        current = table.transaction_version(self.txn_id) or 0
        if self.lost is None and current not in self._mine:
            record = claim_record(table, self.app_id, current)
            self.lost = f"{record.describe() if record else 'another process'} took it over"
            _LIVE_INSTANCES.discard(self.instance)
            log.error("claim_lost", app_id=self.app_id, table=self.table, run=self.instance, reason=self.lost)
        if self.lost is not None:
            raise ForeignWriterError(
                f"this process lost the writer claim on app id {self.app_id} of {self.table}: {self.lost}. It "
                "stops so that two processes never write with one app id (each would skip the other's commits "
                "as its own): stop the other process or give each its own --app-id (or --shard K/N); values "
                "not written are read back from the PI archive on the next start")

    def already_written(self, table: DeltaTable, txn_version: int) -> bool:
        """Whether the table holds ``txn_version`` as this run's own commit (retried after it in fact landed:
        skip it). ForeignWriterError if another writer committed with this app id since the claim was taken."""
        done = table.transaction_version(self.app_id) or 0
        if done == self.txn_version:
            return txn_version <= done
        found = transaction_writer(table, self.app_id, done)
        if done == txn_version == self.attempted \
                and (found is None or (found[1] is not None and found[1].instance == self.instance)):
            self.txn_version = done
            return True
        if found is None:
            who = "by a process this one cannot name (its commit is not among the last few hundred)"
        elif found[1] is None:
            who = (f"at table version {found[0]} by a writer without a claim (an older pistream, or another tool "
                   "using this app id)")
        else:
            who = f"at table version {found[0]} by {found[1].describe()}"
        _LIVE_INSTANCES.discard(self.instance)
        self.lost = f"transaction version {done} was written {who}"
        log.error("foreign_commit_found", app_id=self.app_id, table=self.table, run=self.instance,
                  txn_version=done, expected=self.txn_version, writer=who)
        raise ForeignWriterError(
            f"another process commits to {self.table} with this writer's app id {self.app_id}: transaction "
            f"version {done} was written {who}, while this process (run {self.instance}) expected "
            f"{self.txn_version}. It stops rather than skip values as already written: give each process its own "
            "--app-id (or --shard K/N); values not written are read back from the PI archive on the next start")

    def carry(self, table: DeltaTable, txn_version: int) -> tuple[Transaction, dict[str, str]]:
        """The claim's renewal and record for a data commit of ``txn_version`` (call ``landed`` after it)."""
        expires = self._next_expiry(table)
        self._mine.append(expires)
        self.attempted = max(self.attempted, txn_version)
        return Transaction(self.txn_id, expires), {RECORD_KEY: self._record(expires, "commit").to_json()}

    def landed(self, txn_version: int | None = None) -> None:
        """A commit carrying the claim landed (a data commit: as ``txn_version``)."""
        self.renewed_at = self.clock()
        if txn_version is not None:
            self.txn_version = txn_version

    def failed(self, expires: int) -> None:
        """A commit carrying ``expires`` certainly did not land."""
        if expires in self._mine:
            self._mine.remove(expires)

    def due(self) -> bool:
        """Renew with an empty commit: no commit renewed the claim for a third of its time to live."""
        return self.since_ms is not None and self.lost is None and self.clock() - self.renewed_at >= self.ttl / 3

    def renew(self, table: DeltaTable) -> None:
        """An empty commit with a new expiry, when due; ForeignWriterError if the claim was taken over."""
        self.check(table)
        if self.due():
            expires = self._next_expiry(table)
            self._commit_empty(table, expires, "renewed")
            self.landed()

    def release(self, table: DeltaTable) -> None:
        """Give the claim up (an expiry now), if this run still holds it: another host may take it at once."""
        _LIVE_INSTANCES.discard(self.instance)
        current = table.transaction_version(self.txn_id) or 0
        if self.since_ms is None or self.lost is not None or current not in self._mine:
            return
        self._commit_empty(table, self._now_ms(), "released")
        self.since_ms = None
        log.info("claim_released", app_id=self.app_id, table=self.table, run=self.instance)

    def _commit_empty(self, table: DeltaTable, expires: int, action: str) -> None:
        self._mine.append(expires)
        try:
            table.create_write_transaction(
                [], mode="append", schema=table.schema(),
                partition_by=table.metadata().partition_columns or None,
                commit_properties=CommitProperties(
                    app_transactions=[Transaction(self.txn_id, expires)],
                    custom_metadata={RECORD_KEY: self._record(expires, action).to_json()}))
        except CommitFailedError:
            self.failed(expires)  # certainly not in the log
            raise
        self.renewed_at = self.clock()

    def _held(self, record: ClaimRecord | None, expires: int) -> TableConflictError:
        holder = record.describe() if record else "another pistream process (not named in the last few hundred commits)"
        return TableConflictError(
            f"app id {self.app_id} of {self.table} is held by {holder}, its claim renewed until {iso_ms(expires)}: "
            "two processes with one app id would skip each other's commits. Stop that process, or give this one "
            "its own --app-id (or its own --shard K/N of the tags file); a crashed holder's claim is taken over at "
            "once on its own host, and from another host after it expires")


class ClaimedTable(Protocol):
    """The claim operations of a table handle (``sink.DeltaSink``): blocking, run in a worker thread."""

    def take_claim(self, claim: WriterClaim) -> None: ...

    def renew_claim(self) -> None: ...

    def release_claim(self) -> None: ...


async def hold(table: ClaimedTable, claim: WriterClaim, *,
               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Take the claim (its errors end the start), keep it while the data commits do not, release it when
    cancelled. A renewal that fails (storage down) is tried again; a claim taken over ends the run (exit 1)."""
    await trio.to_thread.run_sync(table.take_claim, claim)
    task_status.started()
    try:
        while True:
            await trio.sleep(max(claim.ttl / 3 - (claim.clock() - claim.renewed_at), claim.ttl / 12))
            if not claim.due():
                continue
            try:
                await trio.to_thread.run_sync(table.renew_claim, abandon_on_cancel=True)  # a stop never waits
            except ForeignWriterError:
                raise
            except PistreamError as exc:
                log.warning("claim_renewal_failed", app_id=claim.app_id, table=claim.table, error=str(exc),
                            note="tried again; the data commits check the claim before they write")
    finally:
        # Bounded: on a storage that does not answer the release cannot land either, and the stop must end
        # (an unreleased claim expires, or is taken over at once by the next start on this host).
        with trio.CancelScope(shield=True, deadline=trio.current_time() + RELEASE_SECONDS):
            await trio.to_thread.run_sync(_release_quietly, table, claim, abandon_on_cancel=True)


def _release_quietly(table: ClaimedTable, claim: WriterClaim) -> None:
    try:
        table.release_claim()
    except Exception as exc:  # noqa: BLE001 - an unreleased claim expires, or is taken over on this host at once
        log.warning("claim_release_failed", app_id=claim.app_id, table=claim.table, error=str(exc))
    finally:
        _LIVE_INSTANCES.discard(claim.instance)  # a later run in this process may take it over at once
