"""What the Delta log says about a table (size, files, partitions, checkpoint), and optionally a scan of two
columns for distinct tags and the share of good values. Blocking calls."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import structlog
from deltalake import DeltaTable

from ..stream.schema import PARTITION_COLUMN
from .optimize import partition_dates
from .storage import redact_uri, table_files
from .tableaccess import StorageOptions, current_options, open_table, translated

log = structlog.get_logger(__name__)


SMALL_FILE_BYTES = 16 << 20  # what stats counts as a small file


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
    with translated("reading the table's statistics", uri, options):
        table = open_table(uri, options)
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
    dates = partition_dates(adds)
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
