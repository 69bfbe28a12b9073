"""Every value kind a PI Web API channel sends, decoded into the table's columns."""

import math
from datetime import UTC, date, datetime

import pytest

from pistream.pi.flow import Live
from pistream.pi.messages import channel_decoder, classify_value
from pistream.stream.buffer import ColumnBuffer, StreamInfo
from pistream.stream.schema import BUFFER_SCHEMA
from pistream.timeutil import format_iso, parse_iso_us

WEBID = "P1DPU0lNU1JWXFRBRw"


def decode_rows(items_json: str, stream_extra: str = "") -> list[dict]:
    """The rows of one stream's values, read both in bulk and value by value: the two must agree."""
    frame = ('{"Links":{},"Items":[{"WebId":"%s","Name":"TAG","Path":"\\\\\\\\SRV\\\\TAG",'
             '"UnitsAbbreviation":"degC"%s,"Items":[%s]}]}' % (WEBID, stream_extra, items_json))
    by_path = []
    for path in ("frame", "bulk", "value by value"):
        buffer = ColumnBuffer({WEBID: StreamInfo("\\\\SRV\\TAG", WEBID, "degC")})
        message = channel_decoder.decode(frame)
        if path == "frame":
            buffer.add_live_batch([Live(1_700_000_000_000_000, None, frame)])
        elif path == "bulk":
            buffer.add_live_batch([Live(1_700_000_000_000_000, message)])
        else:
            for stream in message.items:
                buffer.add_live(stream, received_us=1_700_000_000_000_000)
        flush = buffer.take()
        assert flush is not None
        assert flush.batch.schema == BUFFER_SCHEMA  # written to the table as TABLE_SCHEMA
        by_path.append(flush.batch.to_pylist())
    frame_rows, bulk_rows, value_rows = by_path
    assert _same_rows(bulk_rows, value_rows) and _same_rows(frame_rows, value_rows)
    return value_rows


def _same_rows(a: list[dict], b: list[dict]) -> bool:
    """Equal, with NaN equal to NaN."""
    def normal(rows):
        return [{k: ("NaN" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    return normal(a) == normal(b)


def test_bulk_path_takes_every_value_kind_and_agrees_with_the_value_by_value_path():
    kinds = ['12.5', '7', 'true', '"text"', 'null', '{"Name":"On","Value":1,"IsSystem":false}',
             '{"Name":"I/O Timeout","Value":246,"IsSystem":true}', '"NaN"', '[1,2]', '9007199254740993']
    streams = []
    infos = {}
    for i, raw in enumerate(kinds * 3):
        webid = f"W{i}"
        infos[webid] = StreamInfo(f"\\\\SRV\\T{i}", webid, "m" if i % 2 else None)
        units = ',"UnitsAbbreviation":"s"' if i % 3 == 0 else ""
        streams.append('{"WebId":"%s","Items":[{"Timestamp":"2024-03-01T00:00:0%d.1234567Z","Value":%s%s,'
                       '"Good":%s}]}' % (webid, i % 10, raw, units, "true" if i % 4 else "false"))
    frame = '{"Items":[%s]}' % ",".join(streams)
    bulk = ColumnBuffer(infos)
    count, gaps = bulk.add_live_batch([Live(5, channel_decoder.decode(frame))])
    assert count == len(streams) and gaps == [] and len(bulk.tag_webid) == 0  # nothing went value by value
    by_value = ColumnBuffer(infos)
    for stream in channel_decoder.decode(frame).items:
        by_value.add_live(stream, 5)
    raw = ColumnBuffer(infos)
    count, gaps = raw.add_live_batch([Live(5, None, frame)])  # the channel frame as text (C codec)
    assert count == len(streams) and gaps == [] and len(raw.tag_webid) == 0
    bulk_rows, value_rows = bulk.take().batch.to_pylist(), by_value.take().batch.to_pylist()
    assert len(bulk_rows) == len(streams) and _same_rows(bulk_rows, value_rows)
    assert _same_rows(raw.take().batch.to_pylist(), value_rows)
    assert {r["uom"] for r in bulk_rows} == {"s", "m", None}


def test_float_value_fills_every_column():
    [row] = decode_rows('{"Timestamp":"2024-03-01T12:00:00.5Z","Value":12.25,"UnitsAbbreviation":"degC",'
                        '"Good":true,"Questionable":false,"Substituted":false,"Annotated":false}')
    assert row == {
        "tag": "\\\\SRV\\TAG", "tag_webid": WEBID,
        "timestamp": datetime(2024, 3, 1, 12, 0, 0, 500000, tzinfo=UTC),
        "value": 12.25, "value_text": None, "state_code": None, "system_state": False, "uom": "degC",
        "good": True, "questionable": False, "substituted": False, "annotated": False,
        "received_timestamp": datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC),
        "partition_date": date(2024, 3, 1),
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("42", (42.0, None, None, False)),
        ("true", (1.0, "true", None, False)),
        ('"batch-7"', (None, "batch-7", None, False)),
        ('"2024-01-01T00:00:00Z"', (None, "2024-01-01T00:00:00Z", None, False)),
        ("[1,2,3]", (None, "[1,2,3]", None, False)),
        ('{"Name":"On","Value":1,"IsSystem":false}', (None, "On", 1, False)),
        ('{"Name":"I/O Timeout","Value":246,"IsSystem":true}', (None, "I/O Timeout", 246, True)),
        ("9007199254740993", (9007199254740992.0, "9007199254740993", None, False)),
    ],
)
def test_value_kinds_land_in_their_own_columns(raw, expected):
    [row] = decode_rows('{"Timestamp":"2024-03-01T00:00:00Z","Value":%s,"Good":true}' % raw)
    assert (row["value"], row["value_text"], row["state_code"], row["system_state"]) == expected


def test_system_state_without_good_flag_is_not_good_and_code_stays_out_of_value():
    [row] = decode_rows('{"Timestamp":"2024-03-01T00:00:00Z","Value":{"Name":"Shutdown","Value":254,'
                        '"IsSystem":true}}')
    assert row["value"] is None and row["state_code"] == 254 and row["good"] is False


def test_error_value_is_kept_as_text_and_marked_bad():
    [row] = decode_rows('{"Timestamp":"2024-03-01T00:00:00Z","Value":{"Errors":["Point not found"]}}')
    assert (row["value"], row["value_text"], row["good"]) == (None, "Point not found", False)


def test_flags_sent_as_strings_and_unknown_fields_are_accepted():
    [row] = decode_rows('{"Timestamp":"2024-03-01T00:00:00Z","Value":1.5,"Good":"false",'
                        '"Questionable":"True","Substituted":"false","Annotated":"true","Extra":{"x":1}}')
    assert (row["good"], row["questionable"], row["substituted"], row["annotated"]) == (False, True, False, True)


def test_per_stream_value_object_instead_of_items():
    frame = ('{"Items":[{"WebId":"%s","Value":{"Timestamp":"2024-03-01T00:00:00Z","Value":3.0}}]}' % WEBID)
    buffer = ColumnBuffer({WEBID: StreamInfo("\\\\SRV\\TAG", WEBID)})
    for stream in channel_decoder.decode(frame).items:
        buffer.add_live(stream, 0)
    assert buffer.take().batch.column("value").to_pylist() == [3.0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-03-01T00:00:00Z", "2024-03-01T00:00:00Z"),
        ("2024-03-01T00:00:00.1Z", "2024-03-01T00:00:00.1Z"),
        ("2024-03-01T00:00:00.123Z", "2024-03-01T00:00:00.123Z"),
        ("2024-03-01T00:00:00.123456Z", "2024-03-01T00:00:00.123456Z"),
        ("2024-03-01T00:00:00.1234567Z", "2024-03-01T00:00:00.123456Z"),
        ("2024-03-01T00:00:00.1234567+00:00", "2024-03-01T00:00:00.123456Z"),
        ("2024-03-01T02:00:00+02:00", "2024-03-01T00:00:00Z"),
    ],
)
def test_timestamps_with_0_to_7_fraction_digits(text, expected):
    [row] = decode_rows('{"Timestamp":"%s","Value":1}' % text)
    assert format_iso(int(row["timestamp"].timestamp() * 1_000_000 + 0.5)) == expected
    assert format_iso(parse_iso_us(text)) == expected


def test_mixed_timestamp_forms_in_one_batch_fall_back_without_loss():
    rows = decode_rows('{"Timestamp":"2024-03-01T00:00:00Z","Value":1},'
                       '{"Timestamp":"9999-12-31T23:59:59.1234567Z","Value":2},'
                       '{"Timestamp":"2024-03-01T00:00:01","Value":3}')
    assert [r["timestamp"].year for r in rows] == [2024, 9999, 2024]
    assert rows[1]["partition_date"] == date(9999, 12, 31)


def test_unparseable_timestamp_is_rejected_and_counted_not_written():
    frame = ('{"Items":[{"WebId":"%s","Items":[{"Timestamp":"yesterday","Value":1},'
             '{"Timestamp":"2024-03-01T00:00:00Z","Value":2}]}]}' % WEBID)
    buffer = ColumnBuffer({WEBID: StreamInfo("\\\\SRV\\TAG", WEBID)})
    for stream in channel_decoder.decode(frame).items:
        buffer.add_live(stream, 0)
    flush = buffer.take()
    assert flush.rejected == 1
    assert flush.batch.column("value").to_pylist() == [2.0]


def test_exact_repeats_are_dropped_but_substituted_edits_are_new_rows():
    rows = decode_rows('{"Timestamp":"2024-03-01T00:00:00Z","Value":1.0},'
                       '{"Timestamp":"2024-03-01T00:00:00Z","Value":1.0},'
                       '{"Timestamp":"2024-03-01T00:00:00Z","Value":1.5,"Substituted":true}')
    assert [(r["value"], r["substituted"]) for r in rows] == [(1.0, False), (1.5, True)]


def test_heartbeat_messages_have_no_items():
    assert not channel_decoder.decode(b'{"Links":{},"Items":[]}').items
    assert not channel_decoder.decode(b'{"Links":{}}').items


def test_classify_keeps_unknown_objects_as_json_text():
    assert classify_value({"Foo": 1}) == (None, '{"Foo":1}', None, False, False)
