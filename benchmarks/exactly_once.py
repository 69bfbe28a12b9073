"""Acceptance run: N tags at R events/s for D seconds from the simulator through the pipeline into a
local table, then every event the simulator emitted in the window is checked to be there exactly once.

    python benchmarks/exactly_once.py --tags 1000 --rate 1 --duration 60
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import trio
from deltalake import DeltaTable

from pistream.config import build_settings
from pistream.logsetup import configure_logging
from pistream.pipeline import run_pipeline
from pistream.sim.groundtruth import arrow_rows, compare_rows
from pistream.sim.model import SimModel
from pistream.sim.server import Simulator


async def run(args: argparse.Namespace, workdir: str) -> dict:
    model = SimModel.generated(args.tags, rate=args.rate)
    tags = os.path.join(workdir, "tags.txt")
    await trio.Path(tags).write_text("\n".join(t.path for t in model.tags), encoding="utf-8")
    table = os.path.join(workdir, "table")
    simulator = Simulator(model, poll_interval=args.poll_interval)
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        settings = build_settings({}, {"tags": tags, "url": simulator.url, "table": table,
                                       "duration": args.duration, "flush_seconds": args.flush_seconds,
                                       "log_level": "warning"})
        summary = await run_pipeline(settings, handle_signals=False)
        nursery.cancel_scope.cancel()
    # The last moments before the stop may still be on the wire when the readers stop.
    tail_us = int(2 * args.poll_interval * 1e6)
    windows = {w: (r.first_us, r.last_us - tail_us) for w, r in simulator.emitted.items()}
    started = time.perf_counter()
    result = compare_rows(arrow_rows(DeltaTable(table).to_pyarrow_table()), model, windows)
    return {
        "tags": args.tags, "rate": args.rate, "duration_s": args.duration,
        "tags_emitting": len(windows), "tags_with_rows": result.tags_with_rows,
        "expected_in_window": result.expected, "rows_in_table": result.found,
        "missing": len(result.missing), "duplicates": len(result.duplicates),
        "unexpected": len(result.unexpected), "commits": summary.commits,
        "values_received": summary.values_received, "compare_seconds": round(time.perf_counter() - started, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tags", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--flush-seconds", type=float, default=5.0)
    parser.add_argument("--poll-interval", type=float, default=0.25)
    args = parser.parse_args()
    configure_logging("console", "warning")
    with tempfile.TemporaryDirectory() as workdir:
        report = trio.run(run, args, workdir)
    print(json.dumps(report, indent=2))
    ok = report["missing"] == report["duplicates"] == report["unexpected"] == 0 and \
        report["tags_with_rows"] == args.tags
    sys.stdout.flush()
    os._exit(0 if ok else 1)  # skip native thread-pool teardown (see pistream.cli.entry)


if __name__ == "__main__":
    main()
