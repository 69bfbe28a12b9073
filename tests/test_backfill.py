"""``pistream backfill`` against the simulator on loopback, the table read back with DuckDB (delta-kernel)
and compared with the simulator's ground truth: every recorded value in each tag's range exactly once —
with page edges inside runs of events at one timestamp, empty tags, a tag the server does not know, 502s
now and then, a ``kill -9`` in the middle, and a live pistream writing the same table.
"""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner
from conftest import compare_with_model, duckdb_rows
from deltalake import DeltaTable
from sim_thread import simulator_thread

import pistream.pi.history as history
import pistream.stream.columns as columns_module
from pistream.backfill import run_backfill
from pistream.cli import main
from pistream.config import build_settings
from pistream.errors import UnknownTagsError
from pistream.pipeline import run_pipeline
from pistream.sim.model import SimModel, SimTag
from pistream.sim.server import Simulator
from pistream.timeutil import parse_iso_us

US = 1_000_000
START, END = "2026-03-01T00:00:00Z", "2026-03-01T00:02:00Z"  # two minutes, long past: fixed ground truth
REPO = Path(__file__).resolve().parent.parent


def archive_model() -> SimModel:
    """Tags at 2 values/s: a float, a tag with 3 events at every timestamp, an int, and a point created
    after the range (no archived value in it: an empty tag)."""
    return SimModel([
        SimTag("FLOW01", "SIMSRV", "float", 0),
        SimTag("STACKED", "SIMSRV", "float", 1, per_time=3),
        SimTag("COUNT01", "SIMSRV", "int", 2),
        SimTag("NEWPOINT", "SIMSRV", "float", 3, since_us=parse_iso_us("2026-06-01T00:00:00Z")),
    ], rate=2)


def range_windows(model: SimModel, start: str = START, end: str = END) -> dict[str, tuple[int, int]]:
    return {t.webid: (parse_iso_us(start), parse_iso_us(end)) for t in model.tags}


@asynccontextmanager
async def served(tmp_path: Path, model: SimModel, paths: list[str] | None = None, **options):
    tags = tmp_path / "tags.txt"
    tags.write_text("\n".join(paths or [t.path for t in model.tags]) + "\n", encoding="utf-8")
    simulator = Simulator(model, poll_interval=0.1)
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        yield simulator, build_settings({}, {
            "tags": str(tags), "url": simulator.url, "table": str(tmp_path / "table"),
            "state_dir": str(tmp_path / "state"), "start": START, "end": END, "log_format": "json", **options})
        nursery.cancel_scope.cancel()


def assert_exactly_once(table: str, model: SimModel, windows: dict[str, tuple[int, int]], *,
                        only_windows: bool = True) -> int:
    """Every event of each window once; with ``only_windows``, nothing else in the table; and no event
    twice anywhere."""
    result = compare_with_model(table, model, windows)
    print(result.summary())
    assert result.missing == [] and result.duplicates == [] and result.unexpected == []
    if only_windows:
        assert result.found == result.expected
    repeated = duckdb_rows(table, "count(*)", f"GROUP BY {KEY_SQL} HAVING count(*) > 1")
    assert repeated == []
    return result.found


KEY_SQL = "tag_webid, timestamp, value, value_text, state_code, good, questionable, substituted, annotated"


@pytest.mark.parametrize("codec", [True, False], ids=["columns", "msgspec"])
async def test_page_edges_inside_equal_timestamps_empty_tags_and_a_rerun_adds_nothing(tmp_path, monkeypatch, codec):
    # 58 values a call: 14 per tag for 4 tags, then 19 for 3: pages end inside STACKED's runs of 3 events
    monkeypatch.setattr(history, "ITEMS_PER_PAGE", 58)
    if not codec:  # pages through msgspec and a Python object per value (no C codec built)
        monkeypatch.setattr(columns_module, "_framecodec", None)
    in_columns = []
    advance_columns = history.HistoryReader._advance_columns

    def counted(self, *args):
        page = advance_columns(self, *args)
        in_columns.append(page is not None)
        return page

    monkeypatch.setattr(history.HistoryReader, "_advance_columns", counted)
    model = archive_model()
    async with served(tmp_path, model, flush_rows=100) as (simulator, settings):
        with trio.fail_after(120):
            summary = await run_backfill(settings, handle_signals=False, progress_bar=False)
            found = assert_exactly_once(settings.table, model, range_windows(model))
            stacked = model.tags[1]
            in_range = model.count(stacked, parse_iso_us(START), parse_iso_us(END))
            assert in_range >= 720 and in_range % 3 == 0  # 3 events at each of 240+ timestamps
            assert len(duckdb_rows(settings.table, "1", f"WHERE tag_webid = '{stacked.webid}'")) == in_range
            assert len({r[0] for r in duckdb_rows(settings.table, "timestamp", f"WHERE tag_webid = '{stacked.webid}'")}) \
                == in_range // 3
            assert summary.complete and summary.tags_done == 4 and not summary.failed
            assert summary.empty_tags == [model.tags[3].path]
            assert summary.values_read == summary.values_written == found
            assert summary.commits > 5  # committed every ~100 values, not once at the end
            assert summary.first == "2026-03-01T00:00:00Z" and summary.last is not None
            per_tag = await trio.Path(summary.summary_file or "").read_text(encoding="utf-8")
            assert "NEWPOINT,0,,," in per_tag and f"STACKED,{in_range}," in per_tag

            files = sorted(DeltaTable(settings.table).file_uris())
            again = await run_backfill(settings, handle_signals=False, progress_bar=False)
    assert again.complete and again.values_written == 0 and again.commits == 0
    assert sorted(DeltaTable(settings.table).file_uris()) == files  # only the writer claim's empty commits came
    assert_exactly_once(settings.table, model, range_windows(model))
    assert (len(in_columns) > 10 and all(in_columns)) if codec and columns_module.FRAME_CODEC else not in_columns


async def test_502_now_and_then_is_retried_and_every_value_lands_once(tmp_path, monkeypatch):
    monkeypatch.setattr(history, "ITEMS_PER_PAGE", 40)
    model = archive_model()
    async with served(tmp_path, model) as (simulator, settings):
        armed = 0

        async def flaky() -> None:  # a 502 now and then: about one call in four
            nonlocal armed
            armed_at = 0
            while True:
                if simulator.requests_served - armed_at >= 3 and not any(f.remaining for f in simulator.faults.rest_faults):
                    simulator.faults.fail_rest(502, 1, prefix="streamsets/recorded", retry_after=None)
                    armed, armed_at = armed + 1, simulator.requests_served
                await trio.sleep(0.01)

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flaky)
                summary = await run_backfill(settings, handle_signals=False, progress_bar=False)
                nursery.cancel_scope.cancel()
        answered_502 = simulator.faults.rest_faults_served
    assert summary.complete and not summary.failed
    assert answered_502 >= 5 and armed >= answered_502  # the backfill met 502s and went on
    assert_exactly_once(settings.table, model, range_windows(model))


async def test_a_tag_the_server_does_not_know(tmp_path):
    model = archive_model()
    paths = [t.path for t in model.tags] + ["\\\\SIMSRV\\NO.SUCH.TAG"]
    async with served(tmp_path, model, paths) as (simulator, settings):
        with trio.fail_after(60):
            with pytest.raises(BaseExceptionGroup) as failure:
                await run_backfill(settings, handle_signals=False, progress_bar=False)
            assert failure.group_contains(UnknownTagsError, match="NO.SUCH.TAG", depth=None)
            assert not (tmp_path / "table").exists()  # nothing written before the tags are known
            skipping = build_settings({}, {**{f: getattr(settings, f) for f in ("tags", "url", "table", "state_dir",
                                                                                   "start", "end")},
                                           "skip_unknown": True})
            summary = await run_backfill(skipping, handle_signals=False, progress_bar=False)
    assert summary.complete and summary.tags == 4
    assert_exactly_once(settings.table, model, range_windows(model))


def test_cli_unknown_tag_and_bad_times_exit_2(tmp_path):
    model = archive_model()
    tags = tmp_path / "tags.txt"
    tags.write_text(model.tags[0].path + "\n\\\\SIMSRV\\NO.SUCH.TAG\n", encoding="utf-8")
    with simulator_thread(Simulator(model)) as sim:
        common = ["backfill", "--tags", str(tags), "--url", sim.url, "--table", str(tmp_path / "t"),
                  "--state-dir", str(tmp_path / "s"), "--log-format", "json"]
        unknown = CliRunner().invoke(main, [*common, "--start", START, "--end", END])
        bad_time = CliRunner().invoke(main, [*common, "--start", "last tuesday"])
        backwards = CliRunner().invoke(main, [*common, "--start", END, "--end", START])
        no_start = CliRunner().invoke(main, common)
    assert unknown.exit_code == 2 and "NO.SUCH.TAG" in unknown.output and "--skip-unknown" in unknown.output
    assert bad_time.exit_code == 2 and "last tuesday" in bad_time.output and "*-30d" in bad_time.output
    assert backwards.exit_code == 2 and "is after --end" in backwards.output
    assert no_start.exit_code == 2 and "needs --start" in no_start.output


def _backfill_process(url: str, tmp_path: Path, *args: str, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "pistream", "backfill", "--tags", str(tmp_path / "tags.txt"), "--url", url,
               "--table", str(tmp_path / "table"), "--state-dir", str(tmp_path / "state"), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, cwd=tmp_path, env=env, **popen)


def test_kill_9_in_the_middle_then_the_same_command_resumes_every_value_once(tmp_path):
    # 8 tags x 12 h at 1 value/s: 345,600 values, 10,000 a call; at most 2 calls a second (429 beyond),
    # a commit every 20,000 values: several commits before the kill, several after
    model = SimModel.generated(8, rate=1)
    (tmp_path / "tags.txt").write_text("\n".join(t.path for t in model.tags) + "\n", encoding="utf-8")
    start, end = "2026-03-01T00:00:00Z", "2026-03-01T12:00:00Z"
    args = ("--start", start, "--end", end, "--flush-rows", "20000", "--concurrency", "2", "--log-format", "json")
    with simulator_thread(Simulator(model, rate_limit=2)) as sim:
        first = _backfill_process(sim.url, tmp_path, *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and first.poll() is None:
                if (tmp_path / "table" / "_delta_log").exists() and DeltaTable(str(tmp_path / "table")).version() >= 3:
                    break
                time.sleep(0.05)
            assert first.poll() is None, "the backfill ended before it could be killed"
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        finally:
            if first.poll() is None:
                first.kill()
        rows_at_kill = len(duckdb_rows(tmp_path / "table", "1"))
        assert 0 < rows_at_kill < 345_600
        second = _backfill_process(sim.url, tmp_path, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-2000:]
    assert "backfill_resumed" in err and '"event": "backfill_progress"' in err
    values = sum(model.count(t, parse_iso_us(start), parse_iso_us(end)) for t in model.tags)
    assert "complete" in out and f"{values:,} values read in all runs" in out
    assert_exactly_once(str(tmp_path / "table"), model, range_windows(model, start, end))


async def test_backfill_beside_a_live_writer_leaves_every_value_once(tmp_path):
    model = SimModel.from_paths(["\\\\SIMSRV\\FLOW01", "\\\\SIMSRV\\LEVEL02", "\\\\SIMSRV\\PUMP.MODE",
                                 "\\\\SIMSRV\\BATCH.TEXT"], rate=5)
    stop_live = trio.Event()
    async with served(tmp_path, model, flush_seconds=0.5) as (simulator, settings):
        live = build_settings({}, {"tags": settings.tags, "url": settings.url, "table": settings.table,
                                   "state_dir": str(tmp_path / "live-state"), "flush_seconds": 0.5,
                                   "maintenance_interval": 0, "log_format": "json"})
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: run_pipeline(live, stop_live, handle_signals=False))
                table = Path(settings.table)
                for _ in range(600):  # the live stream has committed values of every tag
                    if (table / "_delta_log").exists() and len(duckdb_rows(table, "DISTINCT tag_webid")) == len(model.tags):
                        break
                    await trio.sleep(0.2)
                backfill_start = time.time_ns() // 1000 - 30 * US
                beside = build_settings({}, {**{f: getattr(settings, f) for f in ("tags", "url", "table")},
                                             "state_dir": str(tmp_path / "backfill-state"),
                                             "start": "*-30s", "end": "*", "log_format": "json"})
                summary = await run_backfill(beside, handle_signals=False, progress_bar=False)
                await trio.sleep(1.0)  # the live stream goes on past the backfill's end
                stop_live.set()
        emitted = {w: r.last_us for w, r in simulator.emitted.items()}
    assert summary.complete and summary.values_written > 0
    windows = {t.webid: (backfill_start + US, emitted[t.webid] - 500_000) for t in model.tags}
    assert_exactly_once(settings.table, model, windows, only_windows=False)  # the live tail is in the table too


def test_progress_bar_on_a_terminal(tmp_path):
    """On a real terminal (a pty): tqdm's bar with percent, tags done/total, values and values/s."""
    model = SimModel.generated(3, rate=1)
    (tmp_path / "tags.txt").write_text("\n".join(t.path for t in model.tags) + "\n", encoding="utf-8")
    with simulator_thread(Simulator(model)) as sim:
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 140, 0, 0))  # 30 x 140 characters
        process = _backfill_process(sim.url, tmp_path, "--start", "2026-03-01", "--end", "2026-03-01T06:00:00Z",
                                    stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
        os.close(follower)
        screen = b""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process ended
                break
            if not chunk:
                break
            screen += chunk
        process.wait(30)
        os.close(leader)
    text = screen.decode("utf-8", "replace")
    print(text[-3000:])
    assert process.returncode == 0
    values = sum(model.count(t, parse_iso_us("2026-03-01T00:00:00Z"), parse_iso_us("2026-03-01T06:00:00Z"))
                 for t in model.tags)
    assert "backfill: 100.0%|" in text and "tags 3/3" in text and f"{values:,} values" in text
    assert "values/s" in text and "\r" in text  # redrawn in place
    assert "complete" in text


@pytest.mark.parametrize("codec", [True, False], ids=["columns", "msgspec"])
async def test_more_events_at_one_timestamp_than_a_page_holds(tmp_path, monkeypatch, codec):
    """25 events at every timestamp, 10 values a call: a page that brings only events already read at the
    tag's cursor is read again alone with bigger pages (20, then 40), not taken for the tag's end."""
    monkeypatch.setattr(history, "ITEMS_PER_PAGE", 10)
    if not codec:
        monkeypatch.setattr(columns_module, "_framecodec", None)
    model = SimModel([SimTag("CROWDED", "SIMSRV", "float", 0, per_time=25)], rate=1)
    end = "2026-03-01T00:00:05Z"
    async with served(tmp_path, model, end=end) as (simulator, settings):
        with trio.fail_after(60):
            summary = await run_backfill(settings, handle_signals=False, progress_bar=False)
    found = assert_exactly_once(settings.table, model, range_windows(model, end=end))
    assert found == 25 * 6 and summary.complete and not summary.failed
