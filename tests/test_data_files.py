"""The sink's own data files: what pistream writes with pyarrow and commits through delta-rs's log must read
back exactly, by delta-rs and by DuckDB (delta-kernel), and carry statistics that never make a reader skip
a file holding matching rows."""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from conftest import duckdb_delta_connection
from deltalake import DeltaTable

from pistream.lake import datafiles
from pistream.lake.datafiles import file_stats
from pistream.lake.sink import DeltaSink
from pistream.lake.storage import local_folder, table_files
from pistream.stream.schema import TABLE_SCHEMA

START = datetime(2024, 5, 1, 23, 59, 59, 998_765, tzinfo=UTC)  # rows cross midnight: two partitions


def odd_batch() -> pa.Table:
    """Rows with every column kind, NaN and infinities, nulls, text, and tags as dictionary-encoded columns
    (as the buffer keeps them)."""
    n = 6
    times = [START + timedelta(microseconds=700 * i) for i in range(n)]
    tags = pa.array(["\\\\pi\\b", "\\\\pi\\a"])
    webids = pa.array(["W-b", "W-a"])
    which = pa.array([0, 1, 0, 1, 0, 1], pa.int32())
    return pa.table({
        "tag": pa.DictionaryArray.from_arrays(which, tags),
        "tag_webid": pa.DictionaryArray.from_arrays(which, webids),
        "timestamp": pa.array(times, TABLE_SCHEMA.field("timestamp").type),
        "value": [1.5, float("nan"), None, -2.0, float("inf"), 3.25],
        "value_text": [None, None, "Shutdown", None, None, "é"],
        "state_code": pa.array([None, None, 4, None, None, None], pa.int32()),
        "system_state": [False, False, True, False, False, False],
        "uom": ["degC", None, None, "degC", "degC", "m"],
        "good": [True, True, False, True, True, True],
        "questionable": [False, True, False, False, False, False],
        "substituted": [False] * n,
        "annotated": [False, False, False, False, False, True],
        "received_timestamp": pa.array(times, TABLE_SCHEMA.field("received_timestamp").type),
        "partition_date": pa.array([t.date() for t in times], pa.date32()),
    })


def log_adds(table_path: Path, version: int) -> list[dict]:
    text = (table_path / "_delta_log" / f"{version:020d}.json").read_text()
    return [json.loads(line)["add"] for line in text.splitlines() if '"add"' in line]


def test_commit_writes_files_that_read_back_exactly_with_both_readers(tmp_path):
    sink = DeltaSink(str(tmp_path / "t"), "app")
    sink.open()
    batch = odd_batch()
    result = sink.commit(batch, 1)
    assert (result.table_version, result.txn_version, result.rows, result.skipped) == (1, 1, 6, False)
    assert sink.commit(batch, 1).skipped  # the same transaction again: not written twice

    expected = batch.cast(TABLE_SCHEMA).sort_by("timestamp").to_pylist()
    by_deltalake = DeltaTable(str(tmp_path / "t")).to_pyarrow_table().sort_by("timestamp")
    assert by_deltalake.schema.equals(TABLE_SCHEMA, check_metadata=False)
    _assert_same_rows(by_deltalake.to_pylist(), expected)

    con = duckdb_delta_connection()
    try:
        cursor = con.execute(f"SELECT * FROM delta_scan('{tmp_path / 't'}') ORDER BY timestamp")
        names = [d[0] for d in cursor.description]
        got = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        # Data skipping by the statistics: a filter on each bound must find its rows.
        last = con.execute(f"SELECT count(*) FROM delta_scan('{tmp_path / 't'}') "
                           "WHERE timestamp >= TIMESTAMPTZ '2024-05-02 00:00:00.002265+00'").fetchone()
        first_day = con.execute(f"SELECT count(*) FROM delta_scan('{tmp_path / 't'}') "
                                "WHERE partition_date = DATE '2024-05-01' AND value_text IS NULL").fetchone()
    finally:
        con.close()
    _assert_same_rows(got, expected)
    assert last == (1,)  # the newest row, 265 us past the millisecond its file's maximum names
    assert first_day == (2,)

    adds = log_adds(tmp_path / "t", 1)
    assert sorted(a["partitionValues"]["partition_date"] for a in adds) == ["2024-05-01", "2024-05-02"]
    for add in adds:
        assert add["path"].startswith(f"partition_date={add['partitionValues']['partition_date']}/part-")
        assert (tmp_path / "t" / add["path"]).stat().st_size == add["size"]
        columns = pq.read_schema(tmp_path / "t" / add["path"]).names
        assert "partition_date" not in columns and len(columns) == len(TABLE_SCHEMA) - 1


def _assert_same_rows(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for row, want in zip(got, expected, strict=True):
        for name, value in want.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(row[name]), name
            else:
                assert row[name] == value, name


def test_statistics_bound_every_row_and_leave_out_what_json_cannot_say():
    batch = odd_batch().drop_columns(["partition_date"])
    stats = json.loads(file_stats(batch))
    assert stats["numRecords"] == 6
    assert stats["nullCount"] == {name: batch.column(name).null_count for name in batch.column_names}
    low, high = stats["minValues"], stats["maxValues"]
    assert "value" not in low and "value" not in high  # NaN and inf: no range
    assert (low["tag"], high["tag"]) == ("\\\\pi\\a", "\\\\pi\\b")  # the values in use, not dictionary ids
    assert (low["tag_webid"], high["tag_webid"]) == ("W-a", "W-b")
    assert (low["state_code"], high["state_code"]) == (4, 4)
    assert (low["value_text"], high["value_text"]) == ("Shutdown", "é")
    assert (low["questionable"], high["questionable"]) == (False, True)
    # Timestamps to the millisecond, truncated, as delta-rs writes them.
    assert low["timestamp"] == "2024-05-01T23:59:59.998Z"
    assert high["timestamp"] == "2024-05-02T00:00:00.002Z"

    finite = pa.table({"value": pa.array([2.5, None, -1.0])})
    stats = json.loads(file_stats(finite))
    assert (stats["minValues"], stats["maxValues"], stats["nullCount"]) == \
        ({"value": -1.0}, {"value": 2.5}, {"value": 1})
    nothing = pa.table({"value_text": pa.nulls(3, pa.string())})
    assert json.loads(file_stats(nothing))["minValues"] == {}


def test_statistics_of_dictionary_columns_ignore_entries_no_row_uses():
    dictionary = pa.array(["zzz", "bbb", "aaa", "ccc"])
    column = pa.DictionaryArray.from_arrays(pa.array([1, 3, 1], pa.int32()), dictionary)
    stats = json.loads(file_stats(pa.table({"tag": column})))
    assert (stats["minValues"]["tag"], stats["maxValues"]["tag"]) == ("bbb", "ccc")
    assert pc.min_max(column.cast(pa.string())).as_py() == {"min": "bbb", "max": "ccc"}


def test_pre_1970_timestamps_get_statistics_that_bound_them():
    moment = datetime(1969, 12, 31, 23, 59, 59, 999_500, tzinfo=UTC)
    stats = json.loads(file_stats(pa.table({"timestamp": pa.array([moment], TABLE_SCHEMA.field("timestamp").type)})))
    assert stats["minValues"]["timestamp"] == "1969-12-31T23:59:59.999Z"
    assert date(1969, 12, 31).isoformat() in stats["maxValues"]["timestamp"]


def test_files_hold_only_the_tags_their_rows_use(tmp_path):
    """The buffer's tag columns point into every resolved tag; a file's dictionary holds only its own."""
    every_tag = pa.array([f"\\\\pi\\tag{i:06d}" for i in range(50_000)])
    batch = odd_batch()
    for name in ("tag", "tag_webid"):
        ids = pa.array([7, 49_999, 7, 123, 7, 7], pa.int32())
        batch = batch.set_column(batch.schema.get_field_index(name), name,
                                 pa.DictionaryArray.from_arrays(ids, every_tag))
    grown = pa.concat_arrays([every_tag, pa.array(["\\\\pi\\new"])])  # a tag found while the batch filled
    mixed = pa.chunked_array([
        pa.DictionaryArray.from_arrays(pa.array([7, 50_000, 7], pa.int32()), grown),
        pa.DictionaryArray.from_arrays(pa.array([123, 7, 7], pa.int32()), every_tag),
    ])
    batch = batch.set_column(0, "tag", mixed)
    sink = DeltaSink(str(tmp_path / "t"), "app")
    sink.open()
    sink.commit(batch, 1)
    got = DeltaTable(str(tmp_path / "t")).to_pyarrow_table().sort_by("timestamp")
    assert got.column("tag").to_pylist() == ["\\\\pi\\tag000007", "\\\\pi\\new", "\\\\pi\\tag000007",
                                             "\\\\pi\\tag000123", "\\\\pi\\tag000007", "\\\\pi\\tag000007"]
    assert got.column("tag_webid").to_pylist() == batch.column("tag_webid").cast(pa.string()).to_pylist()
    total = sum(add["size"] for add in log_adds(tmp_path / "t", 1))
    assert total < 20_000  # 50,000 tags' text would be ~800 kB


def tag_batch(ids: list[int], tags: int, hour: int = 12) -> pa.Table:
    """Rows of ``tags`` tags (ids into them, as the buffer keeps them), one second apart."""
    paths = pa.array([f"\\\\pi\\tag{i:02d}" for i in range(tags)])
    webids = pa.array([f"W{i:02d}" for i in range(tags)])
    n = len(ids)
    times = [START.replace(hour=hour) + timedelta(seconds=i) for i in range(n)]
    return pa.table({
        "tag": pa.DictionaryArray.from_arrays(pa.array(ids, pa.int32()), paths),
        "tag_webid": pa.DictionaryArray.from_arrays(pa.array(ids, pa.int32()), webids),
        "timestamp": pa.array(times, TABLE_SCHEMA.field("timestamp").type),
        "value": [float(i) for i in range(n)],
        "value_text": pa.nulls(n, pa.string()),
        "state_code": pa.nulls(n, pa.int32()),
        "system_state": [False] * n,
        "uom": pa.DictionaryArray.from_arrays(pa.array([i % 2 for i in range(n)], pa.int32()), pa.array(["m", "s"])),
        "good": [True] * n, "questionable": [False] * n, "substituted": [False] * n, "annotated": [False] * n,
        "received_timestamp": pa.array(times, TABLE_SCHEMA.field("received_timestamp").type),
        "partition_date": pa.array([t.date() for t in times], pa.date32()),
    })


def test_tag_columns_of_a_file_over_many_tags_that_repeat_little_are_written_plain(tmp_path, monkeypatch):
    """Parquet materialises a large tag dictionary's text whole; such files get plain tag columns in row
    groups. Both readers read the rows back the same; a file whose tags repeat keeps its dictionary pages."""
    monkeypatch.setattr(datafiles, "MANY_TAGS", 4)
    monkeypatch.setattr(datafiles, "PLAIN_TAGS_ROW_GROUP", 5)
    sink = DeltaSink(str(tmp_path / "t"), "app")
    sink.open()
    little = tag_batch([9, 0, 5, 3, 9, 4, 1, 8, 2, 7, 6, 0], tags=10)  # 1.2 rows per tag
    repeating = tag_batch([i % 5 for i in range(40)], tags=10, hour=13)  # 5 tags used (the file's dictionary), 8 rows each
    sink.commit(little, 1)
    sink.commit(repeating, 2)
    for version, batch, plain in ((1, little, True), (2, repeating, False)):
        (add,) = log_adds(tmp_path / "t", version)
        meta = pq.ParquetFile(tmp_path / "t" / add["path"]).metadata
        assert meta.num_rows == batch.num_rows and meta.num_row_groups == (3 if plain else 1)
        for name in ("tag", "tag_webid"):
            column = meta.row_group(0).column(meta.schema.names.index(name))
            assert column.has_dictionary_page is not plain, name
        uom = meta.row_group(0).column(meta.schema.names.index("uom"))
        assert uom.has_dictionary_page  # units repeat: dictionary-encoded either way
    expected = pa.concat_tables([little, repeating]).cast(TABLE_SCHEMA).to_pylist()
    got = DeltaTable(str(tmp_path / "t")).to_pyarrow_table().sort_by("timestamp")
    _assert_same_rows(got.to_pylist(), expected)
    con = duckdb_delta_connection()
    try:
        by_duckdb = con.execute(f"SELECT tag, tag_webid, value, uom FROM delta_scan('{tmp_path / 't'}') "
                                "ORDER BY timestamp").fetchall()
    finally:
        con.close()
    assert by_duckdb == [(r["tag"], r["tag_webid"], r["value"], r["uom"]) for r in expected]


def test_local_tables_get_arrow_s_file_system_and_the_others_delta_rs_s(tmp_path):
    """Local data files are streamed to disk by Arrow; object stores (and memory://) go through delta-rs
    with the table's storage options."""
    folder = tmp_path / "table"
    assert local_folder(str(folder)) == str(folder)
    assert local_folder(folder.as_uri()) == str(folder)
    assert local_folder("memory:///table") is None and local_folder("s3://bucket/table") is None
    assert isinstance(table_files(str(folder), None), pafs.SubTreeFileSystem)
    assert isinstance(table_files("memory:///table", None), pafs.PyFileSystem)
