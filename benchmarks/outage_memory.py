"""Storage outage under load: N tags at R events/s stream into a local table whose commits fail for
OUTAGE seconds (storage down). Samples this process's RSS every half second and checks afterwards that
every event between each tag's first and last row is in the table exactly once.

    python benchmarks/outage_memory.py --tags 1000 --rate 10 --outage 60

The simulator runs in its own process, so the RSS is pistream's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import trio
from deltalake import DeltaTable

from pistream.config import build_settings
from pistream.errors import SinkError
from pistream.lake.sink import DeltaSink
from pistream.logsetup import configure_logging
from pistream.pipeline import run_pipeline
from pistream.sim.groundtruth import arrow_rows, compare_rows
from pistream.sim.model import SimModel


class OutageSink(DeltaSink):
    """A real Delta sink whose commits fail between two moments: the storage outage."""

    def __init__(self, *args, down_from: float, down_until: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.down_from, self.down_until = down_from, down_until

    def _check(self) -> None:
        if self.down_from <= time.monotonic() < self.down_until:
            raise SinkError("storage unavailable (injected outage)")

    def write_ahead(self, rows):
        self._check()
        return super().write_ahead(rows)

    def commit(self, batch, txn_version, written_ahead=()):
        self._check()
        return super().commit(batch, txn_version, written_ahead)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


async def run(args: argparse.Namespace, workdir: str, url: str) -> dict:
    model = SimModel.generated(args.tags, rate=args.rate)
    tags = os.path.join(workdir, "tags.txt")
    await trio.Path(tags).write_text("\n".join(t.path for t in model.tags), encoding="utf-8")
    table = os.path.join(workdir, "table")
    start = time.monotonic()
    sink = OutageSink(table, "outage-bench", down_from=start + args.warmup,
                      down_until=start + args.warmup + args.outage)
    settings = build_settings({}, {"tags": tags, "url": url, "table": table, "log_level": "warning",
                                   "state_dir": os.path.join(workdir, "state"),
                                   "flush_seconds": args.flush_seconds, "flush_rows": args.flush_rows,
                                   "duration": args.warmup + args.outage + args.after})
    samples: list[tuple[float, float]] = []
    async with trio.open_nursery() as nursery:
        async def sample():
            while True:
                samples.append((round(time.monotonic() - start, 1), round(rss_mb(), 1)))
                await trio.sleep(0.5)

        nursery.start_soon(sample)
        summary = await run_pipeline(settings, handle_signals=False, sink=sink)
        nursery.cancel_scope.cancel()
    peak_run_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before reading the table back
    rows = arrow_rows(DeltaTable(table).to_pyarrow_table())
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for webid, ts, *_ in rows:
        first[webid] = min(first.get(webid, ts), ts)
        last[webid] = max(last.get(webid, ts), ts)
    result = compare_rows(rows, model, {w: (first[w], last[w]) for w in first})
    during = [mb for t, mb in samples if args.warmup <= t <= args.warmup + args.outage]
    return {
        "tags": args.tags, "events_per_s": args.tags * args.rate, "outage_s": args.outage,
        "flush_rows": args.flush_rows, "rss_before_outage_mb": max(mb for t, mb in samples if t < args.warmup),
        "rss_peak_during_outage_mb": max(during), "rss_end_of_outage_mb": during[-1],
        "rss_peak_after_outage_mb": max(mb for t, mb in samples if t > args.warmup + args.outage),
        "rss_peak_whole_run_mb": round(peak_run_mb, 1),
        "failed_commits": summary.failed_commits, "channel_pauses": summary.channel_pauses,
        "gaps_filled": summary.gaps_filled, "gap_values": summary.gap_values, "gaps_lost": summary.gaps_lost,
        "tags_with_rows": result.tags_with_rows, "rows": result.found, "missing": len(result.missing),
        "duplicates": len(result.duplicates), "unexpected": len(result.unexpected),
        "rss_samples": samples[:: max(1, len(samples) // 40)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tags", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--outage", type=float, default=60.0)
    parser.add_argument("--after", type=float, default=30.0)
    parser.add_argument("--flush-seconds", type=float, default=5.0)
    parser.add_argument("--flush-rows", type=int, default=100_000)
    args = parser.parse_args()
    configure_logging("console", "warning")
    sim = subprocess.Popen([sys.executable, "-m", "pistream", "simulate", "--tag-count", str(args.tags),
                            "--rate", str(args.rate), "--poll-interval", "0.25"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert sim.stdout is not None
        url = re.search(r"http://127\.0\.0\.1:\d+/piwebapi", sim.stdout.readline()).group(0)
        with tempfile.TemporaryDirectory() as workdir:
            report = trio.run(run, args, workdir, url)
    finally:
        sim.terminate()
        sim.wait(timeout=10)
    print(json.dumps(report, indent=1))
    sys.stdout.flush()
    ok = report["missing"] == report["duplicates"] == report["unexpected"] == 0
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    main()
