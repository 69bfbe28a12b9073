"""Simulator -> pipeline -> Delta table on loopback, compared with the simulator's ground truth."""

from __future__ import annotations

import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pyarrow.compute as pc
import pytest
import structlog
import trio
from conftest import compare_with_model, streamed_for
from deltalake import DeltaTable

import pistream.lake.writer as writer_module
import pistream.stream.flusher as flusher_module
from pistream.backoff import Backoff
from pistream.config import build_settings
from pistream.errors import SinkError
from pistream.lake.sink import DeltaSink
from pistream.pi.channel import ChannelReader
from pistream.pi.flow import Live, LiveBatch
from pistream.pi.piwebapi import PiWebApi
from pistream.pi.webid import path_webid
from pistream.pipeline import run_pipeline
from pistream.sim.model import SimModel
from pistream.sim.server import Simulator

PATHS = [
    "\\\\SIMSRV\\SINUSOID", "\\\\SIMSRV\\CDT158", "\\\\SIMSRV\\PUMP01.MODE", "\\\\SIMSRV\\BATCH.ID",
    "\\\\SIMSRV\\PACKAGER.COUNT", "\\\\SIMSRV\\REACTOR.STATE", "\\\\SIMSRV\\OPERATOR.TEXT", "\\\\SIMSRV\\TI-101",
]
TAIL_US = 500_000  # values sent in the last moments before stop may still be on the wire


@asynccontextmanager
async def served(tmp_path, model: SimModel, paths: list[str] | None = None, **options):
    """A simulator for ``model`` on loopback, and pistream settings (tags file, table, state dir) for it."""
    tags = tmp_path / "tags.txt"
    tags.write_text("\n".join(paths or [t.path for t in model.tags]) + "\n", encoding="utf-8")
    simulator = Simulator(model, poll_interval=0.1)
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.run)
        yield simulator, build_settings({}, {"tags": str(tags), "url": simulator.url,
                                             "table": str(tmp_path / "table"),
                                             "state_dir": str(tmp_path / "state"), **options})
        nursery.cancel_scope.cancel()


def windows_of(simulator: Simulator) -> dict[str, tuple[int, int]]:
    """Per tag, the emitted range that must be in the table (the last moments may be on the wire)."""
    return {w: (r.first_us, r.last_us - TAIL_US) for w, r in simulator.emitted.items()}


async def run_against_simulator(tmp_path, model: SimModel, **options):
    async with served(tmp_path, model, **options) as (simulator, settings):
        summary = await run_pipeline(settings, handle_signals=False)
    return settings.table, summary, simulator, windows_of(simulator)


async def test_every_emitted_event_lands_exactly_once(tmp_path):
    model = SimModel.from_paths(PATHS, rate=20)
    stop = trio.Event()
    with trio.fail_after(60):
        async with served(tmp_path, model, flush_seconds=0.5) as (simulator, settings):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(streamed_for, simulator, len(PATHS), 3.0, stop)
                summary = await run_pipeline(settings, stop, handle_signals=False)
        table, windows = settings.table, windows_of(simulator)
    result = compare_with_model(table, model, windows)
    print(result.summary())
    assert len(windows) == len(PATHS)
    assert result.expected >= len(PATHS) * 20 * 2
    assert result.missing == [] and result.duplicates == [] and result.unexpected == []
    assert result.tags_with_rows == len(PATHS)
    assert summary.values_written == result.found
    assert summary.values_received == summary.values_written + summary.repeats_dropped + summary.rejected
    assert summary.commits >= 3  # flushed on age during the run, not only at shutdown

    # delta-rs reads the same rows, with the partition column derived from the event time
    dt = DeltaTable(table)
    data = dt.to_pyarrow_table()
    assert data.num_rows == result.found
    assert pc.all(pc.equal(pc.cast(data["timestamp"], "date32"), data["partition_date"])).as_py()
    assert dt.metadata().partition_columns == ["partition_date"]


async def test_size_trigger_and_second_run_appends_with_next_txn_version(tmp_path):
    model = SimModel.from_paths(PATHS[:4], rate=50)
    with trio.fail_after(60):
        table, first, *_ = await run_against_simulator(tmp_path, model, duration=1.5, flush_rows=40,
                                                       flush_seconds=60, app_id="test-writer")
        _, second, *_ = await run_against_simulator(tmp_path, model, duration=1, flush_rows=40,
                                                    flush_seconds=60, app_id="test-writer")
    assert first.commits >= 2
    dt = DeltaTable(table)
    assert dt.transaction_version("test-writer") == first.commits + second.commits
    assert dt.to_pyarrow_table().num_rows == first.values_written + second.values_written


async def test_restart_reads_back_the_downtime_exactly_once(tmp_path):
    """Stop, let the plant run on for a while, start again: the downtime comes back from the archive,
    and the overlap (initial values, the events at each tag's floor) is not written twice."""
    model = SimModel.from_paths(PATHS, rate=20)
    summaries = []
    with trio.fail_after(60):
        async with served(tmp_path, model, duration=1.5, flush_seconds=0.5) as (simulator, settings):
            for _ in range(3):
                summaries.append(await run_pipeline(settings, handle_signals=False))
                await trio.sleep(1.5)  # downtime: the channel would never replay these values
    result = compare_with_model(settings.table, model, windows_of(simulator))
    print(result.summary(), [(s.gaps_filled, s.gap_values) for s in summaries])
    assert result.missing == [] and result.duplicates == [] and result.unexpected == []
    assert summaries[0].gaps_filled == 0
    assert all(s.gaps_filled == len(PATHS) and s.gap_values >= len(PATHS) * 20 for s in summaries[1:])
    assert all(s.gaps_lost == 0 for s in summaries)


async def test_lost_state_file_is_rebuilt_from_the_table(tmp_path):
    model = SimModel.from_paths(PATHS[:3], rate=20)
    with trio.fail_after(60):
        async with served(tmp_path, model, duration=1.5) as (simulator, settings):
            await run_pipeline(settings, handle_signals=False)
            for state_file in (tmp_path / "state").iterdir():
                state_file.unlink()
            await trio.sleep(1)
            second = await run_pipeline(settings, handle_signals=False)
    result = compare_with_model(settings.table, model, windows_of(simulator))
    assert result.missing == [] and result.duplicates == [] and result.unexpected == []
    assert second.gaps_filled == 3


async def test_dropped_channels_reconnect_and_the_gap_is_read_back(tmp_path):
    model = SimModel.generated(40, rate=10)
    stop = trio.Event()
    with trio.fail_after(90), structlog.testing.capture_logs() as logs:
        async with served(tmp_path, model, flush_seconds=0.5, max_url_length=600) as (simulator, settings):

            async def drop_twice_then_stop():
                for _ in range(2):
                    await trio.sleep(2)
                    await simulator.drop_channels()
                # Stop once both drops' gaps were read back: a gap still open at a stop is read by the next
                # start (tests/test_open_gaps.py), and this test has none.
                for _ in range(600):
                    if sum(e.get("tags", 0) for e in logs if e["event"] == "gap_filled") >= 2 * len(model.tags):
                        break
                    await trio.sleep(0.1)
                stop.set()

            async with trio.open_nursery() as faults:
                faults.start_soon(drop_twice_then_stop)
                summary = await run_pipeline(settings, stop, handle_signals=False)
                faults.cancel_scope.cancel()
    result = compare_with_model(settings.table, model, windows_of(simulator))
    print(result.summary(), summary)
    assert summary.channels >= 2  # the short URL limit split the tags over several channels
    assert result.missing == [] and result.duplicates == [] and result.unexpected == []
    assert summary.gaps_filled >= 2 * len(model.tags) and summary.gaps_lost == 0


class OutageSink(DeltaSink):
    """A real Delta sink whose storage is 'down' (commits fail) between two moments: fault injection."""

    def __init__(self, *args, down_from: float, down_until: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.down_from, self.down_until = down_from, down_until
        self.refused = 0

    def commit(self, batch, txn_version, written_ahead=()):
        if self.down_from <= time.monotonic() < self.down_until:
            self.refused += 1
            raise SinkError("storage unavailable (injected)")
        return super().commit(batch, txn_version, written_ahead)


async def test_storage_outage_pauses_channels_and_loses_nothing(tmp_path):
    model = SimModel.from_paths(PATHS, rate=50)
    now = time.monotonic()
    sink = OutageSink(str(tmp_path / "table"), "outage-test", down_from=now + 1, down_until=now + 5)
    with trio.fail_after(60):
        async with served(tmp_path, model, duration=9, flush_seconds=0.2, flush_rows=100,
                          stall_seconds=1) as (simulator, settings):
            summary = await run_pipeline(settings, handle_signals=False, sink=sink)
    result = compare_with_model(settings.table, model, windows_of(simulator))
    print(result.summary(), summary)
    assert sink.refused >= 2 and summary.failed_commits == sink.refused
    assert summary.channel_pauses >= 1  # the readers stopped instead of piling values up
    assert summary.gaps_filled >= len(PATHS) and summary.gaps_lost == 0
    assert result.missing == [] and result.duplicates == [] and result.unexpected == []


async def test_unknown_tags_reported_together_and_skip_unknown_goes_on(tmp_path):
    model = SimModel.from_paths(PATHS[:2], rate=10)
    wanted = PATHS[:2] + [f"\\\\SIMSRV\\TYPO{i}" for i in range(7)] + ["\\\\AF01\\DB\\Pump|Missing"]
    with trio.fail_after(30):
        async with served(tmp_path, model, wanted, duration=1) as (_, settings):
            with pytest.raises(BaseException) as info:
                await run_pipeline(settings, handle_signals=False)
            summary = await run_pipeline(msgspec.structs.replace(settings, skip_unknown=True),
                                         handle_signals=False)
    error = info.value
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    listing = tmp_path / "state" / "unknown-tags.txt"
    assert str(error).startswith("8 of 10 tags are not known to PI Web API: \\\\SIMSRV\\TYPO0, ")
    assert f"and 3 more (all of them in {listing})" in str(error)
    assert listing.read_text().split() == wanted[2:]
    assert summary.tags == 2 and summary.values_written > 0


async def test_resolution_keeps_the_listed_order_with_one_str_per_unit(tmp_path):
    """Points and AF attributes, unknown paths among them: parallel lists in the listed order (no object per
    tag), the client-computed WebIDs, and each distinct unit once."""
    paths = [PATHS[0], "\\\\AF01\\DB\\Pump|Flow", PATHS[1], PATHS[7], "\\\\AF01\\DB\\Pump|Temperature"]
    model = SimModel.from_paths(paths, rate=1)
    wanted = [paths[0], "\\\\SIMSRV\\TYPO", *paths[1:3], "\\\\AF01\\DB\\Pump|Missing", *paths[3:]]
    with trio.fail_after(30):
        async with served(tmp_path, model) as (simulator, _), PiWebApi(simulator.url) as api:
            resolved, unknown = await api.resolve(wanted)
    assert resolved.paths == paths and len(resolved) == 5
    assert unknown == ["\\\\SIMSRV\\TYPO", "\\\\AF01\\DB\\Pump|Missing"]
    assert resolved.webids == [path_webid(p) for p in paths]
    units = {t.path: t.units or None for t in model.tags}
    assert resolved.uoms == [units[p] for p in paths] == ["degC"] * 5
    assert len({id(u) for u in resolved.uoms}) == 1  # one str for the unit all five share


async def test_a_channel_reader_holds_no_frame_while_it_awaits_the_next():
    """At 100,000 tags a reader that kept its last frames held ~30 MB (559 channels x ~54 KB) for nothing."""
    model = SimModel.from_paths(PATHS[:1], rate=1)  # a frame a second: the reader waits between them
    simulator = Simulator(model, poll_interval=0.1)
    send, receive = trio.open_memory_channel(100)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(simulator.run)
            reader = ChannelReader("c", simulator.url, [t.webid for t in model.tags], send, raw_frames=True)
            nursery.start_soon(reader.run)
            frames: list[str | bytes] = []
            while not frames:
                item = await receive.receive()
                lives = item.messages if isinstance(item, LiveBatch) else [item] if isinstance(item, Live) else []
                frames = [live.frame for live in lives if live.frame is not None]
                del item, lives
            await trio.lowlevel.checkpoint()  # the run loop lets go of the item handed over
            # Only the list and getrefcount's argument: nothing of the reader's still points at them.
            assert [sys.getrefcount(frame) for frame in frames] == [3] * len(frames)
            nursery.cancel_scope.cancel()


async def test_a_batch_spilled_in_parts_lands_in_one_commit_exactly_once(tmp_path, monkeypatch):
    """Rows spilled to data files ahead of their commit (``buffer.Spill``) become visible only with it: each
    commit adds several files, and the table holds every event once."""
    monkeypatch.setattr(flusher_module, "SPILL_ROWS", 25)
    model = SimModel.from_paths(PATHS, rate=20)
    with trio.fail_after(60):
        table, summary, simulator, windows = await run_against_simulator(
            tmp_path, model, duration=3, flush_seconds=1.0, flush_rows=100_000)
    result = compare_with_model(table, model, windows)
    print(result.summary())
    assert result.expected >= len(PATHS) * 20 * 2
    assert result.missing == [] and result.duplicates == [] and result.unexpected == []
    assert summary.values_written == result.found == DeltaTable(table).to_pyarrow_table().num_rows
    log = Path(table) / "_delta_log"
    files_per_commit = [sum('"add"' in line for line in (log / f"{v:020d}.json").read_text().splitlines())
                        for v in range(1, DeltaTable(table).version() + 1)]
    files_per_commit = [n for n in files_per_commit if n]  # the writer claim's commits add no files
    assert max(files_per_commit) >= 3 and summary.commits == len(files_per_commit) <= 5


async def test_a_spill_that_cannot_be_written_is_kept_and_retried(tmp_path, monkeypatch):
    """Storage failing while a part is written ahead: its rows stay in memory until their files are whole."""
    monkeypatch.setattr(flusher_module, "SPILL_ROWS", 25)
    # Retries after 0.05-0.2 s, not the writer's 1.5-3 s: that stalled most of the 3 s run, and what the
    # simulator sent meanwhile was still unread at the stop (a restart reads it back; this test has none).
    monkeypatch.setattr(writer_module, "Backoff", lambda **_: Backoff(initial=0.1, maximum=0.2))
    real_write_ahead = DeltaSink.write_ahead
    failures: list[int] = []

    def failing_twice(sink: DeltaSink, rows):
        if len(failures) < 2:
            failures.append(rows.num_rows)
            raise SinkError("injected: storage unavailable")
        return real_write_ahead(sink, rows)

    monkeypatch.setattr(DeltaSink, "write_ahead", failing_twice)
    model = SimModel.from_paths(PATHS, rate=20)
    with trio.fail_after(60):
        table, summary, simulator, windows = await run_against_simulator(
            tmp_path, model, duration=3, flush_seconds=1.0, flush_rows=100_000)
    result = compare_with_model(table, model, windows)
    print(result.summary(), failures)
    assert len(failures) == 2 and summary.failed_commits >= 2
    assert result.missing == [] and result.duplicates == [] and result.unexpected == []
    assert summary.values_written == result.found
