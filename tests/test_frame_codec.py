"""The C frame codec reads channel frames straight into columns: it must agree with msgspec decoding plus
the value-by-value path on everything it accepts, and hand back (None) everything else."""

from __future__ import annotations

import json
import math
import random

import pytest

from pistream.pi.flow import Live
from pistream.pi.messages import channel_decoder
from pistream.sim.blast import PLACEHOLDER, frame_templates, wire_timestamp
from pistream.sim.model import SimModel
from pistream.stream.buffer import ColumnBuffer, StreamInfo
from pistream.stream.columns import FRAME_CODEC, TagIndex, extract_frames

pytestmark = pytest.mark.skipif(not FRAME_CODEC, reason="the C frame codec is not built here")


def rows_both_ways(frame: str, infos: dict[str, StreamInfo]) -> tuple[list[dict], list[dict], ColumnBuffer]:
    by_frame = ColumnBuffer(infos)
    by_frame.add_live_batch([Live(7, None, frame)])
    by_value = ColumnBuffer(infos)
    for stream in channel_decoder.decode(frame).items or ():
        by_value.add_live(stream, 7)
    taken = [b.take() for b in (by_frame, by_value)]
    return [t.batch.to_pylist() if t else [] for t in taken] + [by_frame]  # type: ignore[return-value]


def normal(rows: list[dict]) -> list[dict]:
    return sorted(({k: ("NaN" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                   for r in rows), key=lambda r: (r["tag_webid"], r["timestamp"]))


def test_the_codec_is_built_where_a_compiler_is():
    assert FRAME_CODEC  # CI builds it (gcc); a wheel without it falls back to the pure-Python bulk path


def test_simulator_frames_of_every_value_kind_read_the_same_as_decoded():
    model = SimModel.generated(300, rate=1.0)
    infos = {t.webid: StreamInfo(t.path, t.webid, t.units) for t in model.tags}
    for variant, template in enumerate(frame_templates(model, tuple(model.tags), 3)):
        frame = template.replace(PLACEHOLDER.encode(), wire_timestamp(1_790_000_000_123_456 + variant).encode())
        text = frame.decode()
        index = ColumnBuffer(infos).index
        assert extract_frames([text], [7], index) is not None  # the codec took it, not the fallback
        by_frame, by_value, buffer = rows_both_ways(text, infos)
        assert not buffer.tag_webid and len(by_frame) == 300
        assert normal(by_frame) == normal(by_value)


def test_layout_escapes_and_unknown_fields_do_not_matter():
    frame = ('{ "Links" : {"Self": "x"},\n "Items" : [ {"Extra": [1, {"a": [true, null]}], "Items" : [\n'
             ' {"Annotated": false, "Value" : -1.5e3 , "Timestamp" : "2024-03-01T00:00:00.1234567+01:30",'
             ' "UnitsAbbreviation": "\\u00b0C \\"x\\" \\ud83d\\ude00", "Good" : null, "Other": "\\\\"},'
             ' {"Timestamp": "2024-03-01 00:00:01Z", "Value": {"Name": "On", "Value": 1, "IsSystem": false},'
             '  "Questionable": true}], "UnitsAbbreviation": "m\\/s", "WebId": "W1", "Path": "\\\\\\\\S\\\\T"} ] }')
    infos = {"W1": StreamInfo("\\\\S\\T", "W1", "kg")}
    assert extract_frames([frame], [7], ColumnBuffer(infos).index) is not None
    by_frame, by_value, _ = rows_both_ways(frame, infos)
    assert normal(by_frame) == normal(by_value)
    assert [r["uom"] for r in by_frame] == ['°C "x" 😀', "m/s"]
    assert by_frame[0]["value"] == -1500.0 and by_frame[1]["value_text"] == "On"


@pytest.mark.parametrize("frame", [
    '{"Items":[{"WebId":"W1","Value":{"Timestamp":"2024-03-01T00:00:00Z","Value":1}}]}',  # Value, not Items
    '{"Items":[{"WebId":"W1","Items":[{"Timestamp":"2024-03-01T00:00:00Z","Value":1,"Good":"true"}]}]}',
    '{"Items":[{"WebId":"W1","Items":[{"Timestamp":"2024-03-01T00:00:00Z","Value":1,"Errors":["x"]}]}]}',
    '{"Items":[{"WebId":"W1","Items":[{"Timestamp":"yesterday","Value":1}]}]}',
    '{"Items":[{"WebId":"W1","Items":[{"Timestamp":"2024-02-30T00:00:00Z","Value":1}]}]}',
    '{"Items":[{"WebId":"W1","Items":[{"Timestamp":"2024-03-01T00:00:60Z","Value":1}]}]}',
    '{"Items":[{"WebId":"W1","Items":[{"Value":1}]}]}',
    '{"Items":[{"WebId":"W1","Items":[{"Timestamp":"2024-03-01T00:00:00Z","Value":NaN}]}]}',
    '{"Items":[],"WebException":{"StatusCode":502}}',
    '{"Items":[{"WebId":"W1","Items":[{"Timestamp":"2024-03-01T00:00:00Z","Value":1}]}]} trailing',
])
def test_what_it_does_not_fully_understand_goes_back_to_the_decoding_path(frame):
    assert extract_frames([frame], [7], ColumnBuffer({"W1": StreamInfo("P", "W1")}).index) is None


def test_a_webid_that_is_not_utf8_goes_back_to_the_decoding_path():
    frame = b'{"Items":[{"WebId":"W\xff1","Items":[{"Timestamp":"2024-03-01T00:00:00Z","Value":1}]}]}'
    assert extract_frames([frame], [7], ColumnBuffer({"W1": StreamInfo("P", "W1")}).index) is None


def test_tags_added_to_the_index_after_a_parse_are_found():
    """The codec keeps its own webid table for the index's dict; the dict grows in place (a tag found
    while running), and the table must follow it."""
    index = TagIndex()
    index.add("W1", "P1", None)
    frame = '{"Items":[{"WebId":"%s","Items":[{"Timestamp":"2024-03-01T00:00:00Z","Value":1}]}]}'
    assert extract_frames([frame % "W1"], [7], index) is not None
    foreign = extract_frames([frame % "W2"], [7], index)  # not a tag of ours (yet): no rows, listed
    assert foreign is not None and len(foreign) == 0 and foreign.unsubscribed == [("W2", 1)]
    index.add("W2", "P2", None)
    taken = extract_frames([frame % "W2", frame % "W1"], [7, 7], index)
    assert taken is not None and taken.ids.tolist() == [1, 0]


def test_streams_no_channel_subscribed_to_are_left_out_in_bulk():
    """A frame mixing our streams with foreign WebIds (one carrying our tag's Path) stays on the codec's
    path: the foreign streams' rows are dropped by id and listed as (webid, values), our rows keep the path
    tag resolution gave. Tags known only from floors (no longer listed) count as foreign too."""
    index = TagIndex()
    index.tags.add("OLD")  # a floor from the state file: an id, no path
    index.add("W1", "\\\\S\\T1", "m")
    value = '{"Timestamp":"2024-03-01T00:00:0%d","Value":%s}'
    frame = ('{"Items":[{"WebId":"X1","Path":"\\\\\\\\S\\\\T1","Items":[%s,%s]},{"WebId":"W1","Path":"\\\\\\\\EVIL",'
             '"Items":[%s]},{"WebId":"OLD","Items":[%s]},{"WebId":"X2","Items":[%s]}]}') % (
        value % (1, "1.0"), value % (2, '"text"'), value % (3, "3.5"), value % (4, "4.0"),
        value % (5, '{"Name":"On","Value":1}'))
    taken = extract_frames([frame], [7], index)
    assert taken is not None and len(taken) == 1
    assert taken.batch.to_pylist()[0]["tag"] == "\\\\S\\T1" and taken.batch.column("value").to_pylist() == [3.5]
    assert sorted(taken.unsubscribed) == [("OLD", 1), ("X1", 2), ("X2", 1)]
    # A foreign stream is read all the same: a value msgspec would refuse makes the frame the decoding path's.
    assert extract_frames([frame.replace('"text"', "1e999")], [7], index) is None


def test_truncated_and_mangled_frames_never_crash_or_half_parse():
    model = SimModel.generated(20, rate=1.0)
    infos = {t.webid: StreamInfo(t.path, t.webid, t.units) for t in model.tags}
    index = TagIndex()
    for w, info in infos.items():
        index.add(w, info.path, info.uom)
    frame = frame_templates(model, tuple(model.tags), 1)[0].replace(
        PLACEHOLDER.encode(), wire_timestamp(1_790_000_000_000_000).encode()).decode()
    rng = random.Random(5)
    for cut in range(0, len(frame), 7):
        assert extract_frames([frame[:cut]], [1], index) is None
    for _ in range(300):
        i = rng.randrange(len(frame))
        mangled = frame[:i] + rng.choice('{}[]",:x\\ 0') + frame[i + 1:]
        result = extract_frames([mangled], [1], index)
        try:
            json.loads(mangled)
        except ValueError:
            assert result is None  # malformed JSON is never taken


def test_a_malformed_raw_frame_is_logged_and_counted_and_the_rest_of_the_batch_goes_on():
    frame = '{"Items":[{"WebId":"W1","Items":[{"Timestamp":"2024-03-01T00:00:00Z","Value":1.5}]}]}'
    buffer = ColumnBuffer({"W1": StreamInfo("\\\\S\\T", "W1")})
    count, _ = buffer.add_live_batch([Live(1, None, b'{"Items":[{"WebId":', "ch-1"), Live(2, None, frame.encode())])
    assert count == 1 and buffer.malformed == 1
    assert buffer.take().batch.column("value").to_pylist() == [1.5]


def test_every_webid_of_a_large_index_maps_to_its_id_also_one_that_is_not_ascii():
    """The codec's table refers to the index's own webId strings; one that is not ASCII is looked up in
    the dict instead."""
    index = TagIndex()
    webids = [f"F1DP{i:06d}" for i in range(5000)] + ["Wé"]
    for webid in webids:
        index.add(webid, "P" + webid, None)
    stream = '{"WebId":"%s","Items":[{"Timestamp":"2024-03-01T00:00:00Z","Value":1}]}'
    frame = '{"Items":[' + ",".join(stream % w for w in reversed(webids)) + "]}"
    taken = extract_frames([frame], [7], index)
    assert taken is not None and taken.ids.tolist() == list(range(5000, -1, -1))


F_VALUE = '{"Items":[{"WebId":"W1","Items":[{"Timestamp":"2024-03-01T00:00:00Z","Value":%s}]}]}'
F_STREAM = '{"Items":[{"WebId":"W1",%s,"Items":[{"Timestamp":"2024-03-01T00:00:00Z","Value":1.5}]}]}'


@pytest.mark.parametrize("frame", [
    F_VALUE % '1,"Goo\\u0064":false', F_VALUE % '1,"Error\\u0073":["broken"]',
    F_VALUE.replace('"Value"', '"Valu\\u0065"') % "1", F_VALUE.replace('{"Items"', '{"Item\\u0073"') % "1",
    '{"Items":[],"Items":[{"WebId":"W1","Items":[{"Timestamp":"2024-03-01T00:00:00Z","Value":1}]}]}',
    F_STREAM % '"WebId":"W2"', F_VALUE % '1,"Value":2', F_STREAM % '"UnitsAbbreviation":"a","UnitsAbbreviation":"b"',
    F_VALUE % '"a\x01b"', F_VALUE % '1,"Skipped":"\x1f"', F_VALUE % '1,"Skipped":"\\udc00"',
    F_VALUE % '"\\ud800x"', F_STREAM % '"Name":5', F_STREAM % '"Path":{}', F_VALUE % "1e999", F_VALUE % "-1E400",
])
def test_what_msgspec_reads_otherwise_or_refuses_is_declined(frame):
    """Escaped or repeated keys, raw control characters, unpaired surrogates, non-string Name/Path and
    non-finite numbers: the codec declines, so the decoding path's answer (or its frame_malformed) stands."""
    index = TagIndex()
    index.add("W1", "\\\\S\\T", None)
    index.add("W2", "\\\\S\\T2", None)
    assert extract_frames([frame], [1], index) is None
    assert extract_frames([frame.encode("utf-8", "surrogatepass")], [1], index) is None
    infos = {"W1": StreamInfo("\\\\S\\T", "W1"), "W2": StreamInfo("\\\\S\\T2", "W2")}
    by_frame = ColumnBuffer(infos)
    by_frame.add_live_batch([Live(7, None, frame.encode("utf-8", "surrogatepass"), "ch")])
    try:
        message = channel_decoder.decode(frame.encode("utf-8", "surrogatepass"))
    except Exception:  # noqa: BLE001 - the decoding path's refusal: the frame is malformed on both paths
        assert by_frame.malformed == 1 and by_frame.take() is None
        return
    by_value = ColumnBuffer(infos)
    for stream in message.items or ():
        by_value.add_live(stream, 7)
    assert normal(by_frame.take().batch.to_pylist()) == normal(by_value.take().batch.to_pylist())


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xe0\x80\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"])
def test_invalid_utf8_in_any_string_is_declined(bad):
    index = TagIndex()
    index.add("W1", "\\\\S\\T", None)
    for frame in (F_VALUE.encode() % (b'"' + bad + b'"'), F_VALUE.encode() % (b'1,"Skip":"x' + bad + b'"'),
                  F_STREAM.encode() % (b'"UnitsAbbreviation":"' + bad + b'"')):
        assert extract_frames([frame], [1], index) is None
    good = F_VALUE.encode() % '"\u00b0C \U0001F600 \u20ac"'.encode()
    taken = extract_frames([good], [1], index)
    assert taken is not None and taken.batch.column("value_text").to_pylist() == ["\u00b0C \U0001F600 \u20ac"]


def test_minus_zero_is_the_integer_zero_as_msgspec_reads_it():
    index = TagIndex()
    index.add("W1", "\\\\S\\T", None)
    [value] = extract_frames([F_VALUE % "-0"], [1], index).batch.column("value").to_pylist()
    assert value == 0.0 and math.copysign(1.0, value) == 1.0
    [value] = extract_frames([F_VALUE % "-0.0"], [1], index).batch.column("value").to_pylist()
    assert math.copysign(1.0, value) == -1.0  # a float -0.0 stays (msgspec keeps it too)


def test_a_str_frame_with_a_lone_surrogate_is_declined_not_raised():
    index = TagIndex()
    index.add("W1", "\\\\S\\T", None)
    assert extract_frames([F_VALUE % '"\ud800"'], [1], index) is None


def test_received_times_must_be_exact_ints_so_no_python_code_runs_mid_parse():
    frames = [F_VALUE % "1", F_VALUE % "2"]

    class Sneaky(int):
        def __index__(self):
            frames.clear()  # what the borrowed-reference bug turned into a use-after-free
            return 1
    index = TagIndex()
    index.add("W1", "\\\\S\\T", None)
    with pytest.raises(TypeError):
        extract_frames(frames, [Sneaky(1), 2], index)
    assert len(frames) == 2


def test_many_distinct_strings_past_the_string_table_keep_their_own_text():
    index = TagIndex()
    index.add("W1", "\\\\S\\T", None)
    texts = [f"s{i}" for i in range(9000)] + ["s5", "s8999"]
    items = ",".join('{"Timestamp":"2024-03-01T00:00:%02d.%06dZ","Value":"%s"}' % (i // 10**6, i % 10**6, t)
                     for i, t in enumerate(texts))
    frame = '{"Items":[{"WebId":"W1","Items":[%s]}]}' % items
    taken = extract_frames([frame], [1], index)
    assert taken is not None and taken.batch.column("value_text").to_pylist() == texts
