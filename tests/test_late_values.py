"""A late burst (values older than what the channel already delivered for their tag) takes the bulk path and
decides exactly as value by value does: repeats of recent events dropped, older values kept, newer values
move the floor, and a tag with a gap being read back is left to the careful path."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import pytest

from pistream.pi.flow import Live
from pistream.pi.messages import channel_decoder
from pistream.stream.buffer import ColumnBuffer, StreamInfo
from pistream.stream.columns import FRAME_CODEC, extract
from pistream.stream.dedup import EventFilter

T0 = datetime(2026, 3, 1, tzinfo=UTC)
LOOKBACK_US = 2_000_000  # --reread-seconds 2, the default
TAGS = [f"W{i}" for i in range(20)]


def iso(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def frame(values: dict[str, list[tuple[float, object]]]) -> bytes:
    items = [{"WebId": webid, "Items": [{"Timestamp": iso(s), "Value": v, "Good": True} for s, v in tvs]}
             for webid, tvs in values.items()]
    return json.dumps({"Items": items}).encode()


def make_buffer() -> ColumnBuffer:
    return ColumnBuffer({w: StreamInfo(f"\\\\S\\{w}", w, "m") for w in TAGS}, EventFilter(lookback_us=LOOKBACK_US))


def snapshot_then_history(rng: random.Random) -> list[bytes]:
    """Each tag's current value at t=1000 s first, then its history 500..1000 s at 1 Hz in frames of
    50 s, with repeats of recent events (the snapshot itself, a value inside the look-back) and a value
    newer than the snapshot at the end."""
    frames = [frame({w: [(1000.0, 1.5)] for w in TAGS})]
    for start in range(500, 1000, 50):
        part: dict[str, list[tuple[float, object]]] = {}
        for w in TAGS:
            tvs: list[tuple[float, object]] = [(float(s), rng.choice([rng.random(), "text", 7])) for s in
                                               range(start, start + 50)]
            if start == 950:
                tvs.append((999.5, 0.25))  # inside the look-back: new, kept
                tvs.append((1000.0, 1.5))  # the snapshot again: a repeat
                tvs.append((1001.0, 2.5))  # newer than the floor
            part[w] = tvs
        frames.append(frame(part))
    frames.append(frame({w: [(999.5, 0.25), (1002.0, 3.5)] for w in TAGS}))  # a repeat in the band, and new
    return frames


def rows_of(buffer: ColumnBuffer) -> list[tuple]:
    flush = buffer.take()
    assert flush is not None
    return sorted((r["tag_webid"], r["timestamp"], repr(r["value"]), r["value_text"], r["state_code"])
                  for r in flush.batch.to_pylist())


def value_by_value(frames: list[bytes]) -> tuple[list[tuple], EventFilter]:
    buffer = make_buffer()
    for i, raw in enumerate(frames):
        for stream in channel_decoder.decode(raw).items or ():
            assert buffer.add_live(stream, i) is None
    return rows_of(buffer), buffer.filter


def in_bulk(frames: list[bytes], raw: bool) -> tuple[list[tuple], EventFilter]:
    buffer = make_buffer()

    def refuse(*_args, **_kwargs):
        raise AssertionError("a late burst went value by value")

    buffer.add_live = refuse  # type: ignore[method-assign]
    for i, data in enumerate(frames):
        item = Live(i, None, data, "c") if raw else Live(i, channel_decoder.decode(data))
        count, gaps = buffer.add_live_batch([item])
        assert count and gaps == []
    return rows_of(buffer), buffer.filter


@pytest.mark.parametrize("raw", [pytest.param(True, id="c-codec"), pytest.param(False, id="msgspec")])
def test_a_late_burst_in_bulk_keeps_and_drops_what_value_by_value_does(raw):
    if raw and not FRAME_CODEC:
        pytest.skip("the C frame codec is not built here")
    frames = snapshot_then_history(random.Random(7))
    expected, reference = value_by_value(frames)
    got, bulk = in_bulk(frames, raw)
    assert got == expected
    assert len(got) == len(TAGS) * (1 + 500 + 1 + 1 + 1)  # snapshot, history, 999.5, 1001, 1002
    assert bulk.stats.repeats_dropped == reference.stats.repeats_dropped == 2 * len(TAGS)
    assert bulk.stats.late_accepted == reference.stats.late_accepted > 0
    assert bulk.floors.get("W3") == reference.floors.get("W3")


def taken_in_bulk(buffer: ColumnBuffer, data: bytes) -> bool:
    streams = list(channel_decoder.decode(data).items or ())
    columns = extract(streams, [1] * len(streams), buffer.index)
    assert columns is not None
    return buffer._accept_bulk(columns)


def test_a_tag_with_a_gap_being_read_is_left_to_the_careful_path():
    buffer = make_buffer()
    assert taken_in_bulk(buffer, frame({"W1": [(1000.0, 1.0)], "W2": [(1000.0, 1.0)]}))
    assert taken_in_bulk(buffer, frame({"W1": [(900.0, 1.0)], "W2": [(900.0, 1.0)]}))  # late, no gap: bulk
    buffer.connected(["W1"])  # a reconnect: W1 waits for its first live value, then its gap is read
    assert not taken_in_bulk(buffer, frame({"W1": [(990.0, 2.0)]}))
    _, gaps = buffer.add_live_batch([Live(2, None, frame({"W1": [(1010.0, 3.0)]}), "c")])  # opens the gap
    assert len(gaps) == 1 and buffer.filter.any_window(["W1"])  # open until it has been read back
    assert not taken_in_bulk(buffer, frame({"W1": [(995.0, 4.0)], "W2": [(995.0, 4.0)]}))
    assert taken_in_bulk(buffer, frame({"W2": [(996.0, 4.0)]}))
