"""``pistream --backfill DURATION``: the live pipeline against the simulator on loopback also reads each tag's
history from (first start - DURATION) up to its first live value, behind the live stream. The table is read
back with DuckDB (delta-kernel) and compared with the simulator's ground truth: every value from the
backfill's start to the end of the live stream exactly once, live and history together -- across a stop in
the middle of the history, and for a tag added while it runs.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import structlog
import trio
from click.testing import CliRunner
from conftest import duckdb_rows
from deltalake import DeltaTable
from test_backfill import assert_exactly_once
from test_metrics import parse

import pistream.pi.history as history
from pistream.cli import main
from pistream.config import build_settings
from pistream.livebackfill import history_app_id, parse_duration
from pistream.pipeline import run_pipeline, writer_app_id
from pistream.sim.model import SimModel
from pistream.sim.server import Simulator
from pistream.stream.progress import UNPLANNED, ProgressStore, progress_path

US = 1_000_000
PATHS = ["\\\\SIMSRV\\FLOW01", "\\\\SIMSRV\\LEVEL02", "\\\\SIMSRV\\PUMP.MODE", "\\\\SIMSRV\\BATCH.TEXT"]


@asynccontextmanager
async def served(tmp_path: Path, model: SimModel, paths: list[str], **options):
    tags = tmp_path / "tags.txt"
    tags.write_text("\n".join(paths) + "\n", encoding="utf-8")
    simulator = Simulator(model, poll_interval=0.1)
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        yield simulator, build_settings({}, {
            "tags": str(tags), "url": simulator.url, "table": str(tmp_path / "table"),
            "state_dir": str(tmp_path / "state"), "flush_seconds": 0.5, "maintenance_interval": 0,
            "rediscover_interval": 0, "log_format": "json", **options})
        nursery.cancel_scope.cancel()


def progress_store(settings) -> ProgressStore:
    app_id = history_app_id(writer_app_id(settings))
    return ProgressStore(progress_path(settings.state_dir, settings.table, app_id), settings.table, app_id)


def read_progress(settings) -> ProgressStore | None:
    store = progress_store(settings)
    return store if store.load() else None


async def wait_for(condition, what: str) -> None:
    """Poll ``condition`` (a function of nothing) until true; the test's fail_after bounds it."""
    for _ in range(100_000):
        if condition():
            print(f"reached: {what}")
            return
        await trio.sleep(0.1)


def history_done(settings, tags: int) -> bool:
    store = read_progress(settings)
    if store is None:
        return False
    latest = store.latest()
    return len(latest) == tags and all(p.done for p in latest.values())


def windows_from(store: ProgressStore, emitted: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Each tag from where its history starts to the end of the live stream (less the last half second, which
    a stop may leave to the next start)."""
    assert store.plan is not None
    starts = {w: store.plan.start_us for w in store.plan.ends}
    return {w: (starts[w], emitted[w] - US // 2) for w in starts}


async def test_live_run_with_backfill_holds_every_value_from_start_minus_duration_once(tmp_path):
    model = SimModel.from_paths(PATHS, rate=5)
    first_start = time.time_ns() // 1000
    scraped: dict[str, float] = {}
    with structlog.testing.capture_logs() as logs:
        async with served(tmp_path, model, PATHS, backfill="45s", metrics_port=0, stats_interval=0.5) \
                as (simulator, settings):
            stop = trio.Event()
            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: run_pipeline(settings, stop, handle_signals=False))
                    await wait_for(lambda: history_done(settings, len(PATHS)), "history read to each first live value")
                    url = next(e["url"] for e in logs if e["event"] == "metrics_served")
                    async with httpx.AsyncClient(timeout=5) as client:
                        for _ in range(1000):  # until the last history commit landed
                            scraped = parse((await client.get(url)).text)
                            if scraped["pistream_backfill_values_total"] == scraped["pistream_backfill_values_read"]:
                                break
                            await trio.sleep(0.1)
                    table = Path(settings.table)
                    stop.set()
            emitted = {w: r.last_us for w, r in simulator.emitted.items()}
    store = read_progress(settings)
    assert store is not None and store.plan is not None
    assert first_start - 45 * US <= store.plan.start_us <= time.time_ns() // 1000 - 45 * US
    for end in store.plan.ends.values():  # each range ends just before the tag's first live value
        assert end != UNPLANNED and end > store.plan.start_us
    found = assert_exactly_once(table, model, windows_from(store, emitted), only_windows=False)
    history_rows = sum(model.count(t, store.plan.start_us, store.plan.ends[t.webid]) for t in model.tags)
    assert history_rows >= 4 * 40 * 5 and found > history_rows  # 45 s of history at 5/s, and the live stream
    # Progress as an operator sees it: /metrics and the stream_stats line.
    assert scraped["pistream_backfill_tags"] == scraped["pistream_backfill_tags_done"] == len(PATHS)
    assert scraped["pistream_backfill_values_total"] == scraped["pistream_backfill_values_read"] == history_rows
    stats = [e for e in logs if e["event"] == "stream_stats"]
    assert stats and all(e["backfill_tags"] == len(PATHS) and 0 <= e["backfill_tags_done"] <= len(PATHS)
                         for e in stats)
    # The history's commits are its own: its app id's transaction version, beside the live writer's.
    dt = DeltaTable(str(table))
    assert dt.transaction_version(history_app_id(writer_app_id(settings))) >= 1
    assert dt.transaction_version(writer_app_id(settings)) >= 1


async def test_a_stop_in_the_middle_of_the_history_resumes_it_without_duplicates(tmp_path, monkeypatch):
    monkeypatch.setattr(history, "ITEMS_PER_PAGE", 200)  # many small pages and commits: a stop lands mid-way
    model = SimModel.from_paths(PATHS, rate=5)
    async with served(tmp_path, model, PATHS, backfill="30m", flush_rows=400) as (simulator, settings):
        with trio.fail_after(300):
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: run_pipeline(settings, stop, handle_signals=False))

                def some_committed() -> bool:
                    store = read_progress(settings)
                    return store is not None and len(store.latest()) == len(PATHS) and max(store.versions) >= 3
                await wait_for(some_committed, "a few history commits")
                stop.set()
            stopped = read_progress(settings)
            assert stopped is not None and not all(p.done for p in stopped.latest().values()), \
                "the history was read whole before the stop: make it longer"
            values_before = sum(p.values for p in stopped.latest().values())
            dt = DeltaTable(settings.table)
            version_before = dt.transaction_version(history_app_id(writer_app_id(settings)))
            assert version_before is not None and version_before >= 3

            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: run_pipeline(settings, stop, handle_signals=False))
                await wait_for(lambda: history_done(settings, len(PATHS)), "history read to the end after a restart")
                stop.set()
        emitted = {w: r.last_us for w, r in simulator.emitted.items()}
    store = read_progress(settings)
    assert store is not None and store.plan is not None
    assert store.plan.start_us == stopped.plan.start_us  # the range of the first start, kept
    assert sum(p.values for p in store.latest().values()) > values_before
    # 30 minutes of history, live before, between (the downtime, read back by the live gap reads) and after
    assert_exactly_once(settings.table, model, windows_from(store, emitted), only_windows=False)


async def test_a_tag_added_while_running_gets_its_history_too(tmp_path):
    model = SimModel.from_paths(PATHS, rate=5)
    async with served(tmp_path, model, PATHS[:2], backfill="20s") as (simulator, settings):
        stop = trio.Event()
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: run_pipeline(settings, stop, handle_signals=False))
                await wait_for(lambda: history_done(settings, 2), "the first two tags' history")
                added_at = time.time_ns() // 1000
                await trio.Path(settings.tags).write_text("\n".join(PATHS[:3]) + "\n", encoding="utf-8")  # one more
                await wait_for(lambda: history_done(settings, 3), "the added tag's history")
                joined = time.time_ns() // 1000
                stop.set()
        emitted = {w: r.last_us for w, r in simulator.emitted.items()}
    store = read_progress(settings)
    assert store is not None and store.plan is not None
    added = model.tags[2].webid
    first_us = store.latest()[added].first_us
    assert first_us is not None
    assert added_at - 20 * US <= first_us <= joined - 20 * US + US  # 20 s before it joined (5 values a second)
    windows = {w: (store.plan.start_us, emitted[w] - US // 2) for w in (t.webid for t in model.tags[:2])}
    windows[added] = (first_us, emitted[added] - US // 2)
    assert_exactly_once(settings.table, model, windows, only_windows=False)
    assert len(duckdb_rows(settings.table, "1", f"WHERE tag_webid = '{added}'")) >= 20 * 5


def test_durations():
    assert parse_duration("30d") == 30 * 86_400 * US
    assert parse_duration("12h") == 12 * 3600 * US
    assert parse_duration("90m") == 90 * 60 * US
    assert parse_duration("45") == parse_duration("45s") == 45 * US


def test_a_bad_duration_is_one_clear_error_exit_2(tmp_path):
    tags = tmp_path / "tags.txt"
    tags.write_text("\\\\SIMSRV\\FLOW01\n", encoding="utf-8")
    for bad in ("30x", "-5d", "0", "d"):
        result = CliRunner().invoke(main, ["--tags", str(tags), "--simulate", "--table", str(tmp_path / "t"),
                                           "--state-dir", str(tmp_path / "s"), "--backfill", bad])
        assert result.exit_code == 2, result.output
        assert "--backfill" in result.output and "30d, 12h, 90m" in result.output
        assert not (tmp_path / "t").exists()  # nothing written


def test_a_progress_file_before_any_tag_joined_resumes(tmp_path):
    """A live backfill stopped before any tag joined its plan (no tag resolved yet, a stop at once): the
    next start reads the empty plan as version 0."""
    from pistream.stream.progress import Plan

    store = ProgressStore(tmp_path / "p.backfill.arrow", "table", "app-history")
    store.start(Plan("30d", "first live value", 1, 2, {}, {}))
    again = ProgressStore(tmp_path / "p.backfill.arrow", "table", "app-history")
    assert again.load() and again.at(0) == {} and again.latest() == {}


async def test_a_lost_progress_file_is_one_clear_error(tmp_path):
    """History commits in the table but no progress file (another --state-dir, a lost disk): resuming blind
    could leave holes, so the start stops and says what to do."""
    import pytest

    from pistream.errors import ConfigError

    model = SimModel.from_paths(PATHS[:2], rate=5)
    async with served(tmp_path, model, PATHS[:2], backfill="10s") as (_, settings):
        with trio.fail_after(120):
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: run_pipeline(settings, stop, handle_signals=False))
                await wait_for(lambda: history_done(settings, 2), "the history")
                stop.set()
            await trio.Path(progress_store(settings).path).unlink()
            with pytest.raises(BaseException) as failed:  # in the root nursery's group: the CLI shows it, exit 2
                await run_pipeline(settings, trio.Event(), handle_signals=False)
            error = failed.value
            while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
                error = error.exceptions[0]
            assert isinstance(error, ConfigError) and error.exit_code == 2
            assert "is missing: restore the state dir it used (--state-dir)" in str(error)


def test_kill_9_in_the_middle_of_the_history_then_a_restart_resumes_every_value_once(tmp_path):
    """The real process: killed (-9) while the history is being read and committed, started again, stopped
    with SIGTERM once the history is done: every value from the first start - 12 h on, once."""
    import os
    import signal
    import subprocess
    import sys

    from sim_thread import simulator_thread

    model = SimModel.from_paths(PATHS, rate=5)  # 12 h x 4 tags x 5/s: 864,000 values of history, 10,000 a call
    tags = tmp_path / "tags.txt"
    tags.write_text("\n".join(PATHS) + "\n", encoding="utf-8")
    settings = build_settings({}, {"tags": str(tags), "table": str(tmp_path / "table"),  # where the process writes
                                   "state_dir": str(tmp_path / "state"), "url": "http://127.0.0.1:9/piwebapi"})
    repo = Path(__file__).resolve().parent.parent

    def start(url: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "pistream", "--tags", str(tags), "--url", url, "--table", settings.table,
                   "--state-dir", settings.state_dir, "--backfill", "12h", "--flush-rows", "20000",
                   "--flush-seconds", "0.5", "--maintenance-interval", "0", "--log-format", "json"]
        return subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(repo)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_until(process: subprocess.Popen, condition, what: str) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None and not condition():
            time.sleep(0.05)
        assert process.poll() is None and condition(), f"not reached: {what}"

    def some_committed() -> bool:
        store = read_progress(settings)
        return store is not None and max(store.versions) >= 3

    with simulator_thread(Simulator(model, poll_interval=0.1)) as sim:
        first = start(sim.url)
        try:
            wait_until(first, some_committed, "a few history commits")
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        finally:
            if first.poll() is None:
                first.kill()
        killed = read_progress(settings)
        assert killed is not None and not all(p.done for p in killed.latest().values()), \
            "the history was read whole before the kill: make it longer"
        second = start(sim.url)
        try:
            wait_until(second, lambda: history_done(settings, len(PATHS)), "the history done after the restart")
            second.send_signal(signal.SIGTERM)
            assert second.wait(60) == 0
        finally:
            if second.poll() is None:
                second.kill()
        emitted = {w: r.last_us for w, r in sim.emitted.items()}
    store = read_progress(settings)
    assert store is not None and store.plan is not None and store.plan.start_us == killed.plan.start_us
    found = assert_exactly_once(settings.table, model, windows_from(store, emitted), only_windows=False)
    assert found >= 864_000 - 4 * 5 * 60  # 12 h of history (less the minute or so before the first start)
