"""JSON bodies of the simulator, shaped after the PI Web API 2018 SP1 Swagger definitions.

msgspec Structs keep the PascalCase field order of the real server and encode several times faster than
dicts; the one ``ENCODER`` is built once and shared (the simulator runs on one Trio thread).
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from pistream.sim.model import SimEvent, SimTag
from pistream.sim.pitime import format_timestamp
from pistream.webid import dataserver_webid

ENCODER = msgspec.json.Encoder()
DECODER = msgspec.json.Decoder()
_NO_LINKS: dict[str, str] = {}
_SERVER_ID_NAMESPACE = uuid.UUID("6f1d7a52-4b8e-4c36-9a51-2f0d3c1e9b70")
SERVER_VERSION = "3.4.440.477"


class TimedValue(msgspec.Struct):
    Timestamp: str
    Value: Any
    UnitsAbbreviation: str
    Good: bool
    Questionable: bool
    Substituted: bool
    Annotated: bool


class StreamValues(msgspec.Struct):
    """One stream in a streamset answer or channel message (``streamsets/recorded``, ``.../channel``)."""

    WebId: str
    Name: str
    Path: str
    Links: dict[str, str]
    UnitsAbbreviation: str
    Items: list[TimedValue]


class StreamItems(msgspec.Struct):
    """``Links`` + ``Items``: the envelope of lists and of channel messages."""

    Links: dict[str, str]
    Items: list[Any]


class TimedValues(msgspec.Struct):
    Links: dict[str, str]
    Items: list[TimedValue]
    UnitsAbbreviation: str


class Point(msgspec.Struct):
    WebId: str
    Id: int
    Name: str
    Path: str
    Descriptor: str
    PointClass: str
    PointType: str
    DigitalSetName: str
    EngineeringUnits: str
    Span: float
    Zero: float
    Step: bool
    Future: bool
    DisplayDigits: int
    Links: dict[str, str]


class DataServer(msgspec.Struct):
    WebId: str
    Id: str
    Name: str
    Path: str
    IsConnected: bool
    ServerVersion: str
    ServerTime: str
    Links: dict[str, str]


class PointItem(msgspec.Struct):
    """An ``Item[Point]`` of ``points/multiple``."""

    Identifier: str
    IdentifierType: str
    Object: Point | None
    Exception: dict[str, list[str]] | None


def errors(*messages: str) -> dict[str, list[str]]:
    """The ``{"Errors": [...]}`` body every PI Web API failure carries."""
    return {"Errors": list(messages)}


def timed_value(event: SimEvent, units: str) -> TimedValue:
    return TimedValue(
        format_timestamp(event.timestamp_us),
        event.value,
        units,
        event.good,
        event.questionable,
        event.substituted,
        event.annotated,
    )


def timed_values(events: list[SimEvent], units: str) -> list[TimedValue]:
    return [
        TimedValue(
            format_timestamp(e.timestamp_us),
            e.value,
            units,
            e.good,
            e.questionable,
            e.substituted,
            e.annotated,
        )
        for e in events
    ]


def stream_values(tag: SimTag, events: list[SimEvent], links: dict[str, str] | None = None) -> StreamValues:
    units = tag.units
    return StreamValues(tag.webid, tag.name, tag.path, links or _NO_LINKS, units, timed_values(events, units))


def server_id(server: str) -> str:
    """A stable GUID per server name, as PI gives each Data Archive one."""
    return str(uuid.uuid5(_SERVER_ID_NAMESPACE, server.upper()))


def server_webid(server: str) -> str:
    return dataserver_webid("\\\\" + server)


def data_server(server: str, base_url: str, now_us: int) -> DataServer:
    webid = server_webid(server)
    self_url = f"{base_url}/dataservers/{webid}"
    return DataServer(
        WebId=webid,
        Id=server_id(server),
        Name=server,
        Path=f"\\\\PIServer[{server}]",
        IsConnected=True,
        ServerVersion=SERVER_VERSION,
        ServerTime=format_timestamp(now_us),
        Links={
            "Self": self_url,
            "Points": f"{self_url}/points",
            "EnumerationSets": f"{self_url}/enumerationsets",
        },
    )


def point(tag: SimTag, base_url: str) -> Point:
    webid = tag.webid
    stream = f"{base_url}/streams/{webid}"
    return Point(
        WebId=webid,
        Id=tag.index + 1,
        Name=tag.name,
        Path=tag.path,
        Descriptor=f"pistream simulated {tag.kind} point",
        PointClass="classic",
        PointType=tag.point_type,
        DigitalSetName=tag.digital_set,
        EngineeringUnits=tag.units,
        Span=100.0,
        Zero=0.0,
        Step=tag.kind in ("digital", "string"),
        Future=False,
        DisplayDigits=-5,
        Links={
            "Self": f"{base_url}/points/{webid}",
            "DataServer": f"{base_url}/dataservers/{server_webid(tag.server)}",
            "Attributes": f"{base_url}/points/{webid}/attributes",
            "Value": f"{stream}/value",
            "InterpolatedData": f"{stream}/interpolated",
            "RecordedData": f"{stream}/recorded",
            "PlotData": f"{stream}/plot",
            "SummaryData": f"{stream}/summary",
            "EndValue": f"{stream}/end",
        },
    )


def landing(base_url: str) -> dict[str, Any]:
    return {
        "Links": {
            "Self": f"{base_url}/",
            "AssetServers": f"{base_url}/assetservers",
            "DataServers": f"{base_url}/dataservers",
            "Search": f"{base_url}/search",
            "System": f"{base_url}/system",
        }
    }


def select_fields(content: Any, selected: str) -> Any:
    """Apply ``selectedFields`` (``Items.Timestamp;Items.Value``): keep only the listed dotted paths."""
    paths = [tuple(part.lower() for part in p.strip().split(".")) for p in selected.split(";") if p.strip()]
    return _prune(msgspec.to_builtins(content), paths)


def _prune(node: Any, paths: list[tuple[str, ...]]) -> Any:
    if not paths or any(not p for p in paths):
        return node
    if isinstance(node, list):
        return [_prune(item, paths) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        sub = [p[1:] for p in paths if p[0] == key.lower()]
        if sub:
            out[key] = _prune(value, sub)
    return out
