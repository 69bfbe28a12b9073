"""The Delta Lake sink: the only module that imports deltalake.

Every commit carries an app transaction ``(app_id, version)``. delta-rs does not skip a version already in
the log, so ``commit`` checks first: a commit retried after a crash or a timeout that in fact succeeded is
not written twice. Calls are blocking; the pipeline runs them in a worker thread (writes release the GIL).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date

import pyarrow as pa
import structlog
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from .errors import SinkError, TableConflictError
from .schema import EVENT_KEY, PARTITION_COLUMN, TABLE_SCHEMA

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class CommitResult:
    table_version: int
    txn_version: int
    rows: int
    skipped: bool  # the transaction version was already in the table: nothing written


def _redact(uri: str) -> str:
    """The table URI without any query string or userinfo, which may hold secrets (SAS tokens)."""
    uri = uri.split("?", 1)[0]
    if "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = uri.split("://", 1)
        uri = f"{scheme}://{rest.split('@', 1)[1]}"
    return uri


class DeltaSink:
    """One writer's handle on one Delta table, identified in the log by ``app_id``."""

    def __init__(self, uri: str, app_id: str, storage_options: Mapping[str, str] | None = None):
        self.uri = uri
        self.app_id = app_id
        self.storage_options = dict(storage_options or {})
        self._table: DeltaTable | None = None

    @property
    def display_uri(self) -> str:
        return _redact(self.uri)

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
                    description="PI System events written by pistream, one row per event",
                    storage_options=self.storage_options or None,
                )
                log.info("table_created", table=self.display_uri)
        except (DeltaError, OSError) as exc:
            raise SinkError(
                f"cannot open Delta table {self.display_uri}: {exc}; check --table and the storage options"
            ) from exc
        self._check_schema()

    def reopen(self, storage_options: Mapping[str, str] | None = None) -> None:
        """Open again, e.g. with refreshed cloud credentials; the transaction state lives in the table."""
        if storage_options is not None:
            self.storage_options = dict(storage_options)
        self._table = None
        self.open()

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
        self.table.update_incremental()
        return self.table.transaction_version(self.app_id) or 0

    def read_event_keys(self, since: date | None = None) -> pa.Table:
        """The event-key columns of the table (from ``since`` on, by partition), to rebuild floors."""
        table = self.table
        table.update_incremental()
        filters = [(PARTITION_COLUMN, ">=", since.isoformat())] if since else None
        try:
            return table.to_pyarrow_table(columns=list(EVENT_KEY), partitions=filters)
        except (DeltaError, OSError) as exc:
            raise SinkError(f"cannot read Delta table {self.display_uri}: {exc}") from exc

    def commit(self, batch: pa.RecordBatch | pa.Table, txn_version: int) -> CommitResult:
        """Append ``batch`` as transaction ``txn_version``, unless the table already holds that version."""
        table = self.table
        try:
            table.update_incremental()
            done = table.transaction_version(self.app_id) or 0
            if done >= txn_version:
                log.warning("commit_skipped", txn_version=txn_version, committed=done, app_id=self.app_id)
                return CommitResult(table.version(), txn_version, 0, skipped=True)
            write_deltalake(
                table,
                batch,
                mode="append",
                partition_by=[PARTITION_COLUMN],
                commit_properties=CommitProperties(
                    app_transactions=[Transaction(self.app_id, txn_version)],
                    custom_metadata={"pistream.app_id": self.app_id},
                ),
            )
        except CommitFailedError as exc:
            raise SinkError(f"commit to {self.display_uri} failed: {exc}") from exc
        except (DeltaError, OSError) as exc:
            raise SinkError(f"cannot write to Delta table {self.display_uri}: {exc}") from exc
        return CommitResult(table.version(), txn_version, batch.num_rows, skipped=False)
