"""Gap pages read into columns by the C codec are decided as arrays (``ColumnBuffer.add_gap_columns``,
``EventFilter.accept_gap_rows``) for tags whose window is compact, value by value for the others; msgspec's
value-by-value path (``add_gaps``) is the reference: both take the same page body here and must keep the
same rows and count the same repeats. The gap filler's runs against the simulator, through both paths, are
in ``test_exactly_once_units.py``; whole restarts in ``test_stop_and_start.py`` and ``test_chaos.py``."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pistream.pi.flow import GapRequest, Live
from pistream.pi.messages import StreamSetMessage, StreamValues, TimedValue, channel_decoder
from pistream.stream.buffer import ColumnBuffer, StreamInfo
from pistream.stream.columns import FRAME_CODEC, extract_page
from pistream.stream.dedup import EventFilter, same_events
from pistream.stream.schema import EVENT_KEY
from pistream.timeutil import format_iso

T = 1_772_323_200_000_000  # 2026-03-01T00:00:00Z
S = 1_000_000


def at(seconds: float) -> int:
    return T + int(seconds * S)


def live(*values: tuple[str, float, float]) -> Live:
    streams: dict[str, list[TimedValue]] = {}
    for webid, seconds, value in values:
        streams.setdefault(webid, []).append(TimedValue(timestamp=format_iso(at(seconds)), value=value, good=True))
    return Live(0, StreamSetMessage(items=[StreamValues(web_id=w, items=v) for w, v in streams.items()]))


def body(streams: dict[str, list[tuple[float, Any]]]) -> bytes:
    return json.dumps({"Links": {}, "Items": [
        {"WebId": w, "Name": w, "Path": f"\\\\S\\{w}", "Links": {}, "Items": [
            {"Timestamp": format_iso(at(seconds)), "Value": v, "Good": True, "Questionable": False,
             "Substituted": False, "Annotated": False} for seconds, v in items]}
        for w, items in streams.items()]}).encode()


def restarted() -> tuple[ColumnBuffer, list[GapRequest]]:
    """A, B and C streamed, reconnected (compact windows from 50 s to their first values at 300 s); C
    reconnected again while its gap is read: its windows are objects, [50, 300] and [250, 400]."""
    buffer = ColumnBuffer({w: StreamInfo(f"\\\\S\\{w}", "m") for w in "ABC"}, EventFilter(lookback_us=50 * S))
    buffer.add_live_batch([live(("A", 90, 0.5), ("A", 100, 1.0), ("B", 100, 1.0), ("C", 100, 1.0))])
    buffer.connected(["A", "B", "C"])
    _, gaps = buffer.add_live_batch([live(("A", 300, 3.0), ("B", 300, 3.0), ("C", 300, 3.0))])
    buffer.connected(["C"])
    _, more = buffer.add_live_batch([live(("C", 400, 4.0))])
    assert buffer.filter._compact.closed == 2 and "C" in buffer.filter._windows
    return buffer, [*gaps, *more]


PAGE = {
    "A": [(40, 0.4), (90, 0.5), (100, 1.0), (150, 1.5), (150, 1.5), (150, 2.5), (200, None), (200, None),
          (250, {"Name": "Shutdown", "Value": 5, "IsSystem": True}), (300, 3.0), (300, 9.0)],
    "B": [(100, 1.0), (100, 1.5), (200, 2.0), (310, 3.1)],
    "C": [(100, 1.0), (200, 2.0), (350, 3.5), (400, 4.0)],
}


def rows(buffer: ColumnBuffer) -> list[tuple[Any, ...]]:
    batch = buffer.take().batch
    columns = [pc.cast(batch.column("timestamp"), pa.int64()).to_pylist() if name == "timestamp"
               else batch.column(name).to_pylist() for name in EVENT_KEY]
    return sorted(zip(*columns, strict=True), key=repr)


@pytest.mark.skipif(not FRAME_CODEC, reason="the C frame codec is not built here")
def test_a_gap_page_in_columns_keeps_what_value_by_value_keeps():
    reference, gaps = restarted()
    reference.add_gaps(list(channel_decoder.decode(body(PAGE)).items), 0)
    reference.filter.gaps_done(gaps)

    buffer, gaps = restarted()
    decoded = extract_page(body(PAGE), 0, buffer.index)
    assert decoded is not None
    columns = decoded[0]
    bulk_before = buffer._bulk_rows
    buffer.add_gap_columns(columns)
    assert buffer._bulk_rows - bulk_before == 7  # A's 150 (two events), 200, 250 and 300 (9.0); B's 100 (1.5), 200
    assert buffer.filter._compact.closed == 2  # decided as arrays: never objects
    buffer.filter.gaps_done(gaps)

    assert rows(buffer) == rows(reference)
    f, g = buffer.filter, reference.filter
    assert (f.stats.repeats_dropped, f.stats.gap_outside_window) == (g.stats.repeats_dropped, g.stats.gap_outside_window)
    assert f.stats.repeats_dropped == 8  # A: 90, 100, 150 again, 200 again, 300 (3.0); B: 100 (1.0); C: 100, 400
    assert f.stats.gap_outside_window == 2  # A's 40, B's 310
    assert f.open_gaps() == 0 and not len(f.open_windows()) and not f._seen


@pytest.mark.skipif(not FRAME_CODEC, reason="the C frame codec is not built here")
def test_gap_rows_in_columns_become_recent_events_a_later_connect_knows():
    """A reconnect after a page of the gap was taken in columns: the new window knows the gap's events
    within the look-back of the floor (pending rows), so reading it back drops them."""
    buffer, gaps = restarted()
    decoded = extract_page(body({"A": [(260, 2.6), (280, 2.8)]}), 0, buffer.index)
    assert decoded is not None
    buffer.add_gap_columns(decoded[0])
    buffer.filter.gaps_done([g for g in gaps if g.webid == "A"])
    buffer.connected(["A"])
    _, again = buffer.add_live_batch([live(("A", 320, 3.2))])
    assert list(again) == [GapRequest("A", at(250), at(320))]
    repeats = buffer.filter.stats.repeats_dropped
    buffer.add_gaps(list(channel_decoder.decode(body({"A": [(260, 2.6), (280, 2.8), (300, 3.0), (310, 3.1)]})).items), 0)
    assert buffer.filter.stats.repeats_dropped - repeats == 3
    assert [t for w, t, *_ in rows(buffer) if w == "A" and t > at(250)] == [at(260), at(280), at(300), at(310), at(320)]


def test_events_compare_as_event_keys_do():
    """Nulls equal nulls and NaN equals NaN, as in the keys (NaN made equal to itself); 0.0 equals -0.0."""
    def table(values: list[float | None], texts: list[str | None]) -> pa.Table:
        n = len(values)
        return pa.table({"value": pa.array(values, pa.float64()), "value_text": pa.array(texts, pa.string()),
                         "state_code": pa.array([None, 1, None, None, None], pa.int32()),
                         **{name: pa.array([True] * n) for name in EVENT_KEY[5:]}})

    a = table([float("nan"), None, 1.0, 0.0, 2.0], [None, None, "x", None, None])
    b = table([float("nan"), None, 1.0, -0.0, None], [None, None, "x", None, None])
    assert same_events(a, b).tolist() == [True, True, True, True, False]
    c = table([float("nan"), None, 1.0, 0.0, 2.0], [None, "y", "x", None, None])
    assert same_events(a, c).tolist() == [True, False, True, True, True]


def test_only_tags_with_one_compact_window_being_read_are_decided_as_arrays():
    buffer, _ = restarted()
    ids = np.array([buffer.index.ids[w] for w in "ABC"], np.int32)
    assert buffer.filter.compact_gap_rows(ids).tolist() == [True, True, False]  # C's windows are objects
