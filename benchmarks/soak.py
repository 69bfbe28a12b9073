"""Soak: the pipeline with table maintenance for a long run. N tags at R events/s from the built-in simulator,
1 s flushes, maintenance every ``--maintenance-seconds``; every ``--sample-seconds`` a side thread records
the files per partition, the time to open the table (``DeltaTable(uri)``), the checkpoint and commit files
in ``_delta_log`` and the process RSS. At the end: every event the simulator emitted is in the table once,
DuckDB's delta-kernel counts the same rows as delta-rs, and a JSON report is printed.

    python -m benchmarks.soak --tags 2000 --rate 1 --duration 1800 --maintenance-seconds 120

``--scheduler pipeline`` (the default) leaves maintenance to the pipeline (``maintenance_interval``);
``--scheduler beside`` runs a ``MaintenanceScheduler`` next to a pipeline that has its own turned off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import trio
from deltalake import DeltaTable

from benchmarks.common import rss_mb
from pistream.config import build_settings
from pistream.lake.maintenance import MaintenanceScheduler
from pistream.logsetup import configure_logging
from pistream.pipeline import run_pipeline
from pistream.sim.groundtruth import arrow_rows, compare_rows
from pistream.sim.model import SimModel
from pistream.sim.server import Simulator
from pistream.stream.schema import PARTITION_COLUMN


def sample(table: str, started: float) -> dict[str, Any]:
    """One look at the table from outside the pipeline, as a reader would see it."""
    t0 = time.perf_counter()
    dt = DeltaTable(table)
    open_s = time.perf_counter() - t0
    adds = pa.table(dt.get_add_actions(flatten=True))
    days = Counter(str(d) for d in adds.column(f"partition.{PARTITION_COLUMN}").to_pylist())
    log = list(Path(table, "_delta_log").iterdir())
    return {
        "t_s": round(time.monotonic() - started, 1), "version": dt.version(), "open_s": round(open_s, 4),
        "files": adds.num_rows, "files_per_partition": dict(sorted(days.items())),
        "checkpoints": sum(f.name.endswith(".checkpoint.parquet") for f in log),
        "commit_files": sum(f.name.endswith(".json") for f in log), "rss_mb": round(rss_mb(), 1),
    }


class Sampler(threading.Thread):
    def __init__(self, table: str, every: float):
        super().__init__(name="soak-sampler", daemon=True)
        self.table, self.every = table, every
        self.samples: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.started = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self.samples.append(sample(self.table, self.started))
            except Exception as exc:  # noqa: BLE001 - e.g. before the first commit; recorded, not fatal
                self.errors.append(f"{type(exc).__name__}: {exc}")


def duckdb_count(table: str) -> int:
    """Rows as DuckDB's delta extension (delta-kernel) reads them, loaded from its pip package."""
    import duckdb
    import duckdb_extension_delta

    package = Path(duckdb_extension_delta.__file__).parent
    [extension] = package.glob(f"extensions/v{duckdb.__version__}/delta.duckdb_extension")
    con = duckdb.connect(config={"allow_unsigned_extensions": "true"})
    con.execute(f"LOAD '{extension}'")
    [(count,)] = con.execute(f"SELECT count(*) FROM delta_scan('{table}')").fetchall()
    return int(count)


async def run(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    model = SimModel.generated(args.tags, rate=args.rate)
    tags = os.path.join(workdir, "tags.txt")
    await trio.Path(tags).write_text("\n".join(t.path for t in model.tags), encoding="utf-8")
    table = os.path.join(workdir, "table")
    simulator = Simulator(model, poll_interval=args.poll_interval)
    sampler = Sampler(table, args.sample_seconds)
    beside = MaintenanceScheduler(table, {}, interval=args.maintenance_seconds) if args.scheduler == "beside" else None
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        settings = build_settings({}, {
            "tags": tags, "url": simulator.url, "table": table, "duration": args.duration,
            "flush_seconds": args.flush_seconds, "state_dir": os.path.join(workdir, "state"),
            "maintenance_interval": args.maintenance_seconds if beside is None else 0, "log_level": "warning"})
        sampler.start()
        if beside is not None:
            await nursery.start(beside.run)
        summary = await run_pipeline(settings, handle_signals=False)
        nursery.cancel_scope.cancel()
    sampler.stop.set()
    sampler.join()
    final = sample(table, sampler.started)

    tail_us = int(2 * args.poll_interval * 1e6)  # the last moments may still be on the wire at the stop
    windows = {w: (r.first_us, r.last_us - tail_us) for w, r in simulator.emitted.items()}
    data = DeltaTable(table).to_pyarrow_table()
    result = compare_rows(arrow_rows(data), model, windows)
    operations = Counter(
        "lease" if "pistream.lease_action" in c else c.get("operation", "?")
        for c in DeltaTable(table).history())
    return {
        "tags": args.tags, "rate": args.rate, "duration_s": args.duration, "flush_s": args.flush_seconds,
        "maintenance_s": args.maintenance_seconds, "scheduler": args.scheduler,
        "missing": len(result.missing), "duplicates": len(result.duplicates), "unexpected": len(result.unexpected),
        "expected_in_window": result.expected, "rows_deltars": data.num_rows, "rows_duckdb": duckdb_count(table),
        "commits": summary.commits, "values_written": summary.values_written,
        "operations": dict(operations), "scheduler_stats": beside.stats.__dict__ if beside else None,
        "samples": sampler.samples, "sample_errors": sampler.errors[:5], "final": final,
        "peak_rss_mb": max([s["rss_mb"] for s in sampler.samples] + [final["rss_mb"]]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tags", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=1800.0)
    parser.add_argument("--flush-seconds", type=float, default=1.0)
    parser.add_argument("--maintenance-seconds", type=float, default=120.0)
    parser.add_argument("--sample-seconds", type=float, default=60.0)
    parser.add_argument("--poll-interval", type=float, default=0.25)
    parser.add_argument("--scheduler", choices=["pipeline", "beside"], default="pipeline")
    parser.add_argument("--keep", help="Keep the table in this folder (else a temporary one).")
    args = parser.parse_args()
    configure_logging("console", "warning")
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        report = trio.run(run, args, args.keep)
    else:
        with tempfile.TemporaryDirectory() as workdir:
            report = trio.run(run, args, workdir)
    print(json.dumps(report, indent=2))
    ok = report["missing"] == report["duplicates"] == report["unexpected"] == 0 and \
        report["rows_deltars"] == report["rows_duckdb"]
    sys.stdout.flush()
    os._exit(0 if ok else 1)  # skip native thread-pool teardown (see pistream.cli.entry)


if __name__ == "__main__":
    main()
