"""Data files for one commit: a batch split by partition date, each part written as one Parquet file with
pyarrow, described by a Delta add action with the statistics readers use to skip files.

The files look like delta-rs's own (``partition_date=YYYY-MM-DD/part-00000-<uuid>-c000.snappy.parquet``,
snappy, the partition column only in the path, string columns dictionary-encoded (but plain, in row
groups, the tag columns of a file over many tags that repeat little), statistics in the log as delta-rs
writes them: timestamps to the millisecond). pyarrow streams the file out column chunk by column chunk,
so a commit holds little beyond its batch.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake.transaction import AddAction

from ..stream.schema import PARTITION_COLUMN, TABLE_SCHEMA

FILE_SCHEMA = TABLE_SCHEMA.remove(TABLE_SCHEMA.get_field_index(PARTITION_COLUMN))
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Dictionary pages only where values repeat (trying one on the float values and falling back cost ~20 % of
# a write); Parquet statistics only for the columns queries select by (the log's statistics, which readers
# use to skip files, cover every column either way).
DICTIONARY_COLUMNS = ["tag", "tag_webid", "uom", "value_text"]
# Except the tag columns of a file over many tags that repeat little (a 262,144-row part at 100,000 tags x
# 1 Hz): Parquet then materialises both columns' text whole (RSS +35 MB, and 3x slower than plain); written
# plain in row groups of 65,536 rows it steps RSS by 19 MB, for ~35 % larger files.
MANY_TAGS = 16_384
FEW_REPEATS = 8  # rows per tag
PLAIN_TAGS_ROW_GROUP = 65_536
STATISTICS_COLUMNS = ["tag", "tag_webid", "timestamp", "received_timestamp"]


def write_partitions(files: pafs.FileSystem, batch: pa.Table | pa.RecordBatch, *,
                     name: Callable[[str], str] | None = None, with_partition_column: bool = False
                     ) -> list[AddAction]:
    """Write ``batch`` (in the table schema) as one file per partition date under the table root that
    ``files`` points at; the add actions to commit them. ``name(day)`` gives a file's path instead of
    delta-rs's random one; ``with_partition_column`` keeps the date column in the file (a file a COPY INTO
    loads: it reads columns from the file, not from the path)."""
    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    dates = table.column(PARTITION_COLUMN)
    data = table if with_partition_column else table.drop_columns([PARTITION_COLUMN])
    distinct = pc.unique(dates)
    if len(distinct) == 1:
        return [_write_file(files, distinct[0].as_py().isoformat(), data, name)]
    return [_write_file(files, day.as_py().isoformat(), data.filter(pc.equal(dates, day)), name)
            for day in distinct]


def _write_file(files: pafs.FileSystem, day: str, data: pa.Table, name: Callable[[str], str] | None = None
                ) -> AddAction:
    path = name(day) if name else f"{PARTITION_COLUMN}={day}/part-00000-{uuid.uuid4()}-c000.snappy.parquet"
    data = _compact_dictionaries(data)
    if _needs_cast(data.schema):
        data = data.cast(TABLE_SCHEMA if PARTITION_COLUMN in data.column_names else FILE_SCHEMA)
    if isinstance(files, pafs.SubTreeFileSystem) and "/" in path:  # a local folder: the partition's folder first
        files.create_dir(path.rsplit("/", 1)[0], recursive=True)
    plain_tags = _many_tags_repeating_little(data)
    with files.open_output_stream(path) as out:
        pq.write_table(data, out, compression="snappy", store_schema=False,
                       use_dictionary=[c for c in DICTIONARY_COLUMNS if not (plain_tags and c.startswith("tag"))],
                       write_statistics=STATISTICS_COLUMNS, row_group_size=PLAIN_TAGS_ROW_GROUP if plain_tags else None)
        size = out.tell()
    return AddAction(path, size, {PARTITION_COLUMN: day}, int(time.time() * 1000), True, file_stats(data))


def _many_tags_repeating_little(data: pa.Table) -> bool:
    """Whether the file's tag column (after ``_compact_dictionaries``: its dictionary holds the tags its rows
    use) has over MANY_TAGS tags with fewer than FEW_REPEATS rows each."""
    tag = data.column("tag")
    dictionary = _shared_dictionary(tag) if pa.types.is_dictionary(tag.type) and tag.num_chunks else None
    return dictionary is not None and len(dictionary) > MANY_TAGS and data.num_rows < FEW_REPEATS * len(dictionary)


def _compact_dictionaries(data: pa.Table) -> pa.Table:
    """Dictionary columns (the buffer's tag ids) with a dictionary of only the entries the rows use: Parquet
    writes an Arrow dictionary whole, and the buffer's holds every resolved tag. A column whose rows use every
    entry is kept as it is (no copy); tag and tag_webid share their ids, so they are renumbered once. Chunks
    over different dictionaries (tags found while the batch filled), or with nulls, become plain strings."""
    renumbered: dict[tuple[tuple[int, int, int], ...], tuple[pa.Array, list[pa.Array]]] = {}
    for position, name in enumerate(data.column_names):
        column = data.column(position)
        if not pa.types.is_dictionary(column.type) or not column.num_chunks:
            continue
        dictionary = _shared_dictionary(column)
        if dictionary is None or column.null_count:
            data = data.set_column(position, name, column.cast(column.type.value_type))
            continue
        same_ids = tuple(_identity(chunk.indices) for chunk in column.chunks)
        if same_ids not in renumbered:
            used = _used_entries(column, len(dictionary))
            if used.all():
                continue
            kept = np.flatnonzero(used)
            renumber = np.zeros(len(dictionary), np.int32)
            renumber[kept] = np.arange(len(kept), dtype=np.int32)
            renumbered[same_ids] = (pa.array(kept), [pa.array(renumber[chunk.indices.to_numpy(zero_copy_only=False)])
                                                     for chunk in column.chunks])
        kept_entries, ids = renumbered[same_ids]
        compact = dictionary.take(kept_entries)
        data = data.set_column(position, name, pa.chunked_array(
            [pa.DictionaryArray.from_arrays(chunk_ids, compact) for chunk_ids in ids], column.type))
    return data


def _identity(ids: pa.Array) -> tuple[int, int, int]:
    """Where an array's values are: two columns built on the same ids have the same identity."""
    values = ids.buffers()[1]
    return (values.address if values else 0, ids.offset, len(ids))


def _shared_dictionary(column: pa.ChunkedArray) -> pa.Array | None:
    """The one dictionary all chunks of ``column`` use (the same buffers), or None if they differ."""
    first = column.chunk(0).dictionary
    address = tuple(b.address if b else 0 for b in first.buffers())
    for chunk in column.chunks[1:]:
        if tuple(b.address if b else 0 for b in chunk.dictionary.buffers()) != address:
            return None
    return first


def _used_entries(column: pa.ChunkedArray, size: int) -> np.ndarray:
    """A mark per dictionary entry that some row of ``column`` points at (nulls point at none)."""
    used = np.zeros(size, np.bool_)
    for chunk in column.chunks:
        ids = chunk.indices.drop_null() if chunk.null_count else chunk.indices
        used[ids.to_numpy(zero_copy_only=False)] = True
    return used


def _needs_cast(schema: pa.Schema) -> bool:
    """Whether a column's type differs from the table's other than by dictionary encoding of strings (which
    Parquet stores as plain strings)."""
    for field in schema:
        want = TABLE_SCHEMA.field(field.name).type
        have = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
        if not have.equals(want):
            return True
    return False


def file_stats(data: pa.Table) -> str:
    """The add action's ``stats`` JSON: row count, and per column the null count and, where defined, the
    minimum and maximum (left out for a float column holding NaN or infinities, as JSON has no such numbers
    and a NaN would make a range lie)."""
    minimum: dict[str, object] = {}
    maximum: dict[str, object] = {}
    nulls: dict[str, int] = {}
    for name, column in zip(data.column_names, data.columns, strict=True):
        if name == PARTITION_COLUMN:  # in the path (a staged file for COPY INTO has it as a column too)
            continue
        nulls[name] = column.null_count
        if column.null_count == len(column):
            continue
        bounds = _min_max(column)
        if bounds is not None:
            minimum[name], maximum[name] = bounds
    stats = {"numRecords": data.num_rows, "minValues": minimum, "maxValues": maximum, "nullCount": nulls}
    return json.dumps(stats, separators=(",", ":"))


def _min_max(column: pa.ChunkedArray) -> tuple[object, object] | None:
    kind = column.type
    if pa.types.is_dictionary(kind):  # the bounds of the values in use (not a copy of each row's text)
        dictionary = _shared_dictionary(column)
        if dictionary is None:
            return _min_max(column.cast(kind.value_type))
        return _min_max(pa.chunked_array([dictionary.filter(_used_entries(column, len(dictionary)))]))
    if pa.types.is_floating(kind) and pc.any(pc.is_nan(column)).as_py():
        return None
    bounds = pc.min_max(column)
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    if pa.types.is_floating(kind) and (math.isinf(low) or math.isinf(high)):
        return None
    if pa.types.is_timestamp(kind):
        micros = pc.min_max(column.cast(pa.int64()))
        low, high = _millis_text(micros["min"].as_py()), _millis_text(micros["max"].as_py())
    return low, high


def _millis_text(micros: int) -> str:
    """A timestamp statistic as delta-rs writes it: UTC, to the millisecond (truncated)."""
    moment = _EPOCH + timedelta(milliseconds=micros // 1000)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
