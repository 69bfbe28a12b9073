"""Bytes the scheduler's compaction of today's partition rewrites per pass: ``--passes`` passes, each after
``--commits`` appends of ``--rows`` values (many tags, sine-like values: compressible as real ones). Once as
before (every small file merged each pass: the day's growing file is rewritten every time), once tiered
(``optimize.tiered_target``), on fresh tables.

    python -m benchmarks.compaction_amplification --passes 40
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
from deltalake import DeltaTable

from pistream.lake.optimize import compact
from pistream.lake.sink import DeltaSink
from pistream.logsetup import configure_logging
from pistream.stream.schema import PARTITION_COLUMN, TABLE_SCHEMA

DAY = date(2026, 3, 10)


def batch(first: int, rows: int, tags: int) -> pa.Table:
    start = datetime(DAY.year, DAY.month, DAY.day, tzinfo=UTC)
    numbers = range(first, first + rows)
    times = [start + timedelta(milliseconds=10 * n) for n in numbers]
    return pa.table({
        "tag": [f"\\\\SRV\\T{n % tags:05d}" for n in numbers], "tag_webid": [f"W{n % tags:05d}" for n in numbers],
        "timestamp": times, "value": [round(50 + 40 * math.sin(n / 977), 3) for n in numbers],
        "value_text": pa.nulls(rows, pa.string()), "state_code": pa.nulls(rows, pa.int32()),
        "system_state": [False] * rows, "uom": ["degC"] * rows, "good": [n % 50 != 0 for n in numbers],
        "questionable": [False] * rows, "substituted": [False] * rows, "annotated": [False] * rows,
        "received_timestamp": times, PARTITION_COLUMN: [DAY] * rows,
    }, schema=TABLE_SCHEMA)


def run(tiered: bool, passes: int, commits: int, rows: int, tags: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as folder:
        uri = f"{folder}/table"
        sink = DeltaSink(uri, "writer")
        sink.open()
        version = event = rewritten = 0
        per_pass: list[int] = []
        files: list[int] = []
        for _ in range(passes):
            for _ in range(commits):
                version += 1
                sink.commit(batch(event, rows, tags), version)
                event += rows
            result = compact(uri, {}, DAY, tiered=tiered)
            per_pass.append(result.bytes_removed)
            rewritten += result.bytes_removed
            files.append(len(DeltaTable(uri).file_uris()))
        adds = pa.table(DeltaTable(uri).get_add_actions(flatten=True))
        live = sum(adds.column("size_bytes").to_pylist())
        return {"tiered": tiered, "passes": passes, "bytes_rewritten": rewritten, "live_bytes": live,
                "rewritten_per_live_byte": round(rewritten / live, 2), "rewritten_per_pass_kb":
                [round(b / 1024) for b in per_pass], "files_after_each_pass": files, "max_files": max(files)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=40)
    parser.add_argument("--commits", type=int, default=10)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--tags", type=int, default=500)
    args = parser.parse_args()
    configure_logging("json", "warning")
    for tiered in (False, True):
        print(json.dumps(run(tiered, args.passes, args.commits, args.rows, args.tags)))


if __name__ == "__main__":
    main()
