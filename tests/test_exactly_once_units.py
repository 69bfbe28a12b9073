"""Unit tests of the exactly-once pieces: floors and gap windows, paging cursors, transaction versions."""

from __future__ import annotations

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import trio

import pistream.stream.buffer as buffer_module
from pistream.lake.sink import DeltaSink
from pistream.pi.flow import GapRequest, GapValues, Live
from pistream.pi.gapfill import GapFiller, GapQueue, after_cursor
from pistream.pi.messages import StreamSetMessage, StreamValues, TimedValue
from pistream.pi.pages import PageDecoder
from pistream.pi.piwebapi import PiWebApi
from pistream.sim.model import SimModel
from pistream.sim.server import Simulator
from pistream.stream.buffer import ColumnBuffer, StreamInfo
from pistream.stream.columns import FRAME_CODEC, LiveColumns, TagIndex, page_decoder
from pistream.stream.dedup import EventFilter, advance_from_rows, event_key
from pistream.stream.state import StateStore
from pistream.timeutil import format_iso


def key(ts: int, value: float = 1.0) -> tuple:
    return event_key(ts, value, None, None, True, False, False, False)


def test_live_values_newer_than_the_floor_pass_and_repeats_of_the_newest_are_dropped():
    f = EventFilter()
    assert f.accept_live("W", key(10))
    f.advance("W", key(10))
    assert not f.accept_live("W", key(10))  # the same event sent again
    assert f.accept_live("W", key(10, 2.0))  # another event at the same time
    assert f.accept_live("W", key(5))  # a late, out-of-order value is kept
    assert f.accept_live("W", key(11))
    assert f.stats.repeats_dropped == 1 and f.stats.late_accepted == 1


def test_gap_window_runs_from_the_floor_to_the_first_live_value_both_ends_deduplicated():
    f = EventFilter()
    f.advance("W", key(100))
    f.connected(["W", "NEW"])  # NEW has no floor: nothing to read back for it
    assert f.awaiting("W") and not f.awaiting("NEW")
    request = f.first_live("W", [key(200), key(250)])
    assert request == GapRequest("W", 100, 200)
    assert not f.accept_gap("W", key(100))  # already in the table
    assert f.accept_gap("W", key(150))
    assert f.accept_gap("W", key(100, 7.0))  # a different event at the floor time
    assert not f.accept_gap("W", key(200))  # the live value itself
    assert not f.accept_gap("W", key(201))  # outside: the channel delivers it
    f.gap_done(request)
    assert not f.accept_gap("W", key(150))  # the window is closed


def test_look_back_reads_late_values_lost_with_the_connection_and_drops_the_known_ones():
    f = EventFilter(lookback_us=50)
    for ts in (60, 80, 100):  # 90 was held back by the server and lost with the connection
        f.advance("W", key(ts))
    assert list(f.recent["W"]) == [key(60), key(80), key(100)]
    f.advance("W", key(140))  # 60 and 80 fall out of the look-back
    assert list(f.recent["W"]) == [key(100), key(140)]
    assert not f.accept_live("W", key(100))  # an older repeat inside the look-back is caught
    f.connected(["W"])
    request = f.first_live("W", [key(300)])
    assert request == GapRequest("W", 90, 300)
    assert f.accept_gap("W", key(90))  # the late value, never received
    assert not f.accept_gap("W", key(100)) and not f.accept_gap("W", key(140))
    assert f.accept_gap("W", key(200)) and not f.accept_gap("W", key(300))


def test_overlapping_windows_let_an_event_in_once():
    """A reconnect while the previous gap is still being read: both windows cover the same events."""
    f = EventFilter(lookback_us=100)
    f.advance("W", key(1000))
    f.connected(["W"])
    first = f.first_live("W", [key(1200)])  # window [900, 1200]
    f.advance("W", key(1200))
    f.connected(["W"])  # the gap read of the first window has not arrived yet
    second = f.first_live("W", [key(1400)])  # window [1100, 1400]
    assert first.end_us >= second.start_us
    assert f.accept_gap("W", key(1150))  # via the second window's read
    f.advance("W", key(1150))
    assert not f.accept_gap("W", key(1150))  # the first window's read brings it again
    f.gap_done(first)
    f.gap_done(second)
    assert f.open_gaps() == 0 and not f._seen


def test_a_window_awaiting_its_end_remembers_what_an_earlier_window_let_in():
    f = EventFilter(lookback_us=100)
    f.advance("W", key(1000))
    f.connected(["W"])
    first = f.first_live("W", [key(1200)])  # window [900, 1200], its read still to come
    f.advance("W", key(1200))
    f.connected(["W"])  # reconnected again: waits for its first live value, known = recent now
    assert f.accept_gap("W", key(1150))  # the first window's read arrives...
    f.advance("W", key(1150))
    f.gap_done(first)  # ...and ends, before the second window has its end
    second = f.first_live("W", [key(1400)])  # window [1100, 1400]
    assert second is not None and second.start_us <= 1150
    assert not f.accept_gap("W", key(1150))  # read again by the second window: a repeat


def test_floors_from_rows_keep_the_look_back():
    ts = pa.array([10, 60, 100, 100], pa.int64()).cast(pa.timestamp("us", "UTC"))
    rows = pa.table({"tag_webid": ["A"] * 4, "timestamp": ts, "value": [1.0, 2.0, 3.0, 4.0],
                     "value_text": pa.array([None] * 4, pa.string()), "state_code": pa.array([None] * 4, pa.int32()),
                     "good": [True] * 4, "questionable": [False] * 4, "substituted": [False] * 4,
                     "annotated": [False] * 4})
    f = advance_from_rows(EventFilter(lookback_us=50), rows)
    assert f.floors == {"A": 100}
    assert [k[0] for k in f.recent["A"]] == [60, 100, 100]


def test_a_second_reconnect_during_a_gap_fill_opens_a_second_window():
    f = EventFilter()
    f.advance("W", key(100))
    f.connected(["W"])
    first = f.first_live("W", [key(200)])
    f.advance("W", key(300))  # live values after the first reconnect
    f.connected(["W"])
    second = f.first_live("W", [key(400)])
    assert (first, second) == (GapRequest("W", 100, 200), GapRequest("W", 300, 400))
    assert f.accept_gap("W", key(150)) and f.accept_gap("W", key(350))
    assert not f.accept_gap("W", key(250))  # between the windows: the channel delivered it
    f.gap_done(first)
    assert not f.accept_gap("W", key(150)) and f.accept_gap("W", key(350))


def test_floors_from_rows_keep_every_event_at_the_newest_time():
    ts = pa.array([1, 5, 5, 3], pa.int64()).cast(pa.timestamp("us", "UTC"))
    rows = pa.table({"tag_webid": ["A", "A", "A", "B"], "timestamp": ts, "value": [1.0, 2.0, float("nan"), None],
                     "value_text": [None, None, None, "x"], "state_code": pa.array([None, None, None, 1], pa.int32()),
                     "good": [True] * 4, "questionable": [False] * 4, "substituted": [False] * 4,
                     "annotated": [False] * 4})
    f = advance_from_rows(EventFilter(), rows)
    assert f.floors == {"A": 5, "B": 3}
    assert set(f.recent["A"]) == {key(5, 2.0), event_key(5, float("nan"), None, None, True, False, False, False)}
    assert not f.accept_live("A", event_key(5, float("nan"), None, None, True, False, False, False))


def tv(ts: int) -> TimedValue:
    return TimedValue(timestamp=format_iso(ts), value=1.0)


def page_columns(model: SimModel, columns: bool) -> tuple[TagIndex, PageDecoder | None]:
    """The simulator's tags in a tag index, and the codec's page decoder over it if ``columns``."""
    index = TagIndex()
    for tag in model.tags:
        index.add(tag.webid, tag.path, None)
    if columns and not FRAME_CODEC:
        pytest.skip("the C frame codec is not built here")
    return index, page_decoder(index) if columns else None


def gap_values(item: object, index: TagIndex) -> list[tuple[str, str, object]]:
    """(webid, timestamp, value) of each value a gap filler sent, decoded by msgspec or in columns."""
    if not isinstance(item, GapValues):
        return []
    found = [(s.web_id or "", t.timestamp or "", t.value) for s in item.streams for t in s.items or ()]
    if item.columns is not None:
        assert isinstance(item.columns, LiveColumns)
        c = item.columns
        names = ("value_text", "state_code", "system_state")
        states = zip(*(c.batch.column(n).to_pylist() for n in names), strict=True)
        values = [v if v is not None else {"Name": text, "Value": code, "IsSystem": system}
                  for v, (text, code, system) in zip(c.batch.column("value").to_pylist(), states, strict=True)]
        found += [(index.webids[i], format_iso(ts), v) for i, ts, v in zip(c.ids.tolist(), c.ts.tolist(), values,
                                                                            strict=True)]
    return found


def test_paging_cursor_skips_the_events_already_read_at_the_cut_timestamp():
    # A page cut at maxCount=4 ended with two events at t=30; the next page starts at t=30 again.
    first, cursor = after_cursor([tv(10), tv(20), tv(30), tv(30)], 10, 0)
    assert len(first) == 4 and cursor == (30, 2)
    second, cursor = after_cursor([tv(30), tv(30), tv(30), tv(40)], *cursor)
    assert [t.timestamp for t in second] == [format_iso(30), format_iso(40)] and cursor == (40, 1)
    # a page that is all one timestamp carries the count on
    third, cursor = after_cursor([tv(40), tv(40), tv(40)], 40, 1)
    assert len(third) == 2 and cursor == (40, 3)


@pytest.mark.parametrize("columns", [False, True], ids=["msgspec", "columns"])
async def test_gap_fill_pages_through_the_archive_and_reads_each_event_once(tmp_path, columns):
    model = SimModel.from_paths(["\\\\SIMSRV\\FAST1", "\\\\SIMSRV\\FAST2"], rate=100)
    simulator = Simulator(model, poll_interval=0.1)
    tags = {t.webid: t for t in model.tags}
    index, decode = page_columns(model, columns)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(simulator.run)
            await trio.sleep(1.2)
            now = simulator.now_us()
            start, end = now - 1_000_000, now - 100_000
            send, receive = trio.open_memory_channel(1000)
            got: dict[str, list[str]] = {w: [] for w in tags}

            kinds: set[bool] = set()

            async def take_in() -> None:  # as the flusher does: the filler waits for pages to be taken
                async for item in receive:
                    if isinstance(item, GapValues):
                        kinds.add(item.columns is not None)
                    for webid, timestamp, _ in gap_values(item, index):
                        got[webid].append(timestamp)
                    if getattr(item, "taken", None) is not None:
                        item.taken.set()

            nursery.start_soon(take_in)
            async with PiWebApi(simulator.url) as api:
                # 7 items a page: many pages, each cut at exactly maxCount
                filler = GapFiller(api, GapQueue(), send, items_per_page=14, decode=decode)
                group = [GapRequest(w, start, end) for w in tags]
                await filler.fill(group)
            nursery.cancel_scope.cancel()
    for webid, tag in tags.items():
        expected = [format_iso(e.timestamp_us) for e in model.events(tag, start, end)]
        assert sorted(got[webid]) == sorted(expected) and len(got[webid]) == len(expected) > 50
    assert filler.stats.calls > 10 and filler.stats.lost_gaps == 0
    assert kinds == {columns}  # every page through the path under test


def test_commit_of_a_recorded_transaction_version_writes_nothing(tmp_path):
    sink = DeltaSink(str(tmp_path / "t"), "writer-a")
    sink.open()
    buffer = ColumnBuffer({"W": StreamInfo("\\\\S\\W", "W")})
    buffer.add_live(StreamValues(web_id="W", items=[tv(1_700_000_000_000_000)]), 0)
    batch = buffer.take().batch
    assert not sink.commit(batch, 1).skipped
    again = sink.commit(batch, 1)  # e.g. retried after a timeout although it landed
    assert again.skipped and again.rows == 0
    other = DeltaSink(str(tmp_path / "t"), "writer-a")  # a restarted process sees the same version
    assert other.last_txn_version() == 1 and other.commit(batch, 1).skipped
    assert other.commit(batch, 2).rows == 1
    sink.table.update_incremental()
    assert sink.table.to_pyarrow_table().num_rows == 2
    assert DeltaSink(str(tmp_path / "t"), "writer-b").last_txn_version() == 0


def test_buffer_accepts_gap_values_only_inside_an_open_window():
    buffer = ColumnBuffer({"W": StreamInfo("\\\\S\\W", "W")})
    buffer.filter.advance("W", key(100))
    buffer.connected(["W"])
    gap = buffer.add_live(StreamValues(web_id="W", items=[tv(300)]), 0)
    assert gap == GapRequest("W", 100, 300)
    buffer.add_gap(StreamValues(web_id="W", items=[tv(100), tv(200), tv(300), tv(400)]), 0)
    assert sorted(buffer.timestamp) == [200, 300]
    assert StreamSetMessage  # wire type used by the flusher for the same values


# -- the bulk (steady-state) path: its events must count as recent events everywhere --------------------

def live(*values: tuple[str, int, float]) -> Live:
    """One channel message: (webid, timestamp_us, value) per value, one stream per webid."""
    streams: dict[str, list[TimedValue]] = {}
    for webid, ts, value in values:
        streams.setdefault(webid, []).append(TimedValue(timestamp=format_iso(ts), value=value, good=True))
    return Live(0, StreamSetMessage(items=[StreamValues(web_id=w, items=v) for w, v in streams.items()]))


def taken_times(buffer: ColumnBuffer, webid: str) -> list[int]:
    """The times of ``webid``'s rows in the buffer's batch (taken: in bulk or value by value alike)."""
    batch = buffer.take().batch
    times = pc.cast(batch.column("timestamp"), pa.int64()).to_pylist()
    return sorted(t for w, t in zip(batch.column("tag_webid").to_pylist(), times, strict=True) if w == webid)


def bulk_buffer(lookback_us: int) -> ColumnBuffer:
    infos = {w: StreamInfo(f"\\\\S\\{w}", w) for w in ("A", "B", "C")}
    return ColumnBuffer(infos, EventFilter(lookback_us=lookback_us))


def test_bulk_accepted_events_are_known_to_the_value_by_value_checks():
    buffer = bulk_buffer(lookback_us=50)
    count, _ = buffer.add_live_batch([live(("A", 100, 1.0), ("B", 100, 1.0)), live(("A", 140, 2.0))])
    assert count == 3 and buffer._bulk_rows == 3 and not buffer.tag_webid  # taken in bulk
    buffer.sync_filter()
    assert buffer.filter.floors == {"A": 140, "B": 100}
    # Repeats and a late value in the next batch: taken in bulk too (a late burst), told apart by key.
    buffer.add_live_batch([live(("A", 100, 1.0), ("A", 120, 5.0), ("B", 100, 1.0))])
    assert buffer.filter.stats.repeats_dropped == 2
    assert not buffer.tag_webid and buffer._bulk_rows == 4
    rows = buffer.take().batch.select(["tag_webid", "value"]).to_pylist()
    assert sorted((r["tag_webid"], r["value"]) for r in rows) == [("A", 1.0), ("A", 2.0), ("A", 5.0), ("B", 1.0)]


def test_a_reconnect_after_bulk_events_reads_back_from_the_floor_and_drops_what_it_has():
    buffer = bulk_buffer(lookback_us=0)
    buffer.add_live_batch([live(("A", 100, 1.0))])
    assert buffer._bulk_rows == 1
    buffer.connected(["A"])
    count, gaps = buffer.add_live_batch([live(("A", 300, 3.0))])
    assert gaps == [GapRequest("A", 100, 300)]
    buffer.add_gap(StreamValues(web_id="A", items=[TimedValue(timestamp=format_iso(t), value=v, good=True)
                                                   for t, v in ((100, 1.0), (200, 2.0), (300, 3.0))]), 0)
    assert taken_times(buffer, "A") == [100, 200, 300]  # 100 came in bulk before the reconnect, 300 after it


def test_committed_floors_from_a_bulk_batch_reach_the_state_file(tmp_path):
    buffer = bulk_buffer(lookback_us=50)
    buffer.add_live_batch([live(("A", 100, 1.0), ("B", 10, 4.0)), live(("A", 130, 2.0)), live(("A", 200, 3.0))])
    flush = buffer.take()
    assert flush.batch.num_rows == 4 and flush.floors == {"A": 200, "B": 10}
    committed = EventFilter(lookback_us=50)
    committed.merge(flush.floors, flush.recent)
    store = StateStore(tmp_path / "state.json", "table", "app")
    store.save(committed, 1)
    loaded, version = store.load(50)
    assert version == 1 and loaded.floors == {"A": 200, "B": 10}
    assert loaded.recent == {}  # loaded as columns, sorted into keys when a lookup needs them
    loaded.sync_recent()
    assert [k[0] for k in loaded.recent["A"]] == [200]  # 100 and 130 fell out of the look-back
    assert list(loaded.recent["B"]) == [event_key(10, 4.0, None, None, True, False, False, False)]
    # and the buffer's own filter knows them too, after the take
    assert not buffer.filter.accept_live("A", event_key(200, 3.0, None, None, True, False, False, False))


def test_recent_events_that_fell_out_of_the_look_back_are_forgotten_with_their_tags():
    f = EventFilter(lookback_us=50)
    for ts in (100, 120, 200):
        f.advance("A", key(ts))
    f.advance("B", key(10))
    f.floors["B"] = 500  # B moved on in bulk: its event at 10 is long out of the look-back
    f.forget_old_events()
    assert f.recent == {"A": [key(200)]}
    assert not f.accept_live("A", key(200))  # what stays still tells repeats apart


def test_the_flusher_does_not_keep_every_tag_s_events_from_a_reconnect():
    """A value taken value by value sorts only its own tag's pending bulk events into its list (all tags'
    were sorted in at every such step: after a restart at 100,000 tags, the peak of memory); a tag that
    moves on in bulk never touches its list again, so a take sweeps it (100,000 tags kept ~100k stale lists
    before)."""
    buffer = bulk_buffer(lookback_us=50)
    buffer.add_live_batch([live(("A", 100, 1.0), ("B", 100, 1.0))])
    buffer.connected(["A"])
    _, gaps = buffer.add_live_batch([live(("A", 300, 2.0))])  # A's first live value, in bulk too
    assert gaps == [GapRequest("A", 50, 300)] and buffer.filter.recent == {}
    assert buffer.filter._pending_rows == 3  # every event stays a pending row
    buffer.sync_filter()  # every tag's now (as a lookup of all would): each gets a list
    assert buffer.filter.recent == {"A": [key(300, 2.0)], "B": [key(100, 1.0)]}
    buffer.add_live_batch([live(("B", 400, 3.0))])
    assert buffer._bulk_rows == 4 and buffer.tag_webid == []  # B moved on in bulk
    buffer.take()
    assert "B" not in buffer.filter.recent  # its stale list swept
    assert buffer.filter.recent["A"] == [key(300, 2.0)]


def test_a_connect_looks_only_at_its_own_tags_pending_events():
    """Connecting channels at startup used to sort every tag's pending bulk events into Python lists, held
    until the next commit (~600,000 objects at 100,000 tags); a connect now reads only its tags' events."""
    buffer = bulk_buffer(lookback_us=50)
    buffer.add_live_batch([live(("A", 100, 1.0), ("B", 100, 1.0)), live(("A", 120, 2.0), ("B", 130, 4.0))])
    buffer.add_live_batch([live(("A", 200, 3.0), ("B", 140, 5.0))])
    buffer.connected(["C"])  # no floor: nothing to wait for, nothing read
    assert buffer.filter.open_gaps() == 0
    buffer.connected(["B"])
    assert buffer.filter.recent == {} and buffer.filter._pending_rows == 6  # nothing sorted in
    assert buffer.filter.awaiting("B") and not buffer.filter._awaiting  # a compact window: arrays by tag id
    buffer.filter._take_compact("B")
    window = buffer.filter._awaiting["B"]
    assert window.known == () and window.known_rows is not None  # still columns, keys once its gap is read
    known = window.known_rows.keys(window.known_rows.rows_of(np.array([buffer.filter.floors.tags.ids["B"]]))[0])
    assert window.start_us == 140 - 50 and set(known) == {key(100, 1.0), key(130, 4.0), key(140, 5.0)}
    assert "A" not in buffer.filter._awaiting
    # B's gap then drops what the buffer has already and takes what it missed
    _, gaps = buffer.add_live_batch([live(("B", 300, 6.0))])
    assert gaps == [GapRequest("B", 90, 300)]
    buffer.add_gap(StreamValues(web_id="B", items=[TimedValue(timestamp=format_iso(t), value=v, good=True)
                                                   for t, v in ((130, 4.0), (140, 5.0), (150, 9.0), (300, 6.0))]),
                   0)
    assert buffer.timestamp == [150]
    assert taken_times(buffer, "B") == [100, 130, 140, 150, 300]


def test_live_values_past_an_open_gap_go_in_bulk_and_the_gap_still_reads_once():
    """After a restart every tag reads its downtime back; its live values newer than its floor (past its
    window) go in bulk meanwhile, and the read adds exactly what was missed."""
    buffer = bulk_buffer(lookback_us=50)
    buffer.add_live_batch([live(("A", 100, 1.0), ("B", 100, 1.0))])
    buffer.connected(["A"])
    _, gaps = buffer.add_live_batch([live(("A", 300, 3.0))])  # the first live value closes the window
    assert gaps == [GapRequest("A", 50, 300)] and buffer.tag_webid == [] and buffer._bulk_rows == 3
    count, gaps = buffer.add_live_batch([live(("A", 400, 4.0), ("B", 400, 4.0)), live(("A", 500, 5.0))])
    assert count == 3 and gaps == [] and buffer.tag_webid == [] and buffer._bulk_rows == 6  # in bulk
    late = buffer.add_live_batch([live(("A", 200, 2.0))])  # at or before the floor: value by value
    assert late == (1, []) and buffer.timestamp == [200]
    buffer.add_gap(StreamValues(web_id="A", items=[TimedValue(timestamp=format_iso(t), value=v, good=True)
                                                   for t, v in ((100, 1.0), (200, 2.0), (250, 2.5), (300, 3.0))]),
                   0)
    buffer.filter.gap_done(GapRequest("A", 50, 300))
    batch = buffer.take().batch
    times = pc.cast(batch.column("timestamp"), pa.int64()).to_pylist()
    a_times = sorted(t for w, t in zip(batch.column("tag_webid").to_pylist(), times, strict=True) if w == "A")
    assert a_times == [100, 200, 250, 300, 400, 500]
    assert buffer.filter.open_gaps() == 0


def test_rows_taken_value_by_value_go_into_columns_as_they_pile_up(monkeypatch):
    """A restart's read-back goes value by value: every COMPACT_ROWS such rows become Arrow columns, in
    arrival order, and the batch holds each row once."""
    monkeypatch.setattr(buffer_module, "COMPACT_ROWS", 4)
    buffer = bulk_buffer(lookback_us=0)
    buffer.add_live_batch([live(("A", 1000, 1.0))])
    buffer.connected(["A"])
    _, gaps = buffer.add_live_batch([live(("A", 2000, 2.0))])
    assert gaps == [GapRequest("A", 1000, 2000)]
    buffer.add_gap(StreamValues(web_id="A", items=[TimedValue(timestamp=format_iso(t), value=t / 1000, good=True)
                                                   for t in range(1000, 2001, 100)]), 0)
    assert len(buffer.tag_webid) == 0 and buffer._bulk_rows == 1 + 10 and len(buffer) == 11
    batch = buffer.take().batch
    times = pc.cast(batch.column("timestamp"), pa.int64()).to_pylist()
    assert times == [1000, 2000, *range(1100, 2000, 100)]  # bulk, first live, then the read-back in order


def test_a_take_after_spills_describes_the_whole_batch():
    """Spilled rows leave the buffer, but the batch's floors and possibly recent events still cover them:
    the committed filter ends the same as after one take of everything."""
    def fill(buffer: ColumnBuffer, spill: bool) -> tuple[list, object]:
        spills = []
        buffer.add_live_batch([live(("A", 100, 1.0), ("B", 10, 4.0)), live(("A", 130, 2.0))])
        if spill:
            spills.append(buffer.spill())
        buffer.add_live_batch([live(("A", 200, 3.0), ("C", 50, 7.0))])
        if spill:
            spills.append(buffer.spill())
            assert buffer.spill() is None and buffer.held_rows == 0 and len(buffer) == 5
        buffer.add_live_batch([live(("A", 230, 9.0))])
        return spills, buffer.take()

    spills, flush = fill(bulk_buffer(lookback_us=50), spill=True)
    _, whole = fill(bulk_buffer(lookback_us=50), spill=False)
    assert [s.rows.num_rows for s in spills] == [3, 2] and flush.batch.num_rows == 1 and flush.spilled_rows == 5
    assert whole.batch.num_rows == 6 and whole.spilled_rows == 0
    assert flush.floors == whole.floors == {"A": 230, "B": 10, "C": 50}
    written = pa.concat_tables([s.rows for s in spills] + [flush.batch]).select(["tag_webid", "timestamp"])
    assert written.sort_by("timestamp").to_pylist() == whole.batch.select(["tag_webid", "timestamp"]).sort_by(
        "timestamp").to_pylist()
    committed, committed_whole = EventFilter(lookback_us=50), EventFilter(lookback_us=50)
    committed.merge(flush.floors, flush.recent)
    committed_whole.merge(whole.floors, whole.recent)
    committed.sync_recent()
    committed_whole.sync_recent()
    # (the same events; a batch's value-by-value rows follow its bulk ones, so order within a tag may differ)
    assert {w: sorted(k) for w, k in committed.recent.items()} == {w: sorted(k) for w, k in committed_whole.recent.items()}
    assert [k[0] for k in committed.recent["A"]] == [200, 230] and [k[0] for k in committed.recent["B"]] == [10]


def test_many_events_read_back_across_overlapping_windows_get_in_once():
    """A tag's events accepted inside its windows are kept compactly while few and in a set once many
    (a restart at 100,000 tags holds one such record per tag): either way each event gets in once, through
    overlapping windows and as a late live value, and the record goes with the last window."""
    f = EventFilter(lookback_us=10)
    f.advance("W", key(1000))
    f.connected(["W"])
    first = f.first_live("W", [key(2000)])  # window [990, 2000]
    f.advance("W", key(2000))
    f.connected(["W"])  # a reconnect before the first gap was read
    second = f.first_live("W", [key(2100)])  # window [1990, 2100]
    f.advance("W", key(2100))
    times = list(range(1001, 1001 + 40)) + [1995, 1996]
    for ts in times:
        assert f.accept_gap("W", key(ts)), ts
        f.advance("W", key(ts))
        seen = f._seen["W"]  # with the windows' ends
        assert type(seen) is (tuple if len(seen) <= 16 else set)
    assert type(seen) is set and len(seen) == len(times) + 2
    for ts in times:  # both reads bring them, and the channel too, late
        assert not f.accept_gap("W", key(ts)) and not f.accept_live("W", key(ts))
    assert f.accept_gap("W", key(1997)) and f.accept_gap("W", key(1500, 2.0))  # others still get in
    assert not f.accept_gap("W", key(2000)) and not f.accept_gap("W", key(2100))  # the windows' ends
    f.gap_done(first)
    assert not f.accept_gap("W", key(1995))  # the second window still knows it
    f.gap_done(second)
    assert f.open_gaps() == 0 and not f._seen


def test_a_window_knows_many_recent_events_as_well_as_few():
    """The recent events a window knows at connect time are a tuple while few, a frozenset when many."""
    for count in (3, 40):
        f = EventFilter(lookback_us=100)
        for ts in range(1000, 1000 + count):
            f.advance("W", key(ts))
        f.connected(["W"])
        last = 1000 + count - 1
        f.first_live("W", [key(last + 50)])
        assert type(f._windows_of("W")[0].known) is (tuple if count <= 8 else frozenset)
        assert all(not f.accept_gap("W", key(ts)) for ts in range(max(1000, last - 100), last + 1))
        assert f.accept_gap("W", key(last + 1)) and f.accept_gap("W", key(last, 2.0))
        assert not f.accept_gap("W", key(last + 50))


@pytest.mark.parametrize("as_frames", [False, True], ids=["decoded", "raw-frames"])
def test_a_batch_with_a_tag_awaiting_its_first_value_takes_the_other_tags_in_bulk(as_frames):
    """After a restart nearly every batch of the first seconds holds tags still awaiting their first live
    value: the batch goes in bulk, and each such first value closes its tag's window; a tag whose first
    value is at or before its floor (the value it had: nothing changed while down) goes value by value."""
    buffer = bulk_buffer(lookback_us=50)
    buffer.add_live_batch([live(("A", 100, 1.0), ("B", 100, 1.0), ("C", 100, 1.0))])
    buffer.connected(["A", "B"])
    buffer.add_live_batch([live(("B", 300, 3.0))])  # B's first live value: its window closes
    assert buffer.filter.awaiting("A") and not buffer.filter.awaiting("B")
    bulk_before, careful_before = buffer._bulk_rows, len(buffer.tag_webid)
    batch = [live(("A", 300, 3.0), ("B", 400, 4.0), ("C", 200, 2.0)), live(("B", 500, 5.0), ("C", 300, 3.0))]
    if as_frames:
        batch = [Live(0, None, frame=msgspec.json.encode(item.message).decode()) for item in batch]
    count, gaps = buffer.add_live_batch(batch)
    assert count == 5 and gaps == [GapRequest("A", 50, 300)] and buffer.filter.open_gaps() == 2
    assert buffer._bulk_rows - bulk_before == 5 and len(buffer.tag_webid) == careful_before  # all in bulk
    # Their gaps read back: the first values (A's 300, B's 300) are known, the rest is new.
    buffer.add_gaps([StreamValues(web_id=w, items=[TimedValue(timestamp=format_iso(t), value=v, good=True)
                                                   for t, v in values])
                     for w, values in (("A", ((100, 1.0), (250, 2.5), (300, 3.0))), ("B", ((100, 1.0), (300, 3.0))))], 0)
    assert buffer.filter.stats.repeats_dropped == 4  # A's 100 and 300, B's 100 and 300
    rows = buffer.take().batch
    times = pc.cast(rows.column("timestamp"), pa.int64()).to_pylist()
    got = sorted(zip(rows.column("tag_webid").to_pylist(), times, strict=True))
    assert got == [("A", 100), ("A", 250), ("A", 300), ("B", 100), ("B", 300), ("B", 400), ("B", 500), ("C", 100),
                   ("C", 200), ("C", 300)]


def test_compact_windows_behave_as_window_objects_through_reconnects_pages_and_ends():
    """A connect's windows for tags with no recent events as keys are arrays by tag id (a restart at
    100,000 tags); a reconnect while a gap is read, a page of the gap, a value by value step or the gap's
    end make a tag's window an object first, and the decisions are the same as with objects throughout."""
    buffer = bulk_buffer(lookback_us=50)
    f = buffer.filter
    buffer.add_live_batch([live(("A", 100, 1.0), ("B", 100, 1.0), ("C", 100, 1.0))])
    buffer.connected(["A", "B", "C"])
    assert f.awaiting_tags() == 3 and not f._awaiting and len(f._compact) == 3  # compact, awaiting
    buffer.connected(["C"])  # C reconnects before its first value: its awaiting window is replaced
    assert f.awaiting_tags() == 3 and f.open_gaps() == 3
    _, gaps = buffer.add_live_batch([live(("A", 300, 3.0), ("B", 300, 3.0), ("C", 300, 3.0))])
    assert list(gaps) == [GapRequest("A", 50, 300), GapRequest("B", 50, 300), GapRequest("C", 50, 300)]
    assert f._compact.closed == 3 and not f._windows and f.in_gap("A") and not f.awaiting("A")
    assert f.open_windows().requests() == set(gaps)
    buffer.connected(["A"])  # A reconnects while its first gap is read: that window becomes an object
    assert f._compact.closed == 2 and "A" in f._windows and f.awaiting("A")
    _, more = buffer.add_live_batch([live(("A", 400, 4.0), ("B", 400, 4.0))])
    assert list(more) == [GapRequest("A", 250, 400)]
    assert f.open_windows().requests() == {*gaps, GapRequest("A", 250, 400)}
    page = [StreamValues(web_id=w, items=[TimedValue(timestamp=format_iso(t), value=v, good=True) for t, v in vals])
            for w, vals in (("A", ((100, 1.0), (200, 2.0), (300, 3.0), (350, 3.5), (400, 4.0))),
                            ("B", ((100, 1.0), (150, 1.5), (300, 3.0))))]
    buffer.add_gaps(page, 0)  # A's 200 and 350 are new (each once, in both windows), B's 150
    for request in (*gaps, GapRequest("A", 250, 400)):
        f.gap_done(request)  # C's window ends without a page: never an object
    assert f.open_gaps() == 0 and len(f._compact) == 0 and not len(f.open_windows())
    rows = buffer.take().batch
    times = pc.cast(rows.column("timestamp"), pa.int64()).to_pylist()
    assert sorted(zip(rows.column("tag_webid").to_pylist(), times, strict=True)) == [
        ("A", 100), ("A", 200), ("A", 300), ("A", 350), ("A", 400), ("B", 100), ("B", 150), ("B", 300), ("B", 400),
        ("C", 100), ("C", 300)]


@pytest.mark.parametrize("as_frames", [False, True], ids=["decoded", "raw-frames"])
def test_a_first_value_at_its_floor_goes_value_by_value_and_is_a_repeat(as_frames):
    """A tag that did not change while pistream was down gets its stored value as its first live value:
    at its floor, so it goes value by value, is dropped as known, and closes the window at its time; the
    other tags of the batch still go in bulk."""
    buffer = bulk_buffer(lookback_us=50)
    buffer.add_live_batch([live(("A", 100, 1.0), ("B", 100, 1.0))])
    buffer.connected(["A", "B"])
    batch = [live(("A", 100, 1.0), ("B", 200, 2.0))]
    if as_frames:
        batch = [Live(0, None, frame=msgspec.json.encode(item.message).decode()) for item in batch]
    count, gaps = buffer.add_live_batch(batch)
    assert count == 2 and sorted(gaps, key=lambda g: g.webid) == [GapRequest("A", 50, 100), GapRequest("B", 50, 200)]
    assert buffer.tag_webid == [] and buffer.filter.stats.repeats_dropped == 1
    assert taken_times(buffer, "A") == [100] and buffer.filter.open_gaps() == 2


@pytest.mark.parametrize("columns", [False, True], ids=["msgspec", "columns"])
async def test_a_gap_with_more_events_at_one_time_than_a_page_holds_reads_every_one(columns):
    """25 events at every timestamp, 7 values a stream a call: a page of events read already at a stream's
    cursor is not its end; it is read alone with bigger pages, and every event comes once."""
    from pistream.sim.model import SimTag

    model = SimModel([SimTag("CROWD1", "SIMSRV", "float", 0, per_time=25),
                      SimTag("CROWD2", "SIMSRV", "float", 1, per_time=25)], rate=10)
    simulator = Simulator(model, poll_interval=0.1)
    tags = {t.webid: t for t in model.tags}
    index, decode = page_columns(model, columns)
    got: dict[str, list[tuple[str, str]]] = {w: [] for w in tags}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(simulator.run)
            await trio.sleep(1.2)
            now = simulator.now_us()
            start, end = now - 1_000_000, now - 100_000
            send, receive = trio.open_memory_channel(1000)

            async def take_in() -> None:
                async for item in receive:
                    for webid, timestamp, value in gap_values(item, index):
                        got[webid].append((timestamp, repr(value)))
                    if getattr(item, "taken", None) is not None:
                        item.taken.set()

            nursery.start_soon(take_in)
            async with PiWebApi(simulator.url) as api:
                filler = GapFiller(api, GapQueue(), send, items_per_page=14, decode=decode)
                await filler.fill([GapRequest(w, start, end) for w in tags])
            nursery.cancel_scope.cancel()
    for webid, tag in tags.items():
        expected = [(format_iso(e.timestamp_us), repr(e.value)) for e in model.events(tag, start, end)]
        assert len(expected) >= 5 * 25 and sorted(got[webid]) == sorted(expected)
    assert filler.stats.lost_gaps == 0
