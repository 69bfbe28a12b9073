"""The simulator's value model and time handling: the ground truth every other simulator test relies on."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from pistream.pi.webid import attribute_webid, point_webid
from pistream.sim.groundtruth import expected_row
from pistream.sim.model import (
    ALL_KINDS,
    ERROR_VALUE,
    IO_TIMEOUT,
    MODES,
    SHUTDOWN,
    SimEvent,
    SimModel,
    SimTag,
    format_timestamp,
    kind_for_name,
    parse_time,
    table_columns,
)
from pistream.timeutil import format_iso, parse_iso_us

US = 1_000_000
NOW = 1_767_225_600 * US + 123_456  # 2026-01-01T00:00:00.123456Z


def iso_us(text: str) -> int:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (dt - datetime(1970, 1, 1, tzinfo=UTC)) // (datetime.resolution)


def test_tag_properties() -> None:
    tag = SimTag("Sinusoid", "MySrv", "float", 0)
    assert tag.path == "\\\\MySrv\\Sinusoid"
    assert tag.webid == point_webid("\\\\MySrv\\Sinusoid") == point_webid("\\\\MYSRV\\SINUSOID")
    assert (tag.units, tag.point_type, tag.digital_set) == ("degC", "Float32", "")
    assert (SimTag("A", "S", "int", 1).units, SimTag("A", "S", "int", 1).point_type) == ("count", "Int32")
    digital = SimTag("A", "S", "digital", 2)
    assert (digital.units, digital.point_type, digital.digital_set) == ("", "Digital", "Modes")
    assert SimTag("A", "S", "string", 3).point_type == "String"
    with pytest.raises(ValueError):
        SimTag("A", "S", "blob", 0)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("SINUSOID", "float"),
        ("Pump1.Mode", "digital"),
        ("valve_state", "digital"),
        ("DigitalIn", "digital"),
        ("BatchID", "string"),
        ("some.text", "string"),
        ("my_string", "string"),
        ("Counter", "int"),
        ("PUMP.INT", "int"),
        ("flow", "float"),
    ],
)
def test_kind_for_name(name: str, kind: str) -> None:
    assert kind_for_name(name) == kind


def test_from_paths_and_lookup() -> None:
    model = SimModel.from_paths(
        ["\\\\srv1\\Sinusoid", "\\\\SRV1\\pump.mode", "\\\\other\\BatchId", "\\\\SRV1\\SINUSOID"]
    )
    assert [(t.server, t.name, t.kind, t.index) for t in model.tags] == [
        ("srv1", "Sinusoid", "float", 0),
        ("SRV1", "pump.mode", "digital", 1),
        ("other", "BatchId", "string", 2),
    ]  # the duplicate (case-insensitive) is skipped
    assert model.servers == ["srv1", "other"]
    tag = model.tags[0]
    assert model.lookup("\\\\SRV1\\SINUSOID") is tag  # paths: case-insensitive
    assert model.lookup(tag.webid) is tag
    assert model.lookup(tag.webid.lower()) is None  # WebIDs: case-sensitive base64
    assert model.lookup("\\\\SRV1\\nope") is None
    for bad in ["SRV1\\X", "\\\\SRV1", "\\\\SRV1\\", "\\\\\\X"]:
        with pytest.raises(ValueError):
            SimModel.from_paths([bad])


def test_generated() -> None:
    model = SimModel.generated(6, rate=2, server="S")
    assert [t.name for t in model.tags] == [f"SIM{i:06d}" for i in range(6)]
    assert [t.kind for t in model.tags] == ["float", "int", "digital", "string", "float", "int"]
    assert model.period_us == 500_000
    assert model.servers == ["S"]
    with pytest.raises(ValueError):
        SimModel.generated(1, rate=0)


def test_values_are_deterministic_and_follow_the_rules() -> None:
    a, b = SimModel.generated(8, rate=10), SimModel.generated(8, rate=10)
    for ta, tb in zip(a.tags, b.tags, strict=True):
        assert a.events(ta, NOW - 60 * US, NOW) == b.events(tb, NOW - 60 * US, NOW)
    for tag in a.tags:
        for k in range(200):
            event = a.event(tag, k)
            assert event.timestamp_us == k * a.period_us + a.phase_us(tag)
            m = (k + tag.index) % 50
            assert event.questionable == (m == 31)
            assert not event.substituted and not event.annotated
            if m == 7:
                assert (event.value, event.good) == (IO_TIMEOUT, False)
            elif m == 23:
                assert (event.value, event.good) == (SHUTDOWN, False)
            else:
                assert event.good
                i = tag.index
                expected = {
                    "float": round(50 + 40 * math.sin(k / 10 + i), 6),
                    "int": (k * 13 + i) % 1000,
                    "digital": MODES[(k + i) % 4],
                    "string": f"batch-{i}-{k}",
                }[tag.kind]
                assert event.value == expected
    assert [m["Name"] for m in MODES] == ["Off", "On", "Auto", "Manual"]
    assert IO_TIMEOUT == {"Name": "I/O Timeout", "Value": 246, "IsSystem": True}
    assert SHUTDOWN == {"Name": "Shutdown", "Value": 254, "IsSystem": True}


def test_events_count_latest_agree() -> None:
    model = SimModel.generated(12, rate=3)
    for tag in model.tags:
        start, end = NOW - 7 * US, NOW
        events = model.events(tag, start, end)
        assert len(events) == model.count(tag, start, end) in (20, 21, 22)
        stamps = [e.timestamp_us for e in events]
        assert stamps == sorted(stamps) and all(start <= ts <= end for ts in stamps)
        assert model.latest(tag, end) == events[-1]
        assert model.latest(tag, events[-1].timestamp_us) == events[-1]  # inclusive
        assert model.latest(tag, events[-1].timestamp_us - 1) == events[-2]
        # both ends inclusive
        assert model.events(tag, stamps[0], stamps[-1]) == events
        assert model.events(tag, stamps[0] + 1, stamps[-1] - 1) == events[1:-1]
        assert model.count(tag, end, start) == 0 and model.events(tag, end, start) == []
        # cut and reverse without building the rest
        assert model.events(tag, start, end, max_count=5) == events[:5]
        assert model.events(tag, start, end, max_count=5, reverse=True) == events[::-1][:5]
        assert model.next_after(tag, stamps[0]) == events[1]
        assert isinstance(events[0], SimEvent)
    assert model.latest(model.tags[0], -1) is None
    assert model.count(model.tags[0], -10 * US, 0) == 1  # event 0 of tag 0 is at the epoch


def test_tags_tick_at_different_times_with_all_fraction_lengths() -> None:
    model = SimModel.generated(40, rate=1)
    latest = [model.latest(tag, NOW) for tag in model.tags]
    rendered = [format_timestamp(e.timestamp_us) for e in latest if e is not None]
    assert len(rendered) == len(model.tags)
    fraction_lengths = {len(r[20:-1]) if "." in r else 0 for r in rendered}
    assert fraction_lengths == {0, 1, 2, 3, 4, 5, 6}
    assert len({model.phase_us(tag) for tag in model.tags}) > 30


@pytest.mark.parametrize(
    ("us", "text"),
    [
        (iso_us("2026-01-02T03:04:05Z"), "2026-01-02T03:04:05Z"),
        (iso_us("2026-01-02T03:04:05.5Z"), "2026-01-02T03:04:05.5Z"),
        (iso_us("2026-01-02T03:04:05.123Z"), "2026-01-02T03:04:05.123Z"),
        (iso_us("2026-01-02T03:04:05.123456Z"), "2026-01-02T03:04:05.123456Z"),
        (iso_us("2026-01-02T03:04:05.000001Z"), "2026-01-02T03:04:05.000001Z"),
        (0, "1970-01-01T00:00:00Z"),
    ],
)
def test_format_and_parse_round_trip(us: int, text: str) -> None:
    assert format_timestamp(us) == text
    assert parse_time(text, NOW) == us


def test_format_fixed_digits() -> None:
    us = iso_us("2026-01-02T03:04:05.120000Z")
    assert format_timestamp(us, 0) == "2026-01-02T03:04:05Z"
    assert format_timestamp(us, 3) == "2026-01-02T03:04:05.120Z"
    assert format_timestamp(us, 7) == "2026-01-02T03:04:05.1200000Z"
    with pytest.raises(ValueError):
        format_timestamp(us, 8)


def test_parse_iso_variants() -> None:
    base = iso_us("2026-01-02T03:04:05Z")
    assert parse_time("2026-01-02T03:04:05.1234567Z", NOW) == base + 123_456  # .NET ticks, truncated
    assert parse_time("2026-01-02T03:04:05+00:00", NOW) == base
    assert parse_time("2026-01-02T03:04:05.5+00:00", NOW) == base + 500_000
    assert parse_time("2026-01-02T05:04:05+02:00", NOW) == base
    assert parse_time("2026-01-02T03:04:05", NOW) == base  # no zone: taken as UTC
    assert parse_time("2026-01-02", NOW) == iso_us("2026-01-02T00:00:00Z")
    assert parse_time("2026-01-02T03:04:05Z-1h", NOW) == base - 3600 * US


def test_parse_pi_time_syntax() -> None:
    midnight = iso_us("2026-01-01T00:00:00Z")
    assert parse_time("*", NOW) == NOW
    assert parse_time("*-10s", NOW) == NOW - 10 * US
    assert parse_time("*+1m", NOW) == NOW + 60 * US
    assert parse_time("*-2h", NOW) == NOW - 7200 * US
    assert parse_time("*-1d", NOW) == NOW - 86400 * US
    assert parse_time("* - 1.5 h", NOW) == NOW - 5400 * US
    assert parse_time("*-1d+2h", NOW) == NOW - 22 * 3600 * US
    assert parse_time("t", NOW) == midnight
    assert parse_time("T+8h", NOW) == midnight + 8 * 3600 * US
    assert parse_time("y", NOW) == midnight - 86400 * US
    assert parse_time("-5m", NOW) == NOW - 300 * US
    for bad in ["", "now", "*-1x", "*-", "2026-13-01T00:00:00Z", "yesterday!", "**"]:
        with pytest.raises(ValueError):
            parse_time(bad, NOW)


# -- value kinds, attributes, errors, and the table mapping --------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [("RunFlag", "bool"), ("Is.Bool", "bool"), ("Vib.Array", "array"), ("Cal.Timestamp", "timestamp")],
)
def test_kind_for_name_of_the_newer_kinds(name: str, kind: str) -> None:
    assert kind_for_name(name) == kind


def test_newer_kinds_and_error_values() -> None:
    model = SimModel.generated(14, rate=10, kinds=ALL_KINDS, error_values=True)
    assert [t.kind for t in model.tags[:7]] == list(ALL_KINDS)
    for tag in model.tags:
        for k in range(100):
            event = model.event(tag, k)
            m = (k + tag.index) % 50
            if m == 41:
                assert (event.value, event.good) == (ERROR_VALUE, False)
                continue
            if m in (7, 23):
                continue
            i = tag.index
            if tag.kind == "bool":
                assert event.value is ((k + i) % 3 != 0)
            elif tag.kind == "array":
                assert event.value == [k % 10, (k * 7 + i) % 100, i % 1000]
            elif tag.kind == "timestamp":
                assert parse_time(event.value, 0) == event.timestamp_us - ((k + i) % 3600) * US
    plain = SimModel.generated(14, rate=10, kinds=ALL_KINDS)
    assert not any(plain.event(t, k).value is ERROR_VALUE for t in plain.tags for k in range(100))
    assert (
        SimTag("X", "S", "array", 0).point_type == "Blob" and SimTag("X", "S", "bool", 0).af_type == "Boolean"
    )
    with pytest.raises(ValueError):
        SimModel.generated(1, kinds=())


@pytest.mark.parametrize(
    ("value", "columns"),
    [
        (12.5, (12.5, None, None, False)),
        (7, (7.0, None, None, False)),
        (True, (1.0, "true", None, False)),
        (False, (0.0, "false", None, False)),
        ("batch-1", (None, "batch-1", None, False)),
        ("2026-01-01T00:00:00Z", (None, "2026-01-01T00:00:00Z", None, False)),
        ([1, 2, 30], (None, "[1,2,30]", None, False)),
        (MODES[1], (None, "On", 1, False)),
        (SHUTDOWN, (None, "Shutdown", 254, True)),
        ({"Errors": ["a", "b"]}, (None, "a; b", None, False)),
    ],
)
def test_table_columns(value: object, columns: tuple) -> None:
    assert table_columns(value) == columns


def test_expected_rows_follow_the_mapping() -> None:
    model = SimModel.generated(7, rate=10, kinds=ALL_KINDS, error_values=True)
    for tag in model.tags:
        for event in model.events(tag, NOW - 10 * US, NOW):
            flags = (event.good, event.questionable, event.substituted, event.annotated)
            assert expected_row(event) == (event.timestamp_us, *table_columns(event.value), *flags)
            if event.value is ERROR_VALUE:
                assert not event.good


def test_attribute_paths() -> None:
    model = SimModel.from_paths(
        [
            "\\\\AF\\Plant\\Unit1\\Pump1|Flow",
            "\\\\af\\PLANT\\unit1\\pump1|FLOW",  # the same attribute
            "\\\\AF\\Plant\\Unit1|Mode|Batch Text",  # a child attribute
            "\\\\PI\\Sinusoid",
        ]
    )
    flow, text, point = model.tags
    assert (flow.server, flow.name, flow.display_name, flow.kind) == (
        "AF",
        "Plant\\Unit1\\Pump1|Flow",
        "Flow",
        "float",
    )
    assert flow.is_attribute and not point.is_attribute
    assert flow.webid == attribute_webid("\\\\AF\\Plant\\Unit1\\Pump1|Flow")
    assert (text.display_name, text.kind) == ("Batch Text", "string")
    assert model.lookup("\\\\af\\plant\\UNIT1\\Pump1|flow") is flow
    assert model.lookup(flow.webid) is flow
    assert model.servers == ["PI"]  # AF servers are not PI Data Archives
    for bad in [
        "\\\\AF\\Element|Attr",  # no database
        "\\\\AF\\DB\\|Attr",
        "\\\\AF\\DB\\E|",
        "\\\\AF\\DB\\E|A||B",
        "\\\\AF\\DB\\E|A\\B",
        "\\\\|X",
    ]:
        with pytest.raises(ValueError):
            SimModel.from_paths([bad])


def test_iso_time_agrees_with_the_main_package() -> None:
    for us in [0, 1, 999_999, NOW, NOW + 500_000, iso_us("2099-12-31T23:59:59.999999Z"), 86_400 * US * 3]:
        assert format_timestamp(us) == format_iso(us)
        assert parse_time(format_iso(us), NOW) == parse_iso_us(format_iso(us)) == us
    assert parse_time("2026-01-02T03:04:05,25Z", NOW) == iso_us("2026-01-02T03:04:05.25Z")  # PI takes commas
    assert parse_time("2026-01-02T03:04Z", NOW) == iso_us("2026-01-02T03:04:00Z")
