"""The periodic ``stream_stats`` line: an operator sees values/s, what waits in memory, the lag and the
channels of a running pipeline, and the numbers agree with the run's summary."""

from __future__ import annotations

import structlog
import trio
from test_end_to_end import PATHS, served

from pistream.pipeline import run_pipeline
from pistream.sim.model import SimModel


async def test_stream_stats_are_logged_while_running(tmp_path):
    model = SimModel.from_paths(PATHS, rate=20)
    with structlog.testing.capture_logs() as logs, trio.fail_after(60):
        async with served(tmp_path, model, duration=3.5, flush_seconds=0.5, stats_interval=1) as (_, settings):
            summary = await run_pipeline(settings, handle_signals=False)
    stats = [entry for entry in logs if entry["event"] == "stream_stats"]
    assert len(stats) >= 2
    last = stats[-1]
    # 8 tags x 20 values/s arrive; the 1 s window of the line sees them (a slow machine: at least half).
    assert len(PATHS) * 20 / 2 <= last["values_per_s"] <= len(PATHS) * 20 * 1.5
    assert last["channels_live"] == last["channels"] == summary.channels
    assert last["commits"] >= 1 and last["failed_commits"] == 0 and last["gaps_lost"] == 0
    assert 0 <= last["lag_s"] <= 5  # commits every 0.5 s: the table is never far behind
    assert [s["values_written"] for s in stats] == sorted(s["values_written"] for s in stats)
    assert last["values_written"] <= summary.values_written
