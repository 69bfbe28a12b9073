"""JSON bodies of the simulator, shaped after the PI Web API 2018 SP1 Swagger definitions.

msgspec Structs keep the PascalCase field order of the real server and encode several times faster than
dicts; the one ``ENCODER`` is built once and shared (the simulator runs on one Trio thread).
"""

from __future__ import annotations

import base64
import functools
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from pistream.pi.webid import dataserver_webid, upper_invariant
from pistream.sim.model import SimEvent, SimTag
from pistream.sim.pitime import format_timestamp

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
    Items: list[Any]  # TimedValue, or dicts when Quirks are on
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


class Attribute(msgspec.Struct):
    """An AF attribute (``attributes?path=``, ``attributes/{webId}``, ``attributes/multiple``)."""

    WebId: str
    Id: str
    Name: str
    Description: str
    Path: str
    Type: str
    TypeQualifier: str
    DefaultUnitsName: str
    DefaultUnitsNameAbbreviation: str
    DisplayDigits: int
    DataReferencePlugIn: str
    ConfigString: str
    IsConfigurationItem: bool
    IsExcluded: bool
    IsHidden: bool
    IsManualDataEntry: bool
    HasChildren: bool
    CategoryNames: list[str]
    Step: bool
    TraitName: str
    Span: float
    Zero: float
    Links: dict[str, str]


class PointItem(msgspec.Struct):
    """An ``Item[Point]`` of ``points/multiple`` (or ``Item[Attribute]`` of ``attributes/multiple``)."""

    Identifier: str
    IdentifierType: str
    Object: Point | Attribute | None
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
    return StreamValues(
        tag.webid, tag.display_name, tag.path, links or _NO_LINKS, units, timed_values(events, units)
    )


@dataclass(frozen=True, slots=True)
class Quirks:
    """Wire-format variations seen on real servers, for decoder tests. None changes what a correct client
    writes (see ``model`` for the mapping): they only change how the same events are spelled.

    - ``string_flags``: ``"Good": "true"`` instead of ``true`` (all four flags, REST and channels).
    - ``value_object``: a channel stream with exactly one value carries ``"Value": {...}`` instead of
      ``"Items": [...]``.
    - ``ticks``: 7 fractional digits (.NET ticks) whose 7th digit is never 0, e.g. ``...:05.5000003Z``: a
      client must truncate to the microsecond, not round.
    - ``utc_offset``: ``+00:00`` instead of ``Z``.
    """

    string_flags: bool = False
    value_object: bool = False
    ticks: bool = False
    utc_offset: bool = False

    @property
    def any(self) -> bool:
        return self.string_flags or self.value_object or self.ticks or self.utc_offset


class Wire:
    """Renders events as the server spells them: the fast Struct path, or with ``Quirks``."""

    def __init__(self, quirks: Quirks | None = None) -> None:
        self.quirks = quirks or Quirks()

    def timestamp(self, us: int) -> str:
        q = self.quirks
        text = format_timestamp(us, 6)[:-1] + str(1 + us % 9) + "Z" if q.ticks else format_timestamp(us)
        return text[:-1] + "+00:00" if q.utc_offset else text

    def _flag(self, value: bool) -> bool | str:
        return ("true" if value else "false") if self.quirks.string_flags else value

    def timed_value(self, event: SimEvent, units: str) -> Any:
        if not self.quirks.any:
            return timed_value(event, units)
        flag = self._flag
        return {
            "Timestamp": self.timestamp(event.timestamp_us),
            "Value": event.value,
            "UnitsAbbreviation": units,
            "Good": flag(event.good),
            "Questionable": flag(event.questionable),
            "Substituted": flag(event.substituted),
            "Annotated": flag(event.annotated),
        }

    def timed_values(self, events: list[SimEvent], units: str) -> list[Any]:
        if not self.quirks.any:
            return timed_values(events, units)
        return [self.timed_value(e, units) for e in events]

    def stream_values(self, tag: SimTag, events: list[SimEvent], *, channel: bool = False) -> Any:
        if not self.quirks.any:
            return stream_values(tag, events)
        units = tag.units
        out: dict[str, Any] = {
            "WebId": tag.webid,
            "Name": tag.display_name,
            "Path": tag.path,
            "Links": _NO_LINKS,
            "UnitsAbbreviation": units,
        }
        if channel and self.quirks.value_object and len(events) == 1:
            out["Value"] = self.timed_value(events[0], units)
        else:
            out["Items"] = self.timed_values(events, units)
        return out


def server_id(server: str) -> str:
    """A stable GUID per server name, as PI gives each Data Archive one."""
    return str(uuid.uuid5(_SERVER_ID_NAMESPACE, server.upper()))


@functools.lru_cache(maxsize=1024)
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


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(upper_invariant(text).encode("utf-8")).rstrip(b"=").decode("ascii")


def attribute(tag: SimTag, base_url: str) -> Attribute:
    """An AF attribute backed by a PI point data reference."""
    webid = tag.webid
    stream = f"{base_url}/streams/{webid}"
    element_path = tag.path.partition("|")[0]
    return Attribute(
        WebId=webid,
        Id=str(uuid.uuid5(_SERVER_ID_NAMESPACE, upper_invariant(tag.path))),
        Name=tag.display_name,
        Description=f"pistream simulated {tag.kind} attribute",
        Path=tag.path,
        Type=tag.af_type,
        TypeQualifier=tag.digital_set,
        DefaultUnitsName=tag.units_name,
        DefaultUnitsNameAbbreviation=tag.units,
        DisplayDigits=-5,
        DataReferencePlugIn="PI Point",
        ConfigString="\\\\%Server%\\%Element%.%Attribute%",
        IsConfigurationItem=False,
        IsExcluded=False,
        IsHidden=False,
        IsManualDataEntry=False,
        HasChildren=False,
        CategoryNames=[],
        Step=tag.kind in ("digital", "string", "bool"),
        TraitName="",
        Span=100.0,
        Zero=0.0,
        Links={
            "Self": f"{base_url}/attributes/{webid}",
            "Attributes": f"{base_url}/attributes/{webid}/attributes",
            "Element": f"{base_url}/elements/P1Em{_b64(element_path[2:])}",
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
    tree: dict[str, Any] = {}
    for text in selected.split(";"):
        parts = [part.lower() for part in text.strip().split(".")]
        if not all(parts):
            continue
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if child is _ALL:  # a shorter path already keeps everything below
                break
            node = child
        else:
            node[parts[-1]] = _ALL
    return _prune(msgspec.to_builtins(content), tree) if tree else msgspec.to_builtins(content)


_ALL: dict[str, Any] = {}  # marks "keep the whole subtree" in a selectedFields tree


def _prune(node: Any, tree: dict[str, Any]) -> Any:
    if tree is _ALL:
        return node
    if isinstance(node, list):
        return [_prune(item, tree) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        sub = tree.get(key.lower())
        if sub is not None:
            out[key] = _prune(value, sub)
    return out
