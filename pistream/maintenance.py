"""Table maintenance beside the appenders: compaction, Z-order, vacuum, statistics, and the lease that lets
exactly one maintainer at a time rewrite a table.

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

Vacuum is always ``full`` (a lite vacuum misses tombstones dropped from checkpoints). A full vacuum also
deletes files no commit references yet by their age, and pistream writes a big batch's spilled parts to
data files before the commit that adds them (a storage outage can delay that commit): the retention must
exceed any such delay. It defaults to the table's ``delta.deletedFileRetentionDuration`` (7 days) and is
refused under 24 hours without ``force``.

Only this module and the sink import deltalake. Every call here blocks: the scheduler runs them in threads.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import structlog
import trio
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from .errors import ConfigError, MaintenanceError, PistreamError
from .schema import PARTITION_COLUMN
from .sink import effective_storage_options, redact_text, redact_uri, secret_values, table_files

log = structlog.get_logger(__name__)

StorageOptions = Mapping[str, str] | Callable[[], Mapping[str, str]]

# Never a writer's app id: a writer's default is pistream-HOSTNAME, and no host name has a colon (a host named
# "maintenance" would have made "pistream-maintenance" both).
LEASE_APP_ID = "pistream:maintenance"
LEASE_TTL = 30 * 60.0  # seconds; renewed every third of it while held
ZORDER_COLUMNS = ("tag_webid", "timestamp")
MAX_SPILL_SIZE = 256 << 20  # z-order of 10 M rows: 1.56 GB RSS unbounded, ~450 MB with this bound
SMALL_FILE_BYTES = 16 << 20  # what stats counts as a small file
RETENTION_FLOOR_HOURS = 24
DEFAULT_RETENTION_HOURS = 7 * 24  # Delta's default delta.deletedFileRetentionDuration
RUN_KEY = "pistream.maintenance_run"  # commitInfo key that finds an optimize's own commit
_HOLDER_SEARCH = 200  # commits searched for the lease holder's name (the expiry needs no search)
# delta-rs names the files of one optimize run part-NNNNN-<run uuid>-c000.<codec>.parquet; pistream's
# appender gives each file a uuid of its own.
_RUN_OF_FILE = re.compile(r"part-\d+-([0-9a-fA-F-]{36})-c\d+")
_INTERVAL = re.compile(r"^\s*(?:interval\s+)?(\d+(?:\.\d+)?)\s*(week|day|hour|minute|second)s?\s*$", re.I)
_UNIT_HOURS = {"week": 168.0, "day": 24.0, "hour": 1.0, "minute": 1 / 60, "second": 1 / 3600}


def current_options(uri: str, storage_options: StorageOptions | None) -> dict[str, str]:
    """The options to reach the table now: a callable is asked each time (credentials are refreshed
    elsewhere), with pistream's timeouts for object stores."""
    options = storage_options() if callable(storage_options) else storage_options
    return effective_storage_options(uri, options)


def _open(uri: str, options: Mapping[str, str], version: int | None = None) -> DeltaTable:
    return DeltaTable(uri, version=version, storage_options=dict(options) or None)


@contextmanager
def _translated(action: str, uri: str, options: Mapping[str, str]) -> Iterator[None]:
    """deltalake's and Arrow's errors as pistream's, on one line, with option values masked."""
    try:
        yield
    except PistreamError:
        raise
    except TableNotFoundError:
        raise ConfigError(f"no Delta table at {redact_uri(uri)}: check --table and the storage options") from None
    except (DeltaError, OSError, pa.ArrowException) as exc:
        raw = " ".join(str(exc).split())
        text = redact_text(raw, secret_values(options))
        raise MaintenanceError(
            f"{action} of {redact_uri(uri)} failed: {text}; check that the storage is reachable and the "
            "credentials may write, then run it again") from (exc if text == raw else None)


def _iso_ms(millis: int) -> str:
    return datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="seconds")


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
        with self._lock, _translated("taking the maintenance lease", self.uri, options):
            table = _open(self.uri, options)
            current = table.transaction_version(LEASE_APP_ID) or 0
            if current > self._now_ms():
                raise self._busy(table, current)
            version = max(current + 1, self._now_ms() + int(self.ttl * 1000))
            try:
                self._commit(table, version, "acquired")
            except CommitFailedError:  # another maintainer committed the lease since our snapshot
                table = _open(self.uri, options)
                current = table.transaction_version(LEASE_APP_ID) or 0
                if current > self._now_ms():
                    raise self._busy(table, current) from None
                raise
            self.expires_ms, self.lost = version, None
        log.info("lease_acquired", table=self.display, holder=self.holder, expires=_iso_ms(version))
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
                with _translated("releasing the maintenance lease", self.uri, options):
                    table = _open(self.uri, options)
                    if self.lost is None and table.transaction_version(LEASE_APP_ID) in self._mine:
                        self._commit(table, self._now_ms(), "released")
                        log.info("lease_released", table=self.display, holder=self.holder)
            except Exception as exc:  # noqa: BLE001 - the lease expires by itself
                log.warning("lease_release_failed", table=self.display, error=str(exc),
                            expires=_iso_ms(self.expires_ms))
            finally:
                self.expires_ms = None

    def open_table(self) -> DeltaTable:
        """A fresh snapshot of the table in which this lease is still held, for at least a third of its
        time to live; MaintenanceError if it was lost or could not be renewed."""
        options = current_options(self.uri, self.storage_options)
        with self._lock:
            if self.expires_ms is None:
                raise MaintenanceError(f"maintenance of {self.display} without its lease: acquire it first")
            with _translated("reading the maintenance lease", self.uri, options):
                table = _open(self.uri, options)
            current = table.transaction_version(LEASE_APP_ID) or 0
            if self.lost is None and current not in self._mine:
                self.lost = f"another maintainer took it (now held until {_iso_ms(current)})"
            if self.lost is not None:
                raise MaintenanceError(f"lost the maintenance lease of {self.display}: {self.lost}; "
                                       "the next step was not started")
            self.expires_ms = current
            if current - self._now_ms() < self.ttl * 1000 / 3:
                raise MaintenanceError(
                    f"the maintenance lease of {self.display} expires at {_iso_ms(current)} and could not be "
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
                                     "pistream.lease_expires": _iso_ms(version)}))
        except CommitFailedError:
            self._mine.discard(version)  # certainly not in the log
            raise

    def _keep(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._renew()
            except Exception as exc:  # noqa: BLE001 - tried again at the next tick; the lease holds till then
                log.warning("lease_renewal_failed", table=self.display, error=str(exc),
                            expires=_iso_ms(self.expires_ms or 0))

    def _renew(self) -> None:
        options = current_options(self.uri, self.storage_options)
        with self._lock, _translated("renewing the maintenance lease", self.uri, options):
            if self.lost is not None or self.expires_ms is None:
                return
            table = _open(self.uri, options)
            current = table.transaction_version(LEASE_APP_ID) or 0
            if current not in self._mine:
                self.lost = f"another maintainer took it (now held until {_iso_ms(current)})"
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
            f"{holder} holds the maintenance lease of {self.display} until {_iso_ms(current)} (it is "
            "optimizing or vacuuming the table): try again after that; a crashed holder's lease just expires",
            held_until=datetime.fromtimestamp(current / 1000, UTC))


def lease_holder(table: DeltaTable, expires_ms: int | None = None) -> str | None:
    """Who holds the table's lease (that expires at ``expires_ms``), from the commit that took or renewed it
    if it is among the last few hundred (the lease is renewed every third of its time to live)."""
    expires = _iso_ms(expires_ms) if expires_ms is not None else None
    try:
        for commit in table.history(limit=_HOLDER_SEARCH):
            if "pistream.lease_action" in commit and expires in (None, commit.get("pistream.lease_expires")):
                return str(commit["pistream.lease_holder"])
    except (DeltaError, OSError):
        pass
    return None


@contextmanager
def _leased(lease: Lease | None, uri: str, storage_options: StorageOptions | None) -> Iterator[Lease]:
    """The caller's lease, or one taken (and released) for this call."""
    if lease is not None:
        yield lease
        return
    with Lease(uri, storage_options) as own:
        yield own


# -- optimize --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OptimizeResult:
    operation: str  # "compact" or "z_order"
    partition: date | None  # None: the whole table
    files_removed: int
    files_added: int
    bytes_removed: int
    bytes_added: int
    rows: int  # rows in the files written (checked: the table's row count did not change)
    table_version: int | None  # of the optimize commit; None when there was nothing to rewrite
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "partition": self.partition.isoformat() if self.partition else None}


def compact(uri: str, storage_options: StorageOptions | None = None, partition: date | None = None, *,
            target_size: int | None = None, lease: Lease | None = None,
            max_concurrent_tasks: int | None = None) -> OptimizeResult:
    """Merge small files (of ``partition``, or of the whole table) into files of about ``target_size``
    (the table's ``delta.targetFileSize``, else 100 MiB)."""
    def run(table: DeltaTable, filters: Any, properties: CommitProperties) -> dict[str, Any]:
        return table.optimize.compact(partition_filters=filters, target_size=target_size,
                                      max_concurrent_tasks=max_concurrent_tasks, commit_properties=properties)

    result = _optimize("compact", uri, storage_options, partition, lease, run)
    log.info("table_compacted", table=redact_uri(uri), **_logged(result))
    return result


def z_order(uri: str, storage_options: StorageOptions | None, partition: date, *,
            max_spill_size: int = MAX_SPILL_SIZE, target_size: int | None = None, lease: Lease | None = None,
            columns: tuple[str, ...] = ZORDER_COLUMNS, max_concurrent_tasks: int | None = None
            ) -> OptimizeResult:
    """Rewrite one partition clustered by tag and time, so that queries for a few tags read few files.
    Always with a spill bound: unbounded, the sort holds the partition in memory."""
    if max_spill_size <= 0:
        raise ConfigError("z-order needs a memory bound (max_spill_size > 0): unbounded, Z-ordering 10 M rows "
                          f"took 1.56 GB of memory; use the default {MAX_SPILL_SIZE >> 20} MiB")

    def run(table: DeltaTable, filters: Any, properties: CommitProperties) -> dict[str, Any]:
        return table.optimize.z_order(list(columns), partition_filters=filters, target_size=target_size,
                                      max_spill_size=max_spill_size, max_concurrent_tasks=max_concurrent_tasks,
                                      commit_properties=properties)

    result = _optimize("z_order", uri, storage_options, partition, lease, run)
    log.info("partition_zordered", table=redact_uri(uri), **_logged(result))
    return result


def _logged(result: OptimizeResult) -> dict[str, Any]:
    return {k: v for k, v in result.to_dict().items() if k != "operation"}


def _optimize(operation: str, uri: str, storage_options: StorageOptions | None, partition: date | None,
              lease: Lease | None, run: Callable[[DeltaTable, Any, CommitProperties], dict[str, Any]]
              ) -> OptimizeResult:
    started = time.perf_counter()
    run_id = uuid.uuid4().hex
    filters = [(PARTITION_COLUMN, "=", partition.isoformat())] if partition is not None else None
    with _leased(lease, uri, storage_options) as held:
        table = held.open_table()  # fresh, just before the optimize: it plans from this snapshot
        options = current_options(uri, storage_options)
        with _translated(operation.replace("_", "-"), uri, options):
            read_version = table.version()
            metrics = run(table, filters, CommitProperties(
                custom_metadata={RUN_KEY: run_id, "pistream.lease_holder": held.holder}))
            removed, added = json.loads(metrics["filesRemoved"]), json.loads(metrics["filesAdded"])
            version, rows = None, 0
            if metrics["numFilesRemoved"] or metrics["numFilesAdded"]:
                version, rows = _check_optimize_commit(uri, options, read_version, run_id)
    return OptimizeResult(operation, partition, int(metrics["numFilesRemoved"]), int(metrics["numFilesAdded"]),
                          int(removed.get("totalSize", 0)), int(added.get("totalSize", 0)), rows, version,
                          round(time.perf_counter() - started, 3))


def _check_optimize_commit(uri: str, options: Mapping[str, str], read_version: int, run_id: str
                           ) -> tuple[int, int]:
    """Find the optimize's commit (after appenders' commits, possibly) and check that it carries no app
    transaction and leaves the table's row count as it was; returns its version and the rows it wrote."""
    files = table_files(uri, options)
    latest = _open(uri, options).version()
    for version in range(read_version + 1, latest + 1):
        with files.open_input_stream(f"_delta_log/{version:020d}.json") as stream:
            actions = [json.loads(line) for line in stream.read().decode().splitlines() if line.strip()]
        info: dict[str, Any] = next((a["commitInfo"] for a in actions if "commitInfo" in a), {})
        if info.get(RUN_KEY) == run_id:
            break
    else:
        raise MaintenanceError(f"the optimize of {redact_uri(uri)} reported a commit that is not in the log "
                               f"(versions {read_version + 1}-{latest}): check the table with `pistream stats`")
    apps = sorted(a["txn"]["appId"] for a in actions if "txn" in a)
    before = _row_count(_open(uri, options, version - 1))
    after = _row_count(_open(uri, options, version))
    if apps or (before is not None and after is not None and before != after):
        message = (f"optimize commit {version} of {redact_uri(uri)} changed the table: rows {before} -> {after}"
                   f"{', app transactions ' + ', '.join(apps) if apps else ''}. Rows are duplicated if another "
                   "optimize ran at the same time without pistream's lease (Spark/Databricks OPTIMIZE, an older "
                   f"pistream): stop it, then remove the files commit {version} added")
        log.error("optimize_check_failed", table=redact_uri(uri), version=version, rows_before=before,
                  rows_after=after, app_transactions=apps)
        raise MaintenanceError(message)
    if before is None or after is None:
        log.warning("optimize_unchecked", table=redact_uri(uri), version=version,
                    note="files without row counts in their statistics")
    rows = sum(json.loads(a["add"]["stats"] or "{}").get("numRecords", 0) for a in actions if "add" in a)
    return version, rows


def _row_count(table: DeltaTable) -> int | None:
    """Sum of the add actions' ``num_records`` (no data read); None if some file has no statistics."""
    counts = pa.table(table.get_add_actions(flatten=True)).column("num_records")
    return None if counts.null_count else int(pc.sum(counts).as_py() or 0)


def _partition_dates(adds: pa.Table) -> pa.ChunkedArray | None:
    name = f"partition.{PARTITION_COLUMN}"
    return adds.column(name) if name in adds.column_names else None


def zorder_candidates(uri: str, storage_options: StorageOptions | None = None, *, before: date | None = None
                      ) -> list[date]:
    """Partitions (older than ``before``) to Z-order, from the log alone: those with more than one file whose
    files are not all from one optimize run. A Z-ordered partition's files come from one run; a late value
    adds a file of another and the partition is Z-ordered again. (A partition rewritten whole by one
    compaction run counts as done, too.)"""
    options = current_options(uri, storage_options)
    with _translated("reading the table log", uri, options):
        adds = pa.table(_open(uri, options).get_add_actions(flatten=True))
    dates = _partition_dates(adds)
    if dates is None:
        return []
    runs: dict[date, set[str]] = {}
    files: dict[date, int] = {}
    for day, path in zip(dates.to_pylist(), adds.column("path").to_pylist(), strict=True):
        if day is None or (before is not None and day >= before):
            continue
        match = _RUN_OF_FILE.search(path)
        runs.setdefault(day, set()).add(match.group(1) if match else path)
        files[day] = files.get(day, 0) + 1
    return sorted(day for day, n in files.items() if n > 1 and len(runs[day]) > 1)


# -- vacuum ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VacuumResult:
    files: list[str]  # deleted, or that would be deleted with dry_run
    retention_hours: int
    dry_run: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "files_deleted": 0 if self.dry_run else len(self.files)}


def retention_of(table: DeltaTable) -> int:
    """The table's ``delta.deletedFileRetentionDuration`` in whole hours (rounded up)."""
    text = table.metadata().configuration.get("delta.deletedFileRetentionDuration")
    match = _INTERVAL.match(text or "")
    if not match:
        if text:
            log.warning("retention_unreadable", value=text, assumed_hours=DEFAULT_RETENTION_HOURS)
        return DEFAULT_RETENTION_HOURS
    return math.ceil(float(match.group(1)) * _UNIT_HOURS[match.group(2).lower()])


def vacuum(uri: str, storage_options: StorageOptions | None = None, retention_hours: int | None = None,
           dry_run: bool = False, force: bool = False, *, lease: Lease | None = None) -> VacuumResult:
    """Delete the files no current table version references that are older than the retention (a full
    vacuum). ``dry_run`` lists them. Under 24 hours only with ``force`` or as a dry run (see the module
    docstring); the table's own retention property is held to the same floor."""
    started = time.perf_counter()
    options = current_options(uri, storage_options)
    if retention_hours is not None and retention_hours < 0:
        raise ConfigError(f"--retention-hours {retention_hours} is negative")
    if retention_hours is not None and not (dry_run or force):
        _check_retention(retention_hours, "--retention-hours")
    holding = _no_lease() if dry_run else _leased(lease, uri, storage_options)  # a dry run deletes nothing
    with holding as held, _translated("vacuum", uri, options):
        table = held.open_table() if held is not None else _open(uri, options)
        hours = retention_hours if retention_hours is not None else retention_of(table)
        if not (dry_run or force):
            _check_retention(hours, "the table's delta.deletedFileRetentionDuration")
        files = table.vacuum(retention_hours=hours, dry_run=dry_run, enforce_retention_duration=False, full=True)
    result = VacuumResult(sorted(files), hours, dry_run, round(time.perf_counter() - started, 3))
    log.info("table_vacuumed", table=redact_uri(uri), files=len(files), retention_hours=hours, dry_run=dry_run,
             seconds=result.seconds)
    return result


def _check_retention(hours: int, source: str) -> None:
    if hours < RETENTION_FLOOR_HOURS:
        raise ConfigError(
            f"{source} {hours} h is under {RETENTION_FLOOR_HOURS} h: a full vacuum deletes data files pistream "
            "wrote ahead of a commit still to come (a big batch's spilled parts wait for their commit through a "
            "storage outage), and that commit then breaks every read of the table; keep "
            f"{RETENTION_FLOOR_HOURS} hours or more, or pass --force when no pistream writer can be behind")


@contextmanager
def _no_lease() -> Iterator[Lease | None]:
    yield None


# -- statistics ------------------------------------------------------------------------------------------

@dataclass
class PartitionStats:
    partition: date | None
    files: int
    small_files: int
    rows: int
    bytes: int
    first_timestamp: datetime | None  # from the files' statistics (to the millisecond)
    last_timestamp: datetime | None
    distinct_tags: int | None = None  # with scan=True only
    good_share: float | None = None  # share of rows with the good flag, with scan=True only


@dataclass
class TableStats:
    table: str
    version: int
    last_checkpoint: int | None
    commits_since_checkpoint: int
    files: int
    small_files: int
    rows: int
    bytes: int
    files_without_stats: int
    partitions: list[PartitionStats] = field(default_factory=list)
    distinct_tags: int | None = None
    good_share: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            return value.isoformat() if isinstance(value, date | datetime) else value

        data = {k: plain(v) for k, v in asdict(self).items() if k != "partitions"}
        data["partitions"] = [{k: plain(v) for k, v in asdict(p).items()} for p in self.partitions]
        return data


def table_stats(uri: str, storage_options: StorageOptions | None = None, *, scan: bool = False,
                small_file_bytes: int = SMALL_FILE_BYTES) -> TableStats:
    """What the log says about the table, without reading data: its size, files, partitions and how far
    its last checkpoint is. ``scan`` also reads the ``tag_webid`` and ``good`` columns for distinct tags and
    the share of good values, which the files' statistics cannot give exactly."""
    started = time.perf_counter()
    options = current_options(uri, storage_options)
    with _translated("reading the table's statistics", uri, options):
        table = _open(uri, options)
        version = table.version()
        adds = pa.table(table.get_add_actions(flatten=True))
        checkpoint = _last_checkpoint(uri, options)
        partitions = _partition_stats(adds, small_file_bytes)
        stats = TableStats(
            table=redact_uri(uri), version=version, last_checkpoint=checkpoint,
            commits_since_checkpoint=version - checkpoint if checkpoint is not None else version + 1,
            files=adds.num_rows, small_files=sum(p.small_files for p in partitions),
            rows=sum(p.rows for p in partitions), bytes=sum(p.bytes for p in partitions),
            files_without_stats=adds.column("num_records").null_count, partitions=partitions)
        if scan:
            _scan(table, stats)
    stats.seconds = round(time.perf_counter() - started, 3)
    log.info("table_stats_read", table=stats.table, files=stats.files, rows=stats.rows, scan=scan,
             seconds=stats.seconds)
    return stats


def _partition_stats(adds: pa.Table, small_file_bytes: int) -> list[PartitionStats]:
    dates = _partition_dates(adds)
    if dates is None:
        dates = pa.chunked_array([pa.nulls(adds.num_rows, pa.date32())])
    columns = {
        "partition": dates,
        "files": pa.repeat(1, adds.num_rows),
        "rows": pc.fill_null(adds.column("num_records"), 0),
        "bytes": adds.column("size_bytes"),
        "small": pc.cast(pc.less(adds.column("size_bytes"), small_file_bytes), pa.int64()),
    }
    for name, bound in (("first", "min.timestamp"), ("last", "max.timestamp")):
        columns[name] = (adds.column(bound) if bound in adds.column_names
                         else pa.nulls(adds.num_rows, pa.timestamp("us", "UTC")))
    grouped = pa.table(columns).group_by("partition").aggregate([
        ("files", "sum"), ("small", "sum"), ("rows", "sum"), ("bytes", "sum"), ("first", "min"), ("last", "max")])
    grouped = grouped.sort_by([("partition", "ascending")])
    return [PartitionStats(row["partition"], row["files_sum"], row["small_sum"], row["rows_sum"], row["bytes_sum"],
                           row["first_min"], row["last_max"]) for row in grouped.to_pylist()]


def _last_checkpoint(uri: str, options: Mapping[str, str]) -> int | None:
    try:
        with table_files(uri, options).open_input_stream("_delta_log/_last_checkpoint") as stream:
            return int(json.loads(stream.read())["version"])
    except FileNotFoundError:
        return None


def _scan(table: DeltaTable, stats: TableStats) -> None:
    """Distinct tags and good share, per partition and in all, reading two columns one partition at a time."""
    dataset = table.to_pyarrow_dataset()
    all_tags: list[pa.Array] = []
    good_total = 0
    for part in stats.partitions:
        where = (ds.field(PARTITION_COLUMN) == pa.scalar(part.partition, pa.date32())
                 if part.partition is not None else None)
        tags: list[pa.Array] = []
        good = rows = 0
        for batch in dataset.to_batches(columns=["tag_webid", "good"], filter=where):
            tags = _merge_distinct([*tags, pc.unique(_plain(batch.column(0)))], len(tags) >= 64)
            good += int(pc.sum(batch.column(1)).as_py() or 0)
            rows += batch.num_rows
        merged = _merge_distinct(tags, True)
        part.distinct_tags = sum(len(a) for a in merged)
        part.good_share = round(good / rows, 6) if rows else None
        all_tags = _merge_distinct([*all_tags, *merged], True)
        good_total += good
    total_rows = sum(p.rows for p in stats.partitions)
    stats.distinct_tags = sum(len(a) for a in all_tags)
    stats.good_share = round(good_total / total_rows, 6) if total_rows else None


def _plain(values: pa.Array) -> pa.Array:
    return values.dictionary_decode() if pa.types.is_dictionary(values.type) else values.cast(pa.string())


def _merge_distinct(arrays: list[pa.Array], merge: bool) -> list[pa.Array]:
    if not merge or len(arrays) < 2:
        return arrays
    return [pc.unique(pa.concat_arrays(arrays))]


# -- the scheduler ---------------------------------------------------------------------------------------

def utc_today() -> date:
    return datetime.now(UTC).date()


@dataclass
class SchedulerStats:
    passes: int = 0  # passes that held the lease and ran their steps
    skipped: int = 0  # passes that could not take the lease (another maintainer holds it, storage failed)
    failed_steps: int = 0
    compactions: int = 0
    zorders: int = 0
    vacuums: int = 0


class MaintenanceScheduler:
    """Every ``interval`` seconds, under the lease: compact today's (UTC) partition, Z-order each closed
    partition that needs it (``zorder_candidates``), and vacuum once every ``vacuum_interval`` (the first
    pass vacuums). Each step runs in a worker thread, beside the appends, which it never blocks. A failing
    step is logged and the pass goes on (the next pass retries it); nothing here stops the pipeline.

    Cancellation (the pipeline's shutdown) takes effect between steps: a step in progress (one compaction,
    one partition's Z-order, the vacuum) runs to its end and commits, since delta-rs cannot stop an
    optimize midway and an abandoned thread would commit after the pipeline believed it had stopped (or be
    cut off by the process exit). A shutdown during a big partition's Z-order therefore waits for it
    (minutes, at worst); then the lease is released (shielded) and ``run`` returns."""

    def __init__(self, uri: str, storage_options: StorageOptions | None = None, *, interval: float = 600.0,
                 vacuum_interval: float = 86_400.0, retention_hours: int | None = None,
                 target_size: int | None = None, max_spill_size: int = MAX_SPILL_SIZE,
                 lease_ttl: float = LEASE_TTL, max_concurrent_tasks: int | None = None,
                 today: Callable[[], date] = utc_today, holder: str | None = None):
        if interval <= 0 or vacuum_interval <= 0:
            raise ConfigError("maintenance intervals must be positive")
        if retention_hours is not None and retention_hours < RETENTION_FLOOR_HOURS:
            raise ConfigError(f"scheduled vacuum keeps at least {RETENTION_FLOOR_HOURS} hours of removed files")
        self.uri = uri
        self.storage_options = storage_options
        self.interval = interval
        self.vacuum_interval = vacuum_interval
        self.retention_hours = retention_hours
        self.target_size = target_size
        self.max_spill_size = max_spill_size
        self.lease_ttl = lease_ttl
        self.max_concurrent_tasks = max_concurrent_tasks
        self.today = today
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:scheduler"
        self.stats = SchedulerStats()
        self._next_vacuum = -math.inf

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            await self.run_once()

    async def run_once(self) -> None:
        """One pass; never raises but Cancelled."""
        started = trio.current_time()
        lease = Lease(self.uri, self.storage_options, holder=self.holder, ttl=self.lease_ttl)
        try:
            await trio.to_thread.run_sync(lease.acquire)
        except Exception as exc:  # noqa: BLE001 - maintenance never stops the pipeline
            self.stats.skipped += 1
            if isinstance(exc, MaintenanceError) and exc.held_until is not None:
                log.info("maintenance_skipped", table=lease.display, reason=str(exc))
            else:
                self._failed("lease", lease, exc)
            return
        failed = self.stats.failed_steps
        try:
            await self._steps(lease)
        finally:
            with trio.CancelScope(shield=True):  # an empty commit; a lease left behind would block for a TTL
                await trio.to_thread.run_sync(lease.release)
        self.stats.passes += 1
        log.info("maintenance_finished", table=lease.display, failed_steps=self.stats.failed_steps - failed,
                 seconds=round(trio.current_time() - started, 3))

    async def _steps(self, lease: Lease) -> None:
        today = self.today()
        common: dict[str, Any] = {"lease": lease, "target_size": self.target_size,
                                  "max_concurrent_tasks": self.max_concurrent_tasks}
        if await self._step("compact", lease, compact, self.uri, self.storage_options, today, **common):
            self.stats.compactions += 1
        closed = await self._step("plan", lease, zorder_candidates, self.uri, self.storage_options, before=today)
        for partition in closed or ():
            if lease.lost is not None:
                return
            if await self._step("z_order", lease, z_order, self.uri, self.storage_options, partition,
                                max_spill_size=self.max_spill_size, **common):
                self.stats.zorders += 1
        if lease.lost is None and trio.current_time() >= self._next_vacuum:
            if await self._step("vacuum", lease, vacuum, self.uri, self.storage_options, self.retention_hours,
                                lease=lease):
                self.stats.vacuums += 1
                self._next_vacuum = trio.current_time() + self.vacuum_interval

    async def _step(self, name: str, held: Lease, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one blocking step in a thread (not abandoned on cancel: see the class docstring); its result,
        or None if it failed (logged)."""
        try:
            return await trio.to_thread.run_sync(functools.partial(function, *args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - maintenance never stops the pipeline
            self.stats.failed_steps += 1
            self._failed(name, held, exc)
            return None

    def _failed(self, step: str, held: Lease, exc: Exception) -> None:
        fields: dict[str, Any] = {"table": held.display, "step": step, "error": str(exc), "retry_in": self.interval}
        if isinstance(exc, PistreamError):
            log.warning("maintenance_failed", **fields)
        else:  # a bug: with its traceback
            log.error("maintenance_failed", **fields, exc_info=exc)
