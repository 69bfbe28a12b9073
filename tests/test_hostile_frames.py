"""Hostile or odd single frames (issue 15): none may end a reader or the flusher; what cannot be decoded
is counted and logged as malformed with its channel and size, and the other frames' rows land."""

import numpy as np
import pytest
import structlog
import trio

import pistream.stream.columns as columns_module
from pistream.pi.channel import ChannelReader
from pistream.pi.flow import Live
from pistream.pi.messages import classify_value
from pistream.stream.buffer import ColumnBuffer, StreamInfo
from pistream.stream.columns import FRAME_CODEC
from pistream.stream.dedup import EventFilter
from pistream.stream.flusher import Flusher

GOOD = b'{"Items":[{"WebId":"W1","Items":[{"Timestamp":"2024-03-01T00:00:01Z","Value":2.5}]}]}'


def F(v: bytes) -> bytes:
    return b'{"Items":[{"WebId":"W1","Items":[{"Timestamp":"2024-03-01T00:00:00Z","Value":%s}]}]}' % v


def rows_three_ways(frame: bytes, buffer_factory=None) -> list[list[dict]]:
    """The frame's rows read raw (C codec where built), decoded, and after a good frame in one batch."""
    make = buffer_factory or (lambda: ColumnBuffer({"W1": StreamInfo("\\\\S\\T1", "W1", "m")}))
    out = []
    for items in ([Live(1, None, frame, "ch-1")], [Live(1, None, frame, "ch-1"), Live(2, None, GOOD, "ch-1")]):
        buffer = make()
        buffer.add_live_batch(items)
        flush = buffer.take()
        out.append(flush.batch.to_pylist() if flush is not None else [])
    return out


@pytest.mark.parametrize("is_system", [b"1", b'"yes"', b'"1"', b"[true]", b"{}", b"null"])
def test_issystem_that_is_not_a_bool_or_the_text_true_false_takes_the_default(is_system):
    alone, batch = rows_three_ways(F(b'{"Name":"x","Value":1,"IsSystem":%s}' % is_system))
    for rows in (alone, batch[:1]):
        [row] = rows
        assert (row["value"], row["value_text"], row["state_code"], row["system_state"], row["good"]) == \
            (None, "x", 1, False, True)
    assert [r["value"] for r in batch[1:]] == [2.5]
    assert classify_value({"Name": "x", "Value": 1, "IsSystem": " TRUE "})[3] is True
    assert classify_value({"Name": "x", "Value": 1, "IsSystem": "yes"})[3] is False


def test_an_integer_of_400_digits_is_kept_as_text_with_no_number():
    digits = b"1" + b"0" * 400
    alone, batch = rows_three_ways(F(digits))
    for rows in (alone, batch[:1]):
        [row] = rows
        assert row["value"] is None and row["value_text"] == digits.decode()
    assert [r["value"] for r in batch[1:]] == [2.5]


@pytest.mark.parametrize("code", [b"2147483648", b"-2147483649", b"9223372036854775808", b"1" + b"0" * 30])
def test_a_state_code_outside_int32_is_kept_whole_as_json_text_with_its_digits(code):
    alone, batch = rows_three_ways(F(b'{"Name":"Big","Value":%s,"IsSystem":true}' % code))
    for rows in (alone, batch[:1]):
        [row] = rows
        assert (row["value"], row["value_text"], row["state_code"], row["system_state"], row["good"]) == \
            (None, '{"Name":"Big","Value":%s,"IsSystem":true}' % code.decode(), None, True, False)
    assert [r["value"] for r in batch[1:]] == [2.5]


@pytest.mark.parametrize(("state", "text", "code"), [
    (b'{"Name":null,"Value":5}', None, 5),  # no name: null, not the text "None"
    (b'{"Value":5,"Name":null,"IsSystem":false}', None, 5),
    (b'{"Name":5,"Value":1}', '{"Name":5,"Value":1}', None),  # a name that is not text: the object as JSON
    (b'{"Name":["a"],"Value":1}', '{"Name":["a"],"Value":1}', None),
    (b'{"Name":"On","Value":1.5}', '{"Name":"On","Value":1.5}', None),  # a code that is not an integer
    (b'{"Name":"On","Value":"1"}', '{"Name":"On","Value":"1"}', None),
    (b'{"Name":null,"Value":null}', '{"Name":null,"Value":null}', None),
])
def test_odd_states_keep_what_was_sent(state, text, code):
    alone, batch = rows_three_ways(F(state))
    for rows in (alone, batch[:1]):
        [row] = rows
        assert (row["value"], row["value_text"], row["state_code"], row["system_state"]) == (None, text, code, False)


def test_an_integer_past_int64_is_a_number_and_its_digits():
    [row], _ = rows_three_ways(F(b"18446744073709551617"))
    assert row["value"] == 18446744073709551617.0 and row["value_text"] == "18446744073709551617"


def test_nesting_deeper_than_the_recursion_limit_is_a_malformed_frame_not_a_crash():
    deep = F(b"[" * 10000 + b"]" * 10000)
    buffer = ColumnBuffer({"W1": StreamInfo("\\\\S\\T1", "W1")})
    with structlog.testing.capture_logs() as logs:
        count, _ = buffer.add_live_batch([Live(1, None, deep, "ch-7"), Live(2, None, GOOD, "ch-7")])
    assert count == 1 and buffer.malformed == 1
    assert buffer.take().batch.column("value").to_pylist() == [2.5]
    [line] = [e for e in logs if e["event"] == "frame_malformed"]
    assert line["channel"] == "ch-7" and line["size"] == len(deep)


async def test_a_reader_counts_a_too_deep_small_frame_and_goes_on():
    send, receive = trio.open_memory_channel(1)
    reader = ChannelReader("ch-2", "http://127.0.0.1:9/piwebapi", ["W1"], send)
    with structlog.testing.capture_logs() as logs:
        assert reader._decode(b"[" * 120 + b"]" * 120) is None  # < RAW_FRAME_MIN: decoded in the reader
        assert reader._decode(b'{"Items":' + b"[" * 5000 + b"]" * 5000 + b"}") is None
        assert reader._decode(GOOD) is not None
    assert reader.stats.malformed == 2
    assert {(e["channel"], e["event"]) for e in logs if e["log_level"] == "error"} == {("ch-2", "frame_malformed")}
    await send.aclose()
    await receive.aclose()


@pytest.mark.parametrize("codec", [True, False] if FRAME_CODEC else [False])
def test_a_floor_for_a_tag_no_longer_configured_is_not_a_subscription(monkeypatch, codec):
    """A tag in the state file's floors that is no longer listed: no channel subscribed to it, so its values
    (and a foreign WebId's, even with a listed tag's Path) are dropped and counted, on either path."""
    if not codec:
        monkeypatch.setattr(columns_module, "_framecodec", None)
    made = []

    def make():
        event_filter = EventFilter()
        event_filter.floors.tags.add("W1")
        event_filter.floors.tags.add("OLD")  # in the state file's floors, no longer configured
        event_filter.floors["OLD"] = 1
        made.append(ColumnBuffer({"W1": StreamInfo("\\\\S\\T1", "W1", "m")}, event_filter))
        return made[-1]
    frame = (b'{"Items":[{"WebId":"OLD","Path":"\\\\\\\\S\\\\OLD","Items":[{"Timestamp":"2024-03-01T00:00:00Z",'
             b'"Value":7.0}]},{"WebId":"W1","Items":[{"Timestamp":"2024-03-01T00:00:00Z","Value":1.0}]},'
             b'{"WebId":"FOREIGN","Path":"\\\\\\\\S\\\\T1","Items":[{"Timestamp":"2024-03-01T00:00:02Z","Value":9.0},'
             b'{"Timestamp":"2024-03-01T00:00:03Z","Value":9.5}]}]}')
    alone, batch = rows_three_ways(frame, make)
    assert sorted((r["tag"], r["tag_webid"], r["value"]) for r in alone) == [("\\\\S\\T1", "W1", 1.0)]
    assert sorted((r["tag_webid"], r["value"]) for r in batch) == [("W1", 1.0), ("W1", 2.5)]
    assert [b.unsubscribed.values for b in made] == [3, 3]


async def test_the_flusher_outlives_a_frame_that_breaks_decoding(monkeypatch):
    """Past every fix above: an exception raised while taking one frame in is that frame's, not the
    flusher's. Forced here by a value the classifier cannot take."""
    import pistream.stream.buffer as buffer_module

    real = buffer_module.classify_value

    def fragile(raw):
        if raw == 666.0:
            raise ValueError("unforeseen")
        return real(raw)
    monkeypatch.setattr(buffer_module, "classify_value", fragile)
    monkeypatch.setattr(columns_module, "classify_value", fragile)
    monkeypatch.setattr(columns_module, "_framecodec", None)  # the msgspec paths, where the value is seen

    buffer = ColumnBuffer({"W1": StreamInfo("\\\\S\\T1", "W1")})
    in_send, in_receive = trio.open_memory_channel(10)
    out_send, out_receive = trio.open_memory_channel(10)
    flusher = Flusher(buffer, in_receive, out_send, max_rows=1000, max_age=60.0)
    bad = F(b"666")
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(flusher.run)
            async with in_send:
                await in_send.send(Live(1, None, bad, "ch-3"))
                await in_send.send(Live(2, None, GOOD, "ch-3"))
            flushes = [f async for f in out_receive]
    assert [v for f in flushes for v in f.batch.column("value").to_pylist()] == [2.5]
    assert buffer.malformed == 1
    [line] = [e for e in logs if e["event"] == "frame_malformed"]
    assert line["channel"] == "ch-3" and line["size"] == len(bad)
    assert np.all(np.array([f.batch.num_rows for f in flushes]) > 0)


HOSTILE = [
    F(b'{"Name":"x","Value":1,"IsSystem":1}'),
    F(b"1" + b"0" * 400),
    F(b'{"Name":"Big","Value":2147483648}'),
    F(b'{"Name":"Huge","Value":9223372036854775808}'),
    F(b'{"Name":null,"Value":3}'),
    F(b"[" * 10000 + b"]" * 10000),
    b"[" * 100 + b"]" * 100,  # small: decoded by the reader itself
    F(b'1,"Goo\\u0064":false'),
    F(b'"a\x01b"'),
    F(b"1e999"),
]


async def test_hostile_frames_over_a_real_channel_do_not_stop_the_pipeline():
    """A loopback WebSocket server sends each listed frame, then a good one; the real reader and flusher
    take them: every well-formed frame's row lands, the others are counted, and both keep running."""
    from trio_websocket import serve_websocket

    async def handler(request):
        ws = await request.accept()
        for i, frame in enumerate(HOSTILE):
            await ws.send_message(frame)
            await ws.send_message(GOOD.replace(b"00:00:01", b"00:01:%02d" % i))
        await trio.sleep_forever()

    buffer = ColumnBuffer({"W1": StreamInfo("\\\\S\\T1", "W1", "m")})
    incoming_send, incoming_receive = trio.open_memory_channel(100)
    out_send, out_receive = trio.open_memory_channel(100)
    flusher = Flusher(buffer, incoming_receive, out_send, max_rows=1000, max_age=0.2)
    with trio.fail_after(20), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
            await nursery.start(flusher.run)
            reader = ChannelReader("ch-e2e", f"http://127.0.0.1:{server.port}/piwebapi", ["W1"], incoming_send,
                                   heartbeat_rate=0, raw_frames=FRAME_CODEC)
            nursery.start_soon(reader.run)
            rows: list[dict] = []
            while len(rows) < 2 * len(HOSTILE) - 4:
                rows.extend((await out_receive.receive()).batch.to_pylist())
            nursery.cancel_scope.cancel()
    good = sorted(r["timestamp"].minute * 60 + r["timestamp"].second for r in rows if r["value"] == 2.5)
    assert good == [60 + i for i in range(len(HOSTILE))]  # every good frame after a hostile one
    odd = {(r["value"], r["value_text"], r["state_code"], r["system_state"]) for r in rows if r["value"] != 2.5}
    assert odd == {(None, "x", 1, False), (None, "1" + "0" * 400, None, False),
                   (None, '{"Name":"Big","Value":2147483648}', None, False),
                   (None, '{"Name":"Huge","Value":9223372036854775808}', None, False), (None, None, 3, False),
                   (1.0, None, None, False)}  # Goo\u0064 is Good: value 1, good false
    assert [r["good"] for r in rows if r["value"] == 1.0] == [False]
    assert reader.stats.malformed + buffer.malformed == 4  # too deep (twice), the control character, 1e999
    assert {e["channel"] for e in logs if e["event"] == "frame_malformed"} == {"ch-e2e"}
    assert {e["event"] for e in logs if e["log_level"] == "critical"} == set()
