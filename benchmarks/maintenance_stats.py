"""How long ``pistream stats`` and the scheduler's Z-order planning take on a table of many small files (what
a table looks like after days of 1 s flushes without maintenance): a table of ``--files`` tiny data files
over ``--partitions`` days, committed ``--per-commit`` files at a time (checkpoints every 100 commits).

    python -m benchmarks.maintenance_stats --files 20000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Transaction

from pistream.lake.datafiles import write_partitions
from pistream.lake.optimize import zorder_candidates
from pistream.lake.sink import DeltaSink
from pistream.lake.storage import table_files
from pistream.lake.tablestats import table_stats
from pistream.logsetup import configure_logging
from pistream.stream.schema import PARTITION_COLUMN, TABLE_SCHEMA


def tiny_batch(day: date, first: int, rows: int, tags: int) -> pa.Table:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(seconds=first)
    times = [start + timedelta(milliseconds=i) for i in range(rows)]
    ids = [(first + i) % tags for i in range(rows)]
    return pa.table({
        "tag": [f"\\\\SRV\\T{t:05d}" for t in ids], "tag_webid": [f"W{t:05d}" for t in ids], "timestamp": times,
        "value": [float(i) for i in range(rows)], "value_text": pa.nulls(rows, pa.string()),
        "state_code": pa.nulls(rows, pa.int32()), "system_state": [False] * rows, "uom": ["degC"] * rows,
        "good": [i % 10 != 0 for i in range(rows)], "questionable": [False] * rows,
        "substituted": [False] * rows, "annotated": [False] * rows, "received_timestamp": times,
        PARTITION_COLUMN: [day] * rows,
    }, schema=TABLE_SCHEMA)


def build(uri: str, files: int, per_commit: int, partitions: int, rows: int, tags: int) -> float:
    started = time.perf_counter()
    sink = DeltaSink(uri, "bench-writer")
    sink.open()
    out = table_files(uri, None)
    first = date(2024, 1, 1)
    for commit in range(files // per_commit):
        actions = []
        for k in range(per_commit):
            n = commit * per_commit + k
            actions += write_partitions(out, tiny_batch(first + timedelta(days=n % partitions), n * rows, rows, tags))
        table = DeltaTable(uri)
        table.create_write_transaction(actions, mode="append", schema=TABLE_SCHEMA, partition_by=[PARTITION_COLUMN],
                                       commit_properties=CommitProperties(
                                           app_transactions=[Transaction("bench-writer", commit + 1)]))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--per-commit", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=40)
    parser.add_argument("--rows", type=int, default=20, help="rows per file")
    parser.add_argument("--tags", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    configure_logging("console", "warning")
    with tempfile.TemporaryDirectory() as workdir:
        uri = os.path.join(workdir, "table")
        build_s = build(uri, args.files, args.per_commit, args.partitions, args.rows, args.tags)

        def best(fn) -> float:
            times = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
            return round(min(times), 4)

        stats = table_stats(uri)
        report = {
            "files": stats.files, "rows": stats.rows, "partitions": len(stats.partitions),
            "version": stats.version, "last_checkpoint": stats.last_checkpoint, "build_s": round(build_s, 1),
            "open_s": best(lambda: DeltaTable(uri)),
            "stats_s": best(lambda: table_stats(uri)),
            "zorder_plan_s": best(lambda: zorder_candidates(uri)),
            "stats_scan_s": best(lambda: table_stats(uri, scan=True)),
        }
    print(json.dumps(report, indent=2))
    sys.stdout.flush()
    os._exit(0)  # skip native thread-pool teardown (see pistream.cli.entry)


if __name__ == "__main__":
    main()
