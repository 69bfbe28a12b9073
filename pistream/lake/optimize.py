"""Compaction and Z-order under the maintenance lease, each optimize commit checked afterwards (see ``lease``:
delta-rs drops app transactions from optimize commits, so the lease cannot fence them). Blocking calls."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import structlog
from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import CommitFailedError

from ..errors import ConfigError, MaintenanceError
from ..stream.schema import PARTITION_COLUMN
from .lease import Lease, leased
from .storage import redact_uri, table_files
from .tableaccess import StorageOptions, current_options, open_table, translated

log = structlog.get_logger(__name__)


ZORDER_COLUMNS = ("tag_webid", "timestamp")


DEFAULT_TARGET_SIZE = 100 << 20  # delta-rs's, when the table has no delta.targetFileSize


MAX_SPILL_SIZE = 256 << 20  # z-order of 10 M rows: 1.56 GB RSS unbounded, ~450 MB with this bound


RUN_KEY = "pistream.maintenance_run"  # commitInfo key that finds an optimize's own commit


# delta-rs names the files of one optimize run part-NNNNN-<run uuid>-c000.<codec>.parquet; pistream's
# appender gives each file a uuid of its own.
_RUN_OF_FILE = re.compile(r"part-\d+-([0-9a-fA-F-]{36})-c\d+")


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
            target_size: int | None = None, lease: Lease | None = None, tiered: bool = False,
            max_concurrent_tasks: int | None = None) -> OptimizeResult:
    """Merge small files (of ``partition``, or of the whole table) into files of about ``target_size``
    (the table's ``delta.targetFileSize``, else 100 MiB); files of that size are left alone. ``tiered``
    (the scheduler's compaction of today's partition) merges a file only with smaller ones that together
    weigh at least half as much (``tiered_target``), so a pass no longer rewrites the day's growing file."""
    def run(table: DeltaTable, filters: Any, properties: CommitProperties) -> dict[str, Any] | None:
        target: int | None = target_size or _target_size(table)
        if tiered:
            target = tiered_target(_file_sizes(table, partition), target or DEFAULT_TARGET_SIZE)
            if target is None:
                return None
        return table.optimize.compact(partition_filters=filters, target_size=target,
                                      max_concurrent_tasks=max_concurrent_tasks, commit_properties=properties)

    result = _optimize("compact", uri, storage_options, partition, lease, run)
    log.info("table_compacted", table=redact_uri(uri), **_logged(result))
    return result


def tiered_target(sizes: list[int], settled: int) -> int | None:
    """The ``target_size`` for delta-rs's compaction (which merges the files not bigger than it, in bins of
    that size) that merges the smallest files up to the biggest one that the smaller ones together weigh at
    least half of. A byte is then rewritten only into a file at least 1.5 times as big as the one it was in,
    so a few times in all (log base 1.5 of ``settled`` over the first file's size at most), and a pass
    rewrites about what arrived since the last one, not the whole day. Files of ``settled`` bytes or more
    stay as they are. None: nothing to merge."""
    small = sorted(size for size in sizes if size < settled)
    last, total = -1, 0  # the index of the biggest file to merge; the sum of the files before it
    for index, size in enumerate(small):
        if index and 2 * total >= size:
            last = index
        total += size
    if last < 1:
        return None
    # What is merged fits one bin (each bigger file outweighs twice what is merged), and delta-rs skips
    # files over the target: the next file and all bigger ones stay.
    return small[last + 1] - 1 if last + 1 < len(small) else settled


def _target_size(table: DeltaTable) -> int:
    text = table.metadata().configuration.get("delta.targetFileSize")
    return int(text) if text and text.isdigit() else DEFAULT_TARGET_SIZE


def _file_sizes(table: DeltaTable, partition: date | None) -> list[int]:
    adds = pa.table(table.get_add_actions(flatten=True))
    sizes = adds.column("size_bytes").to_pylist()
    dates = partition_dates(adds)
    if partition is None or dates is None:
        return sizes
    return [size for size, day in zip(sizes, dates.to_pylist(), strict=True) if day == partition]


def z_order(uri: str, storage_options: StorageOptions | None, partition: date, *,
            max_spill_size: int = MAX_SPILL_SIZE, target_size: int | None = None, lease: Lease | None = None,
            columns: tuple[str, ...] = ZORDER_COLUMNS, max_concurrent_tasks: int | None = None
            ) -> OptimizeResult:
    """Rewrite one partition clustered by tag and time, so that queries for a few tags read few files.
    Always with a spill bound: unbounded, the sort holds the partition in memory."""
    if max_spill_size <= 0:
        raise ConfigError("z-order needs a memory bound (max_spill_size > 0): unbounded, Z-ordering 10 M rows "
                          f"took 1.56 GB of memory; use the default {MAX_SPILL_SIZE >> 20} MiB")

    def run(table: DeltaTable, filters: Any, properties: CommitProperties) -> dict[str, Any] | None:
        return table.optimize.z_order(list(columns), partition_filters=filters, target_size=target_size,
                                      max_spill_size=max_spill_size, max_concurrent_tasks=max_concurrent_tasks,
                                      commit_properties=properties)

    result = _optimize("z_order", uri, storage_options, partition, lease, run)
    log.info("partition_zordered", table=redact_uri(uri), **_logged(result))
    return result


def _logged(result: OptimizeResult) -> dict[str, Any]:
    return {k: v for k, v in result.to_dict().items() if k != "operation"}


def _optimize(operation: str, uri: str, storage_options: StorageOptions | None, partition: date | None,
              lease: Lease | None, run: Callable[[DeltaTable, Any, CommitProperties], dict[str, Any] | None]
              ) -> OptimizeResult:
    started = time.perf_counter()
    run_id = uuid.uuid4().hex
    filters = [(PARTITION_COLUMN, "=", partition.isoformat())] if partition is not None else None
    with leased(lease, uri, storage_options) as held:
        table = held.open_table()  # fresh, just before the optimize: it plans from this snapshot
        options = current_options(uri, storage_options)
        with translated(operation.replace("_", "-"), uri, options):
            read_version = table.version()
            try:
                metrics = run(table, filters, CommitProperties(
                    custom_metadata={RUN_KEY: run_id, "pistream.lease_holder": held.holder.text()})) or _NOTHING
            except CommitFailedError as exc:
                if "Metadata changed" not in str(exc):
                    raise
                raise MaintenanceError(
                    f"the {operation.replace('_', '-')} of {redact_uri(uri)} was not committed: the table's "
                    "metadata changed while it ran (another maintainer took the lease over after it expired, "
                    "or someone altered the table); nothing was changed, the next pass plans it again") from None
            removed, added = json.loads(metrics["filesRemoved"]), json.loads(metrics["filesAdded"])
            version, rows = None, 0
            if metrics["numFilesRemoved"] or metrics["numFilesAdded"]:
                version, rows = _check_optimize_commit(uri, options, read_version, run_id)
        held.record(operation)
    return OptimizeResult(operation, partition, int(metrics["numFilesRemoved"]), int(metrics["numFilesAdded"]),
                          int(removed.get("totalSize", 0)), int(added.get("totalSize", 0)), rows, version,
                          round(time.perf_counter() - started, 3))


_NOTHING: dict[str, Any] = {"numFilesRemoved": 0, "numFilesAdded": 0, "filesRemoved": "{}", "filesAdded": "{}"}


def _check_optimize_commit(uri: str, options: Mapping[str, str], read_version: int, run_id: str
                           ) -> tuple[int, int]:
    """Find the optimize's commit (after appenders' commits, possibly) and check that it carries no app
    transaction and leaves the table's row count as it was; returns its version and the rows it wrote."""
    files = table_files(uri, options)
    latest = open_table(uri, options).version()
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
    before = _row_count(open_table(uri, options, version - 1))
    after = _row_count(open_table(uri, options, version))
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


def partition_dates(adds: pa.Table) -> pa.ChunkedArray | None:
    name = f"partition.{PARTITION_COLUMN}"
    return adds.column(name) if name in adds.column_names else None


def zorder_candidates(uri: str, storage_options: StorageOptions | None = None, *, before: date | None = None
                      ) -> list[date]:
    """Partitions (older than ``before``) to Z-order, from the log alone: those with more than one file whose
    files are not all from one optimize run. A Z-ordered partition's files come from one run; a late value
    adds a file of another and the partition is Z-ordered again. (A partition rewritten whole by one
    compaction run counts as done, too.)"""
    options = current_options(uri, storage_options)
    with translated("reading the table log", uri, options):
        adds = pa.table(open_table(uri, options).get_add_actions(flatten=True))
    dates = partition_dates(adds)
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
