"""The Delta Lake sink: one writer's idempotent commits to one table.

Every commit carries an app transaction ``(app_id, version)``. delta-rs does not skip a version already in
the log, so ``commit`` checks first: a commit retried after a crash or a timeout that in fact succeeded is
not written twice. Calls are blocking; the pipeline runs them in a worker thread (writes release the GIL).

A commit writes its Parquet files with pyarrow (``datafiles``) through delta-rs's own object store (the same
storage options and credentials) and then commits their add actions with the app transaction in one log
entry. ``write_deltalake`` did the same in one call but held 3-4x the batch in memory while writing (a 1 M
row batch of 133 MB: +360-500 MB RSS, against +50-80 MB this way).

Under a writer claim (``claim``, taken by the pipeline) every commit first checks that the claim is still this
run's and that no other process committed with the app id since; the commit renews the claim. A commit that
loses the race for its log version to other commits (maintenance, other writers: delta-rs gives up after 15)
is tried again with the same transaction version and the same data files, after a short jittered wait.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import structlog
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError
from deltalake.transaction import AddAction, RemoveAction

from ..backoff import Backoff
from ..errors import SinkError, TableConflictError
from ..stream.schema import EVENT_KEY, PARTITION_COLUMN, TABLE_COMMENT, TABLE_PROPERTIES, TABLE_SCHEMA
from .claim import WriterClaim
from .datafiles import write_partitions
from .storage import (
    ANSI_ESCAPE,
    MIN_MASKED,
    effective_storage_options,
    redact_text,
    redact_uri,
    secret_values,
    table_files,
)

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Rounds of delta-rs's own commit attempts (15 each) one commit gets when other commits keep taking its log
# version, with a jittered wait between rounds; after that the commit writer's backoff takes over.
COMMIT_ROUNDS = 8


def _utc_date(us: int) -> date:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)).date()


class CredentialSource(Protocol):
    """Storage options that change over time (Unity Catalog's vended credentials: ``target.CatalogTarget``)."""

    generation: int  # changes whenever storage_options() starts giving other credentials

    def storage_options(self) -> dict[str, str]: ...

    def invalidate(self) -> None: ...


# What a storage error says when the credentials were refused (expired, revoked): worth one retry with
# freshly vended ones. S3: ExpiredToken, InvalidAccessKeyId, AccessDenied, 403; Azure: AuthenticationFailed.
_CREDENTIAL_REFUSED = re.compile(
    r"(?i)expired|InvalidAccessKeyId|InvalidToken|AccessDenied|Access Denied|Forbidden|\b40[13]\b|"
    r"AuthenticationFailed|AuthorizationFailure|SignatureDoesNotMatch|Unauthorized")


@dataclass(frozen=True)
class CommitResult:
    table_version: int
    txn_version: int
    rows: int
    skipped: bool  # the transaction version was already in the table: nothing written


class DeltaSink:
    """One writer's handle on one Delta table, identified in the log by ``app_id``.

    With ``credentials`` (a Unity Catalog table), the storage options come from there: when they change
    (credentials re-vended before they expire) the table is opened again between commits, and an operation
    the storage refuses for its credentials is tried once more with freshly vended ones."""

    def __init__(self, uri: str, app_id: str, storage_options: Mapping[str, str] | None = None, *,
                 credentials: CredentialSource | None = None, name: str | None = None):
        self.uri = uri
        self.app_id = app_id
        self.name = name  # how the user named the table (a Unity Catalog name), for messages
        self.credentials = credentials
        self._generation = credentials.generation if credentials is not None else 0
        options = credentials.storage_options() if credentials is not None else storage_options
        self.storage_options = effective_storage_options(uri, options)
        self._retired_secrets: list[str] = []  # of the credentials before the last refresh (late errors)
        self._table: DeltaTable | None = None
        self._files: pafs.FileSystem | None = None  # the table's root, for its data files (table_files)
        self.claim: WriterClaim | None = None  # this run's writer claim on app_id, once taken
        self._lock = threading.RLock()  # the claim keeper's renewals run beside the commit writer's calls

    @property
    def display_uri(self) -> str:
        return f"{self.name} ({redact_uri(self.uri)})" if self.name else redact_uri(self.uri)

    def _describe(self, exc: BaseException) -> tuple[str, BaseException | None]:
        """The text of a deltalake error on one line with every option value masked, and the exception to
        chain as the cause: ``exc`` itself only if its text held no secret (a traceback would print it)."""
        raw = " ".join(ANSI_ESCAPE.sub("", str(exc)).split())
        text = redact_text(raw, self._secrets())
        return text, (exc if text == raw else None)

    def _secrets(self) -> list[str]:
        secrets = secret_values(self.storage_options) + self._retired_secrets
        query = self.uri.partition("?")[2]
        return sorted([*secrets, query], key=len, reverse=True) if len(query) >= MIN_MASKED else secrets

    def open(self) -> None:
        """Open the table, creating it with the bronze schema if it does not exist; check its schema."""
        try:
            try:
                self._table = DeltaTable(self.uri, storage_options=self.storage_options or None)
            except TableNotFoundError:
                self._table = DeltaTable.create(
                    self.uri,
                    TABLE_SCHEMA,
                    mode="ignore",
                    partition_by=[PARTITION_COLUMN],
                    name="pistream_bronze",
                    description=TABLE_COMMENT,
                    configuration=TABLE_PROPERTIES,
                    storage_options=self.storage_options or None,
                )
                log.info("table_created", table=self.display_uri)
            self._files = table_files(self.uri, self.storage_options)
        except (DeltaError, OSError) as exc:
            text, cause = self._describe(exc)
            raise SinkError(
                f"cannot open Delta table {self.display_uri}: {text}; check --table and the storage options"
            ) from cause
        self._check_schema()

    def reopen(self, storage_options: Mapping[str, str] | None = None) -> None:
        """Open again, e.g. with refreshed cloud credentials; the transaction state lives in the table."""
        if storage_options is not None:
            self._retired_secrets = secret_values(self.storage_options, environ={})
            self.storage_options = effective_storage_options(self.uri, storage_options)
        self._table = self._files = None
        self.open()

    def current_storage_options(self) -> dict[str, str]:
        """The options to reach the table now (fresh credentials for a Unity Catalog table)."""
        return self.credentials.storage_options() if self.credentials is not None else dict(self.storage_options)

    def _refresh(self) -> None:
        """Between operations: if the credentials were re-vended, open the table with the new ones."""
        if self.credentials is None:
            return
        options = self.credentials.storage_options()
        if self.credentials.generation != self._generation:
            self._generation = self.credentials.generation
            log.info("credentials_swapped", table=self.display_uri, generation=self._generation)
            self.reopen(options)

    def _with_credentials(self, operation: Callable[[], T]) -> T:
        """Run ``operation`` with fresh credentials; if the storage refuses them, once more with new ones."""
        with self._lock:
            self._refresh()
            try:
                return operation()
            except SinkError as exc:
                if self.credentials is None or not _CREDENTIAL_REFUSED.search(str(exc)):
                    raise
                log.warning("credentials_refused", table=self.display_uri, error=str(exc), note="vending new ones")
                self.credentials.invalidate()
                self._refresh()
                return operation()

    def _check_schema(self) -> None:
        assert self._table is not None
        have = pa.schema(self._table.schema().to_arrow())
        missing = [f.name for f in TABLE_SCHEMA if f.name not in have.names]
        wrong = [
            f"{f.name} ({have.field(f.name).type} instead of {f.type})"
            for f in TABLE_SCHEMA
            if f.name in have.names and not have.field(f.name).type.equals(f.type)
        ]
        if missing or wrong:
            detail = "; ".join(filter(None, [
                f"missing columns {', '.join(missing)}" if missing else "",
                f"wrong types {', '.join(wrong)}" if wrong else "",
            ]))
            raise TableConflictError(
                f"table {self.display_uri} is not a pistream table ({detail}): "
                "point --table at a new location or at a table pistream created"
            )
        partitions = self._table.metadata().partition_columns
        if partitions != [PARTITION_COLUMN]:
            raise TableConflictError(
                f"table {self.display_uri} is partitioned by {partitions or 'nothing'}, not "
                f"{PARTITION_COLUMN}: point --table at a new location or at a table pistream created"
            )

    @property
    def table(self) -> DeltaTable:
        if self._table is None:
            self.open()
        assert self._table is not None
        return self._table

    def last_txn_version(self) -> int:
        """The newest transaction version this writer committed, 0 if none (re-read from the log)."""
        return self._with_credentials(self._last_txn_version)

    def read_event_keys(self, since: date | None = None, until: date | None = None,
                        webids: Collection[str] | None = None) -> pa.Table:
        """The event-key columns of the table (from ``since`` to ``until``, by partition; of ``webids``
        only, if given), to rebuild floors or to know what a gap read again already has."""
        return self._with_credentials(lambda: self._read_event_keys(since, until, webids))

    def first_event_times(self, webids: Collection[str], start_us: int, end_us: int) -> dict[str, int]:
        """Each tag's earliest event time in the table within ``start_us..end_us`` (tags without one are
        left out): read partition by partition from the oldest, two columns, batch by batch, until every
        tag is found, so a table whose tags all begin early in the range costs a day's partition or so."""
        return self._with_credentials(lambda: self._first_event_times(webids, start_us, end_us))

    def _first_event_times(self, webids: Collection[str], start_us: int, end_us: int) -> dict[str, int]:
        table = self.table
        wanted = pa.array(sorted(webids), pa.string())
        first_day, last_day = (_utc_date(start_us), _utc_date(end_us))
        found: dict[str, int] = {}
        try:
            table.update_incremental()
            days = sorted({d for d in table.get_add_actions(flatten=True).column(f"partition.{PARTITION_COLUMN}")
                           .to_pylist() if d is not None and first_day <= d <= last_day})
            condition = ((ds.field("timestamp") >= pa.scalar(start_us, TABLE_SCHEMA.field("timestamp").type))
                         & (ds.field("timestamp") <= pa.scalar(end_us, TABLE_SCHEMA.field("timestamp").type))
                         & ds.field("tag_webid").isin(wanted))
            for day in days:
                dataset = table.to_pyarrow_dataset(file_pruning_predicate=[(PARTITION_COLUMN, "=", day.isoformat())])
                for batch in dataset.to_batches(columns=["tag_webid", "timestamp"], filter=condition):
                    if not batch.num_rows:
                        continue
                    mins = pa.Table.from_batches([batch]).group_by("tag_webid").aggregate([("timestamp", "min")])
                    for webid, ts in zip(mins["tag_webid"].to_pylist(),
                                         pc.cast(mins["timestamp_min"], pa.int64()).to_pylist(), strict=True):
                        if webid not in found or ts < found[webid]:
                            found[webid] = ts
                if len(found) == len(wanted):
                    break  # later partitions hold only later events
        except (DeltaError, OSError) as exc:
            text, cause = self._describe(exc)
            raise SinkError(f"cannot read Delta table {self.display_uri}: {text}") from cause
        return found

    def write_ahead(self, rows: pa.Table) -> list[AddAction]:
        """Data files for rows of a commit still to come (``buffer.Spill``): in the table's folder but not
        in its log, so no reader sees them until ``commit`` adds them (or VACUUM removes them)."""
        return self._with_credentials(lambda: self._write_ahead(rows))

    def commit(self, batch: pa.RecordBatch | pa.Table, txn_version: int,
               written_ahead: Sequence[AddAction] = ()) -> CommitResult:
        """Append ``batch`` and the files ``written_ahead`` for it as transaction ``txn_version``, unless the
        table already holds that version. ``rows`` in the result counts ``batch`` only."""
        return self._with_credentials(lambda: self._commit(batch, txn_version, written_ahead))

    def take_claim(self, claim: WriterClaim) -> None:
        """Take the writer claim on ``app_id`` for this run (``claim`` module); TableConflictError (exit 2)
        naming the holder if another live process has it. Every commit then checks and renews it."""
        if claim.app_id != self.app_id:
            raise ValueError(f"a claim on app id {claim.app_id} for a sink of app id {self.app_id}")
        claim.table = self.display_uri

        def take() -> None:
            self._claim_operation("taking the writer claim on", claim.take, claim)
            self.claim = claim

        self._with_credentials(take)

    def renew_claim(self) -> None:
        """Renew the claim with an empty commit if no data commit did lately; ForeignWriterError if it was lost."""
        if self.claim is not None:
            claim = self.claim
            self._with_credentials(lambda: self._claim_operation("renewing the writer claim on", claim.renew, claim))

    def release_claim(self) -> None:
        """Give the claim up at a clean stop (another host may then take the app id at once)."""
        if self.claim is not None:
            claim = self.claim
            self._with_credentials(lambda: self._claim_operation("releasing the writer claim on", claim.release,
                                                                 claim))

    def _claim_operation(self, action: str, operation: Callable[[DeltaTable], None], claim: WriterClaim) -> None:
        table = self.table
        try:
            table.update_incremental()
            operation(table)
        except (DeltaError, OSError) as exc:
            text, cause = self._describe(exc)
            raise SinkError(f"{action} app id {claim.app_id} of {self.display_uri} failed: {text}") from cause

    def state_saved(self, txn_version: int) -> None:
        """The writer's state file holds ``txn_version`` now: nothing to do, the table holds the rest."""

    def _last_txn_version(self) -> int:
        """The newest transaction version this writer committed, 0 if none (re-read from the log)."""
        table = self.table
        try:
            table.update_incremental()
        except (DeltaError, OSError) as exc:
            text, cause = self._describe(exc)
            raise SinkError(f"cannot read Delta table {self.display_uri}: {text}") from cause
        return table.transaction_version(self.app_id) or 0

    def _read_event_keys(self, since: date | None = None, until: date | None = None,
                        webids: Collection[str] | None = None) -> pa.Table:
        """The event-key columns of the table (from ``since`` to ``until``, by partition; of ``webids``
        only, if given), to rebuild floors or to know what a gap read again already has."""
        table = self.table
        filters: list[tuple[str, str, Any]] = []
        if since is not None:
            filters.append((PARTITION_COLUMN, ">=", since))
        if until is not None:
            filters.append((PARTITION_COLUMN, "<=", until))
        if webids is not None:
            filters.append(("tag_webid", "in", sorted(webids)))
        try:
            table.update_incremental()
            return table.to_pyarrow_table(columns=list(EVENT_KEY), filters=filters or None)
        except (DeltaError, OSError) as exc:
            text, cause = self._describe(exc)
            raise SinkError(f"cannot read Delta table {self.display_uri}: {text}") from cause

    def _write_ahead(self, rows: pa.Table) -> list[AddAction]:
        """Data files for rows of a commit still to come (``buffer.Spill``): in the table's folder but not
        in its log, so no reader sees them until ``commit`` adds them (or VACUUM removes them)."""
        assert self._files is not None
        try:
            return write_partitions(self._files, rows)
        except (DeltaError, OSError) as exc:
            text, cause = self._describe(exc)
            raise SinkError(f"cannot write to Delta table {self.display_uri}: {text}") from cause

    def _commit(self, batch: pa.RecordBatch | pa.Table, txn_version: int,
               written_ahead: Sequence[AddAction] = ()) -> CommitResult:
        """Append ``batch`` and the files ``written_ahead`` for it as transaction ``txn_version``, unless the
        table already holds that version. ``rows`` in the result counts ``batch`` only."""
        table = self.table
        actions: list[AddAction | RemoveAction] | None = None  # written once, committed in every round
        backoff = Backoff(initial=0.1, maximum=5.0)
        for round_no in range(1, COMMIT_ROUNDS + 1):
            try:
                table.update_incremental()
                if self._already_written(table, txn_version):
                    log.warning("commit_skipped", txn_version=txn_version, app_id=self.app_id,
                                committed=table.transaction_version(self.app_id))
                    return CommitResult(table.version(), txn_version, 0, skipped=True)
                if actions is None:
                    assert self._files is not None
                    actions = list(written_ahead)
                    if batch.num_rows:
                        actions += write_partitions(self._files, batch)
                self._commit_actions(table, actions, txn_version)
                # The object stays at its old version otherwise. Should this read fail, the retry finds the
                # transaction in the log and skips it.
                table.update_incremental()
                break
            except CommitFailedError as exc:
                text, cause = self._describe(exc)
                if round_no == COMMIT_ROUNDS:
                    raise SinkError(f"commit to {self.display_uri} failed: {text}") from cause
                delay = backoff.next_delay()
                log.info("commit_retried", txn_version=txn_version, error=text, round=round_no,
                         retry_in=round(delay, 2), note="other commits took its log version; same files")
                time.sleep(delay)
            except (DeltaError, OSError) as exc:
                text, cause = self._describe(exc)
                raise SinkError(f"cannot write to Delta table {self.display_uri}: {text}") from cause
        return CommitResult(table.version(), txn_version, batch.num_rows, skipped=False)

    def _already_written(self, table: DeltaTable, txn_version: int) -> bool:
        """Whether the table holds ``txn_version`` already (a retried commit that had landed): skip it. Under
        a claim only if this run wrote it; another writer of the app id is a ForeignWriterError."""
        if self.claim is None:
            return (table.transaction_version(self.app_id) or 0) >= txn_version
        self.claim.check(table)
        return self.claim.already_written(table, txn_version)

    def _commit_actions(self, table: DeltaTable, actions: list[AddAction | RemoveAction], txn_version: int) -> None:
        """One log entry: the files, the app transaction, and the claim's renewal (under a claim)."""
        transactions = [Transaction(self.app_id, txn_version)]
        metadata = {"pistream.app_id": self.app_id, "pistream.txn_version": str(txn_version)}
        claim = self.claim
        if claim is not None:
            renewal, record = claim.carry(table, txn_version)
            transactions.append(renewal)
            metadata.update(record)
        try:
            table.create_write_transaction(
                actions, mode="append", schema=TABLE_SCHEMA, partition_by=[PARTITION_COLUMN],
                commit_properties=CommitProperties(app_transactions=transactions, custom_metadata=metadata))
        except CommitFailedError:
            if claim is not None:
                claim.failed(renewal.version)
            raise
        if claim is not None:
            claim.landed(txn_version)
