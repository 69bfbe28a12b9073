"""Floors as an array by tag id: a mapping by webId that the flusher's filter, the committed floors, each
batch's floors and the buffer's tag index share tag ids for."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pistream.pi.flow import Live
from pistream.pi.messages import StreamSetMessage, StreamValues, TimedValue
from pistream.stream.buffer import ColumnBuffer, StreamInfo
from pistream.stream.dedup import EventFilter, event_key
from pistream.stream.floors import NO_FLOOR, Floors, TagIds
from pistream.stream.state import StateStore
from pistream.timeutil import format_iso


def test_floors_read_and_write_like_a_dict():
    floors = Floors()
    assert len(floors) == 0 and floors.get("A") is None and floors.get("A", 5) == 5 and "A" not in floors
    floors["A"] = 10
    floors["B"] = -3  # before 1970
    floors["A"] = 12
    assert floors == {"A": 12, "B": -3} and len(floors) == 2 and floors["B"] == -3 and "B" in floors
    assert sorted(floors) == ["A", "B"] and floors.lowest() == -3
    del floors["A"]
    assert floors == {"B": -3} and floors.get("A") is None
    assert repr(floors) == "Floors({'B': -3})"


def test_many_tags_added_one_by_one_keep_their_floors():
    floors = Floors()
    for i in range(5000):
        floors[f"T{i}"] = i * 7
    assert len(floors) == 5000 and floors["T0"] == 0 and floors["T4999"] == 4999 * 7
    assert len(floors.array()) == 5000 and len(floors._values) < 2 * 5000  # grown by doubling, not per tag
    assert floors.of(["T3", "T1"]).tolist() == [21, 7]


def test_copies_share_the_tag_ids_and_not_the_floors():
    floors = Floors()
    floors.set_many(["A", "B", "C"], [1, 2, 3])
    copy = floors.copy()
    copy["A"] = 100
    copy["D"] = 4  # a new tag: one id for both
    assert floors == {"A": 1, "B": 2, "C": 3} and copy == {"A": 100, "B": 2, "C": 3, "D": 4}
    assert copy.tags is floors.tags and floors.tags.get("D") == 3
    floors["E"] = 5  # the registry grew after the copy: its array grows on use
    assert copy.get("E") is None and len(copy.array()) == 5


def test_a_batch_s_floors_update_only_its_tags():
    live = Floors()
    live.set_many(["A", "B", "C"], [10, 20, 30])
    batch = live.only(np.array([0, 2]))
    assert batch == {"A": 10, "C": 30}
    committed = live.copy()
    committed.set_many(["A", "B", "C"], [1, 2, 3])
    committed.update_from(batch)
    assert committed == {"A": 10, "B": 2, "C": 30}
    apart = Floors(TagIds())  # built apart (another registry): by webId
    apart["C"] = 0
    apart.update_from(batch)
    assert apart == {"A": 10, "C": 30} and apart.tags.get("C") == 0


def test_the_buffer_s_tag_index_uses_the_filter_s_tag_ids(tmp_path):
    """A state file names a tag no longer listed (X): its id comes first, without a path; listed tags get
    their paths, bulk batches of them still go in bulk, and values read back for X are described by webId."""
    saved = EventFilter(lookback_us=0)
    saved.floors.set_many(["X", "B", "A"], [50, 60, 70])
    store = StateStore(tmp_path / "state.arrow", "table", "app")
    store.save(saved, 3)
    committed, version = store.load(0)
    assert version == 3 and committed.floors == {"X": 50, "B": 60, "A": 70}
    streams = {w: StreamInfo(f"\\\\S\\{w}", w, "m") for w in ("A", "B", "C")}
    buffer = ColumnBuffer(streams, committed.copy())
    assert buffer.index.tags is buffer.filter.floors.tags is committed.floors.tags
    assert buffer.index.described("X") is None and buffer.index.described("C") == 3
    values = [StreamValues(web_id=w, items=[TimedValue(timestamp=format_iso(t), value=1.0, good=True)])
              for w, t in (("A", 100), ("B", 100), ("C", 100))]
    count, gaps = buffer.add_live_batch([Live(0, StreamSetMessage(items=values))])
    assert count == 3 and not gaps and buffer._bulk_rows == 3  # in bulk, by the shared ids
    # X's values: a floor from the state file, but no longer listed, so no channel subscribed to it: dropped
    x_values = StreamSetMessage(items=[StreamValues(web_id="X", items=[TimedValue(timestamp=format_iso(80),
                                                                                   value=2.0, good=True)])])
    assert buffer.add_live_batch([Live(0, x_values)]) == (1, [])
    assert buffer._bulk_rows == 3 and buffer.tag_webid == [] and buffer.unsubscribed.values == 1
    flush = buffer.take()
    rows = flush.batch.select(["tag", "tag_webid", "uom"]).to_pylist()
    assert sorted((r["tag"], r["tag_webid"], r["uom"]) for r in rows) == [
        ("\\\\S\\A", "A", "m"), ("\\\\S\\B", "B", "m"), ("\\\\S\\C", "C", "m")]
    assert flush.floors == {"A": 100, "B": 100, "C": 100}
    committed.merge(flush.floors, flush.recent)
    assert committed.floors == {"A": 100, "B": 100, "C": 100, "X": 50}
    assert not buffer.filter.accept_live("C", event_key(100, 1.0, None, None, True, False, False, False))


def test_floors_survive_the_state_file_exactly(tmp_path):
    committed = EventFilter(lookback_us=0)
    webids = [f"W{i}" for i in range(3000)]
    floors = np.arange(3000, dtype=np.int64) * 1_000_003 - 10**9
    committed.floors.set_many(webids, floors)
    committed.floors["W7"] = NO_FLOOR + 1  # the oldest time there is
    store = StateStore(tmp_path / "state.arrow", "table", "app")
    store.save(committed, 9)
    loaded, version = store.load(0)
    assert version == 9 and loaded.floors == committed.floors and loaded.floors["W7"] == NO_FLOOR + 1
    saved = pa.ipc.open_file(pa.BufferReader((tmp_path / "state.arrow").read_bytes())).read_all()
    assert saved.filter(saved["floor"].is_valid()).num_rows == 3000
