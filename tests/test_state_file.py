"""The state file: the committed floors and recent events survive a save and a load exactly, whichever
way the events were accepted, without turning bulk events into Python objects on every save; a file of the
earlier JSON format is still read; an unusable file is reported and ignored."""

from __future__ import annotations

import json
import math

import msgspec
import pyarrow as pa
import structlog

from pistream.pi.flow import Live
from pistream.pi.messages import StreamSetMessage, StreamValues, TimedValue
from pistream.stream.buffer import ColumnBuffer, StreamInfo
from pistream.stream.dedup import EventFilter, event_key
from pistream.stream.state import StateStore, state_path
from pistream.timeutil import format_iso


def live(*values: tuple[str, int, float]) -> Live:
    streams: dict[str, list[TimedValue]] = {}
    for webid, ts, value in values:
        streams.setdefault(webid, []).append(TimedValue(timestamp=format_iso(ts), value=value, good=True))
    return Live(0, StreamSetMessage(items=[StreamValues(web_id=w, items=v) for w, v in streams.items()]))


def test_events_of_both_kinds_round_trip_and_bulk_ones_stay_columns(tmp_path):
    committed = EventFilter(lookback_us=100)
    # Value by value (lists): NaN, text, a digital state, flags; one falls out of the look-back.
    for key in (event_key(50, 1.0, None, None, True, False, False, False),
                event_key(900, float("nan"), None, None, True, True, False, False),
                event_key(950, None, "Shutdown", None, False, False, True, False),
                event_key(1000, 2.0, "Open", 3, True, False, False, True)):
        committed.advance("T", key)
    committed.floors["quiet"] = 7  # a floor whose events are long gone
    # In bulk, through a buffer's flush as the commit writer merges it.
    buffer = ColumnBuffer({w: StreamInfo(f"\\\\S\\{w}", w) for w in ("A", "B")}, EventFilter(lookback_us=100))
    buffer.add_live_batch([live(("A", 100, 1.0), ("B", 10, 4.0)), live(("A", 130, 2.5)), live(("A", 250, 3.0))])
    flush = buffer.take()
    assert flush is not None and flush.batch.num_rows == 4
    committed.merge(flush.floors, flush.recent)

    path = state_path(tmp_path, "table", "app")
    StateStore(path, "table", "app").save(committed, 7)
    assert committed.recent.keys() == {"T"}  # the bulk events were not turned into keys to save them

    loaded, version = StateStore(path, "table", "app").load(100)
    assert version == 7
    assert loaded.floors == {"T": 1000, "quiet": 7, "A": 250, "B": 10}
    assert loaded.recent == {}  # loaded as columns: sorted into keys when a lookup needs them
    # A restarted flusher (a copy) recognises the saved events as repeats, its own lookup sorting them in.
    assert not loaded.copy().accept_live("T", event_key(900, math.nan, None, None, True, True, False, False))
    assert loaded.copy().accept_live("T", event_key(900, 1.0, None, None, True, True, False, False))
    loaded.sync_recent()
    t = loaded.recent["T"]
    assert [k[0] for k in t] == [900, 950, 1000] and t[0][1] == "NaN"  # NaN still equals itself
    assert t[1:] == [event_key(950, None, "Shutdown", None, False, False, True, False),
                     event_key(1000, 2.0, "Open", 3, True, False, False, True)]
    assert loaded.recent["A"] == [event_key(250, 3.0, None, None, True, False, False, False)]
    assert loaded.recent["B"] == [event_key(10, 4.0, None, None, True, False, False, False)]
    assert "quiet" not in loaded.recent


def test_a_file_of_the_earlier_json_format_is_read(tmp_path):
    path = state_path(tmp_path, "table", "app")
    store = StateStore(path, "table", "app")
    assert store.legacy_path.name.endswith(".json") and store.legacy_path.parent == path.parent
    store.legacy_path.write_bytes(msgspec.json.encode({
        "format": 2, "table": "table", "app_id": "app", "txn_version": 4, "lookback_us": 100,
        "floors": {"A": [500, [[500, 1.5, None, None, True, False, False, False],
                               [300, 1.0, None, None, True, False, False, False]]]},
    }))
    loaded, version = store.load(100)
    assert version == 4 and loaded.floors == {"A": 500}
    assert loaded.recent["A"] == [event_key(500, 1.5, None, None, True, False, False, False)]
    loaded.floors["A"] = 600
    store.save(loaded, 5)  # the next save writes the current format, which wins from then on
    assert store.load(100)[1] == 5


def test_unusable_files_are_ignored_with_a_reason(tmp_path):
    path = state_path(tmp_path, "table", "app")
    committed = EventFilter(lookback_us=100)
    committed.advance("A", event_key(5, 1.0, None, None, True, False, False, False))
    StateStore(path, "table", "app").save(committed, 1)
    assert StateStore(path, "other table", "app").load(100) is None  # another table's
    assert StateStore(path, "table", "app").load(200) is None  # saved with a shorter look-back
    assert StateStore(path, "table", "app").load(50) is not None
    with structlog.testing.capture_logs() as logs:
        assert StateStore(path, "other table", "app").load(100) is None
        path.write_bytes(b"not arrow")
        assert StateStore(path, "table", "app").load(100) is None
        path.write_text(json.dumps({"format": 3}))
        assert StateStore(path, "table", "app").load(100) is None
        assert StateStore(tmp_path / "missing.state.arrow", "table", "app").load(100) is None
    assert [entry["event"] for entry in logs] == ["state_ignored", "state_unreadable", "state_unreadable"]


def test_a_file_of_the_earlier_text_tags_format_is_read(tmp_path):
    """Format 3 kept each row's tag as text; a file of it (from before an upgrade) still gives the floors and
    the recent events, and the next save writes the current format."""
    from pistream.stream.state import PLAIN_TAGS_FORMAT, PLAIN_TAGS_SCHEMA, _write_atomically

    path = state_path(tmp_path, "table", "app")
    schema = PLAIN_TAGS_SCHEMA.with_metadata({"format": str(PLAIN_TAGS_FORMAT), "table": "table", "app_id": "app",
                                              "txn_version": "5", "lookback_us": "100"})
    rows = [("A", 500, None, 1.5), ("B", 80, None, 2.0), ("A", None, 450, 1.0), ("A", None, 500, 1.5),
            ("A", None, 300, 9.0), ("C", None, 10, 3.0)]  # 300: out of A's look-back; C: no floor
    columns = {"tag_webid": [r[0] for r in rows], "floor": [r[1] for r in rows],
               "timestamp": [r[2] for r in rows], "value": [r[3] if r[1] is None else None for r in rows]}
    n = len(rows)
    data = pa.table([pa.array(columns["floor"], pa.int64()), pa.array(columns["tag_webid"]),
                     pa.array(columns["timestamp"], pa.int64()).cast(schema.field("timestamp").type),
                     pa.array(columns["value"], pa.float64()), pa.nulls(n, pa.string()), pa.nulls(n, pa.int32()),
                     *(pa.array([None if r[1] is not None else f for r in rows], pa.bool_())
                       for f in (True, False, False, False))], schema=schema)
    _write_atomically(path, schema, [data])
    store = StateStore(path, "table", "app")
    loaded, version = store.load(100)
    assert version == 5 and loaded.floors == {"A": 500, "B": 80}
    loaded.sync_recent()
    assert loaded.recent == {"A": [event_key(450, 1.0, None, None, True, False, False, False),
                                   event_key(500, 1.5, None, None, True, False, False, False)]}
    store.save(loaded, 6)
    again, version = store.load(100)
    again.sync_recent()
    assert version == 6 and again.floors == loaded.floors and again.recent == loaded.recent
