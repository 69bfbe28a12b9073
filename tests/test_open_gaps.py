"""Gaps still open when pistream stops or crashes: the channels came back and their live values were
committed (the tags' floors are past the gaps), but the archive read of what they missed had not finished.
The next start reads them again, and the table ends up with every event exactly once."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import trio
from conftest import compare_with_model
from test_end_to_end import PATHS, served, windows_of

from pistream.errors import SinkError
from pistream.lake.sink import DeltaSink
from pistream.lake.writer import CommitWriter
from pistream.pi.flow import GapRequest
from pistream.pi.messages import StreamValues, TimedValue
from pistream.pipeline import recover_open_gaps, run_pipeline
from pistream.sim.model import SimModel
from pistream.sim.server import Simulator
from pistream.stream.buffer import ColumnBuffer, Flush, StreamInfo
from pistream.stream.dedup import EventFilter, event_key
from pistream.stream.floors import TagIds
from pistream.stream.opengaps import OpenGaps
from pistream.stream.state import StateStore, state_path
from pistream.timeutil import format_iso

T0 = 1_700_000_000_000_000


def cut_channels_with_gap_reads_stuck(simulator: Simulator) -> None:
    """The channels stay down for a moment (what they miss is only in the archive) while every archive
    read fails with a long Retry-After: the gaps stay open until the run ends."""
    simulator.faults.fail_rest(503, count=1000, prefix="streamsets/recorded", retry_after=60)
    simulator.faults.reject_channels(503, count=1)


def commits_in(table: Path) -> int:
    log_dir = table / "_delta_log"
    return len(list(log_dir.glob("*.json"))) if log_dir.exists() else 0


async def wait_for_commits(table: Path, count: int) -> None:
    while commits_in(table) < count:  # noqa: ASYNC110 - another process writes the table
        await trio.sleep(0.1)


async def test_gaps_open_at_a_clean_stop_are_read_back_on_the_next_start(tmp_path):
    model = SimModel.from_paths(PATHS, rate=20)
    with trio.fail_after(60):
        async with served(tmp_path, model, duration=6, flush_seconds=0.5, app_id="gaps") as (
                simulator, settings):

            async def cut_once() -> None:
                await wait_for_commits(Path(settings.table), 3)  # the tags have floors
                cut_channels_with_gap_reads_stuck(simulator)
                await simulator.drop_channels()

            async with trio.open_nursery() as faults:
                faults.start_soon(cut_once)
                first = await run_pipeline(settings, handle_signals=False)
            simulator.faults.reset()  # the archive answers again
            await trio.sleep(1)
            second = await run_pipeline(settings, handle_signals=False)
    result = compare_with_model(settings.table, model, windows_of(simulator))
    print(result.summary(), first, second)
    assert result.missing == [] and result.duplicates == [] and result.unexpected == [], result.summary()
    assert first.gaps_filled >= len(PATHS) and first.gap_values == 0  # the reads began, none came back
    # read again: the cut's gaps and the downtime's, one per tag each
    assert second.gaps_filled >= 2 * len(PATHS) and second.gaps_lost == 0


async def test_gaps_open_at_a_crash_are_read_back_on_the_next_start(tmp_path):
    """The same with SIGKILL: no last flush, and a state file older than the table."""
    model = SimModel.from_paths(PATHS, rate=20)
    table = tmp_path / "table"
    log_path = tmp_path / "pistream.log"
    with trio.fail_after(90):
        async with served(tmp_path, model, duration=3, flush_seconds=0.5, app_id="gaps") as (
                simulator, settings):
            command = [sys.executable, "-m", "pistream", "--tags", str(tmp_path / "tags.txt"),
                       "--url", simulator.url, "--table", str(table), "--state-dir", str(tmp_path / "state"),
                       "--flush-seconds", "0.5", "--app-id", "gaps", "--log-format", "json"]
            log_file = await trio.to_thread.run_sync(open, log_path, "wb")
            with log_file:
                process = await trio.lowlevel.open_process(command, stdout=subprocess.DEVNULL, stderr=log_file)
                try:
                    await wait_for_commits(table, 3)  # the table exists, the state file was saved once
                    cut_channels_with_gap_reads_stuck(simulator)
                    await simulator.drop_channels()
                    await trio.sleep(1)
                    await wait_for_commits(table, commits_in(table) + 4)  # live values since the reconnect
                    process.kill()  # SIGKILL while the gaps are still being read
                    await process.wait()
                finally:
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
            assert process.returncode == -signal.SIGKILL
            assert '"event": "gap_read_retried"' in log_path.read_text()
            simulator.faults.reset()
            await trio.sleep(1)
            second = await run_pipeline(settings, handle_signals=False)
    result = compare_with_model(settings.table, model, windows_of(simulator))
    print(result.summary(), second)
    assert result.missing == [] and result.duplicates == [] and result.unexpected == [], result.summary()
    assert second.gaps_filled >= 2 * len(PATHS) and second.gaps_lost == 0


# -- the pieces --------------------------------------------------------------------------------------------

def key(ts: int, value: float = 1.0) -> tuple:
    return event_key(ts, value, None, None, True, False, False, False)


def values(webid: str, *stamps: int) -> StreamValues:
    return StreamValues(web_id=webid, items=[TimedValue(timestamp=format_iso(ts), value=1.0) for ts in stamps])


def test_a_reopened_window_takes_only_the_events_the_table_lacks():
    f = EventFilter()
    f.floors["W"] = 900  # the live values after the reconnect were committed
    f.reopen(GapRequest("W", 100, 500), [key(100), key(300), key(500)])
    assert f.in_gap("W") and f.open_windows().requests() == {GapRequest("W", 100, 500)}
    assert [f.accept_gap("W", key(ts)) for ts in (100, 200, 300, 400, 500, 600)] == [
        False, True, False, True, False, False]
    f.gap_done(GapRequest("W", 100, 500))
    assert f.open_gaps() == 0 and not len(f.open_windows())


def test_a_take_carries_the_windows_being_read_and_not_the_tags_awaiting_their_end():
    buffer = ColumnBuffer({w: StreamInfo(f"\\\\S\\{w}", w) for w in ("A", "B")})
    for webid in ("A", "B"):
        buffer.filter.advance(webid, key(T0))
    buffer.connected(["A", "B"])
    buffer.add_live(values("A", T0 + 300), 0)  # A's window closes at its first live value; B still waits
    flush = buffer.take()
    assert flush is not None and flush.open_gaps.requests() == {GapRequest("A", T0, T0 + 300)}
    assert flush.floors == {"A": T0 + 300}  # the floor that makes the gap worth keeping


def test_open_gaps_as_columns_compare_and_join_as_sets_do():
    tags = TagIds()
    a, b, c = GapRequest("A", 100, 500), GapRequest("B", 7, 9), GapRequest("A", 600, 700)
    first = OpenGaps.of([c, a, b, a], tags)  # any order, a repeat
    assert len(first) == 3 and first.requests() == {a, b, c}
    assert first == OpenGaps.of([b, c, a], tags) and first != OpenGaps.of([a, b], tags)
    second = OpenGaps.of([b, GapRequest("C", 1, 2)], tags)
    assert (first | second).requests() == {a, b, c, GapRequest("C", 1, 2)}
    assert (first | OpenGaps.empty(tags)) is first and (OpenGaps.empty(tags) | first) is first
    other = OpenGaps.of([GapRequest("Z", 1, 2), a])  # another registry: joined and compared by webId
    assert (first | other).requests() == {a, b, c, GapRequest("Z", 1, 2)}
    assert OpenGaps.of([a, b, c]) == first


def test_the_filter_makes_its_open_gaps_again_only_after_a_window_opened_or_closed():
    f = EventFilter()
    f.floors["W"] = 900
    f.reopen(GapRequest("W", 100, 500), [])
    snapshot = f.open_windows()
    assert f.open_windows() is snapshot and snapshot.requests() == {GapRequest("W", 100, 500)}
    f.reopen(GapRequest("W", 600, 800), [])  # a second window of the same tag
    assert f.open_windows().requests() == {GapRequest("W", 100, 500), GapRequest("W", 600, 800)}
    f.gap_done(GapRequest("W", 100, 500))
    assert f.open_windows().requests() == {GapRequest("W", 600, 800)}
    assert snapshot.requests() == {GapRequest("W", 100, 500)}  # a batch's snapshot never changes


def test_open_gaps_file_round_trips_and_belongs_to_one_table_and_writer(tmp_path):
    path = state_path(tmp_path, "table", "app")
    store = StateStore(path, "table", "app")
    assert store.load_gaps() == []
    gaps = {GapRequest("W", 100, 500), GapRequest("W", 700, 900), GapRequest("\\\\ü", 1, 2)}
    store.save_gaps(gaps)
    assert set(store.load_gaps()) == gaps and len(store.load_gaps()) == 3
    assert StateStore(path, "other table", "app").load_gaps() == []
    store.save_gaps(set())
    assert store.load_gaps() == []
    store.gaps_path.write_bytes(b"not arrow")
    assert store.load_gaps() == []


def test_recovered_gaps_know_the_events_the_table_holds_in_them(tmp_path):
    sink = DeltaSink(str(tmp_path / "table"), "app")
    sink.open()
    buffer = ColumnBuffer({w: StreamInfo(f"\\\\S\\{w}", w) for w in ("W", "X")})
    day = 86_400_000_000
    buffer.add_live(values("W", T0, T0 + day, T0 + 2 * day, T0 + 3 * day), 0)  # four partitions
    buffer.add_live(values("X", T0 + day), 0)
    assert not sink.commit(buffer.take().batch, 1).skipped
    store = StateStore(state_path(tmp_path, sink.display_uri, "app"), sink.display_uri, "app")
    gap = GapRequest("W", T0 + day, T0 + 2 * day)
    store.save_gaps({gap})
    recovered = recover_open_gaps(sink, store)
    assert recovered.keys() == {gap} and sorted(recovered[gap]) == [key(T0 + day), key(T0 + 2 * day)]


class FailingOnceSink(DeltaSink):
    """A real Delta sink whose first commit fails: the open-gaps file is looked at meanwhile."""

    def __init__(self, *args, store: StateStore, **kwargs):
        super().__init__(*args, **kwargs)
        self.store = store
        self.seen: list[set[GapRequest]] = []

    def commit(self, batch, txn_version, written_ahead=()):
        self.seen.append(set(self.store.load_gaps()))
        if len(self.seen) == 2:
            raise SinkError("storage unavailable (injected)")
        return super().commit(batch, txn_version, written_ahead)


async def test_the_writer_saves_the_open_gaps_before_the_commit_that_needs_them(tmp_path):
    store = StateStore(state_path(tmp_path, "t", "app"), "t", "app")
    sink = FailingOnceSink(str(tmp_path / "table"), "app", store=store)
    sink.open()
    old, new = GapRequest("A", T0, T0 + 10), GapRequest("B", T0 + 5, T0 + 20)
    send, receive = trio.open_memory_channel[Flush](0)
    writer = CommitWriter(sink, receive, txn_version=0, committed=EventFilter(), state=store)
    writer.backoff.initial = 0.01

    def flush(*gaps: GapRequest) -> Flush:
        buffer = ColumnBuffer({"A": StreamInfo("\\\\S\\A", "A")})
        buffer.add_live(values("A", T0 + 100), 0)
        taken = buffer.take()
        assert taken is not None
        taken.open_gaps = OpenGaps.of(gaps)
        return taken

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            async with send:
                await send.send(flush(old))
                await send.send(flush(new))  # `old` closed, `new` opened; the first attempt fails
                await send.send(flush(new))
    # Before each attempt: the gaps of the last commit and of the one about to land (the retry of the
    # second commit too: the first one's are kept until a commit without them has landed).
    assert sink.seen == [{old}, {old, new}, {old, new}, {new}]
    assert writer.stats.commits == 3 and writer.stats.failed_attempts == 1
    assert store.load_gaps() == [new]  # a clean stop keeps only the gaps still open
