"""Channel values to table columns in bulk, for the steady state: ``extract_frames`` reads raw frames
with the C codec (``_framecodec.c``); ``extract`` takes decoded msgspec Structs with C-level ``map`` and
Arrow conversions where the codec is not built or did not take the frames. Either way no Python loop per
value. Anything they do not expect (``Errors``, quality flags sent as text, an unparseable timestamp,
``Value`` instead of ``Items``) makes them return None, and the caller takes the value-by-value path, which
handles everything. Values under a WebId that no channel of this process subscribed to (that tag resolution
did not describe) never become rows, on any path: they are dropped by id, in bulk, and counted
(``Unsubscribed``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import attrgetter, is_not, itemgetter
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import structlog

from ..pi.messages import StreamValues, classify_value, flag
from ..pi.pages import PageDecoder
from ..timeutil import TIMESTAMP_US, to_us
from .floors import TagIds
from .schema import BUFFER_SCHEMA

log = structlog.get_logger(__name__)

_DATE = pa.date32()
_BOOL = pa.bool_()
_web_id = attrgetter("web_id")
_items = attrgetter("items")
_timestamp = attrgetter("timestamp")
_value = attrgetter("value")
_units = attrgetter("units_abbreviation")
_errors = attrgetter("errors")
_good = attrgetter("good")
_questionable = attrgetter("questionable")
_substituted = attrgetter("substituted")
_annotated = attrgetter("annotated")
_first = itemgetter(0)
_SEVEN_DIGITS = re.compile(r"(\.\d{6})\d+")

try:  # the C frame codec, built with the wheel where a compiler was at hand
    from . import _framecodec
except ImportError:  # pragma: no cover - exercised where the extension is not built
    _framecodec = None  # type: ignore[assignment]
FRAME_CODEC = _framecodec is not None
# Which decoder reads channel frames, for the start-up log line and ``pistream --version``: the extension is
# optional (a failed MSVC build falls back silently), so say which one runs.
DECODER = "C frame codec" if FRAME_CODEC else "msgspec (C frame codec not built)"


class TagIndex:
    """Small integer ids for streams, so that per-value work is array work: id -> webid, path, units.
    The ids are the exactly-once filter's (``TagIds``, shared), which may also know tags that no stream
    describes here (floors saved for tags no longer listed): those have no path until one is added.
    Paths are kept as one Arrow array only (the tag column's dictionary): as Python strs they were ~7 MB
    at 100,000 tags, and only the value-by-value path looks one up."""

    def __init__(self, tags: TagIds | None = None) -> None:
        self.tags = tags if tags is not None else TagIds()
        self.ids = self.tags.ids  # webid -> id (the C codec reads this dict)
        self.webids = self.tags.webids
        self.uoms: list[str | None] = []  # by id, like the paths
        self._paths: pa.Array = pa.array([], pa.string())
        self._new_paths: list[str | None] = []  # ids from len(_paths) on, added since it was last built
        self._webid_array: pa.Array | None = None
        self._uom_array: pa.Array | None = None
        self._units: dict[str, str] = {}  # one str per distinct unit (100k tags, a few units)
        self._holes: set[int] = set()  # ids below len(uoms) without a path
        self._described: np.ndarray | None = None  # by id: has a path (see ``subscribed``)

    def all_described(self, ids: np.ndarray) -> bool:
        """Whether every one of these ids has a path."""
        if not len(ids):
            return True
        if int(ids.max()) >= len(self.uoms):
            return False
        return not self._holes or bool(self.subscribed(ids).all())

    def stream_ids(self, webids: list[str | None]) -> np.ndarray:
        """The ids of these webids (int64), -1 for a webid the index does not know at all."""
        return np.fromiter(map(self.ids.get, webids, repeat(-1)), np.int64, len(webids))  # type: ignore[arg-type]

    def subscribed(self, ids: np.ndarray) -> np.ndarray:
        """A mask over ``ids`` (-1: unknown): which are streams tag resolution described, i.e. that a channel
        of this process subscribed to. The others (unknown webids, floors of tags no longer listed) have no
        resolved path: their values are not this process's to write."""
        if self._described is None or len(self._described) != len(self.uoms):
            described = np.ones(len(self.uoms), np.bool_)
            described[list(self._holes)] = False
            self._described = described
        inside = (ids >= 0) & (ids < len(self._described))
        if inside.all():
            return self._described[ids]
        mask = np.zeros(len(ids), np.bool_)
        mask[inside] = self._described[ids[inside]]
        return mask

    def described(self, webid: str) -> int | None:
        """The tag's id if a path was added for it."""
        tag_id = self.ids.get(webid)
        if tag_id is None or tag_id >= len(self.uoms) or tag_id in self._holes:
            return None
        return tag_id

    def add(self, webid: str, path: str, uom: str | None) -> int:
        known = self.described(webid)
        if known is not None:
            return known
        n = self.tags.add(webid)
        if n >= len(self.uoms):  # ids between, registered by the filter: no path yet
            self._holes.update(range(len(self.uoms), n))
            self._new_paths.extend([None] * (n + 1 - len(self.uoms)))
            self.uoms.extend([None] * (n + 1 - len(self.uoms)))
        self._holes.discard(n)
        built = len(self._paths)
        if n >= built:
            self._new_paths[n - built] = path
        else:  # a tag known before without a path (rare): the array is built again
            paths = self._paths.to_pylist()
            paths[n] = path
            self._paths = pa.array(paths, pa.string())
        self.uoms[n] = self._units.setdefault(uom, uom) if uom else uom
        self._webid_array = self._uom_array = None
        self._described = None
        return n

    def path(self, tag_id: int) -> str | None:
        built = len(self._paths)
        return self._paths[tag_id].as_py() if tag_id < built else self._new_paths[tag_id - built]

    def _path_array(self) -> pa.Array:
        if self._new_paths:
            self._paths = pa.concat_arrays([self._paths, pa.array(self._new_paths, pa.string())])
            self._new_paths = []
        return self._paths

    def uom_array(self) -> pa.Array:
        """Each id's units from tag resolution, for values and streams that name none."""
        if self._uom_array is None:
            self._uom_array = pa.array(self.uoms, pa.string())
        return self._uom_array

    def tag_columns(self, ids: np.ndarray) -> tuple[pa.DictionaryArray, pa.DictionaryArray]:
        """The tag and tag_webid columns of rows with these ids (int32, of described tags): the ids over
        the index's paths and webids, no text copied."""
        paths = self._path_array()
        if self._webid_array is None:
            self._webid_array = pa.array(self.webids[:len(paths)], pa.string())
        id_array = pa.array(ids, pa.int32())
        return (pa.DictionaryArray.from_arrays(id_array, paths, safe=False),
                pa.DictionaryArray.from_arrays(id_array, self._webid_array, safe=False))


MAX_LOGGED_WEBIDS = 1000  # unsubscribed WebIds remembered (each logged once); past it, counted only
LOGGED_WEBID_CHARS = 200  # a hostile server's WebId may be megabytes: logged and remembered cut to this


class Unsubscribed:
    """Values under WebIds no channel of this process subscribed to: dropped, counted, and each WebId
    logged once (``values_unsubscribed``) — up to MAX_LOGGED_WEBIDS of them, so a server sending ever new
    WebIds cannot grow memory; past that one line says further ones are counted only."""

    def __init__(self) -> None:
        self.values = 0
        self._logged: set[str] = set()  # WebIds (cut to LOGGED_WEBID_CHARS) logged so far
        self._full = False

    def drop(self, webid: str | None, values: int) -> None:
        self.values += values
        shown = (webid or "")[:LOGGED_WEBID_CHARS]
        if self._full or shown in self._logged:
            return
        if len(self._logged) >= MAX_LOGGED_WEBIDS:
            self._full = True
            log.warning("values_unsubscribed_many", webids=MAX_LOGGED_WEBIDS,
                        note="further unsubscribed WebIds are counted (values_unsubscribed), not logged")
            return
        self._logged.add(shown)
        log.warning("values_unsubscribed", webid=shown, cut=len(webid or "") > LOGGED_WEBID_CHARS, values=values,
                    note="no channel of this process subscribed to this WebId: its values are dropped, "
                         "counted, and this WebId is not logged again (a misbehaving server or proxy?)")


@dataclass
class LiveColumns:
    """A batch of live values as table columns, plus what the exactly-once filter checks in bulk."""

    ids: np.ndarray  # int32 tag id per value
    ts: np.ndarray  # int64 microseconds per value
    batch: pa.RecordBatch  # in BUFFER_SCHEMA
    # (webid, values) of streams left out: no channel of this process subscribed to them
    unsubscribed: list[tuple[str, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ts)


def buffered_bytes(batch: pa.RecordBatch) -> int:
    """A batch's own Arrow bytes: its dictionary columns' ids, not the resolved tags they point into."""
    return sum(
        column.indices.nbytes if isinstance(column, pa.DictionaryArray) else column.nbytes
        for column in batch.columns
    )


def _table_batch(index: TagIndex, ids: np.ndarray, ts: np.ndarray, middle: list[pa.Array],
                 received: np.ndarray) -> pa.RecordBatch:
    """The table's columns: tag and webid by id, the timestamp, ``middle`` (value .. annotated), the
    receive time and the partition date."""
    tags, webids = index.tag_columns(ids)
    timestamps = pa.array(ts, pa.int64()).cast(TIMESTAMP_US)
    return pa.RecordBatch.from_arrays([
        tags,
        webids,
        timestamps,
        *middle,
        pa.array(received, pa.int64()).cast(TIMESTAMP_US),
        pc.cast(timestamps, _DATE),  # UTC date; floors correctly before 1970
    ], schema=BUFFER_SCHEMA)


def parse_timestamps(texts: list[str]) -> np.ndarray | None:
    """ISO timestamps to int64 microseconds, vectorised; 7 fractional digits (PI's 100 ns ticks) are
    truncated as ``to_us`` does. None if any is not a timestamp."""
    arr = pa.array(texts, pa.string())
    parsed = _cast_us(arr)
    if parsed is None:  # 7 digits, or forms Arrow does not read: trimmed, then one by one
        parsed = _cast_us(pc.replace_substring_regex(arr, _SEVEN_DIGITS.pattern, r"\1"))
    if parsed is not None:
        return parsed
    try:
        return np.fromiter(map(to_us, texts), np.int64, len(texts))
    except (ValueError, OverflowError, TypeError):
        return None


def _cast_us(arr: pa.Array) -> np.ndarray | None:
    """Arrow's ISO 8601 cast to microseconds, or None where it cannot read one of them."""
    try:
        return pc.cast(arr, TIMESTAMP_US).cast(pa.int64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def _flags(raw: list[Any], defaults: list[bool] | bool) -> pa.Array:
    """A quality flag column: JSON bools as they are, null (absent) takes the default; anything else (text,
    numbers) is read value by value with ``flag``. Arrow's type inference is exact here: only bools and
    nulls make a bool (or null) column, ``1`` or ``"true"`` make it fail or take another type."""
    try:
        column = pa.array(raw)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):  # then not all bools: value by value
        column = None
    if column is not None and (column.type == _BOOL or column.type == pa.null()):
        if not column.null_count:
            return column
        fill = pa.array(defaults, _BOOL) if isinstance(defaults, list) else pa.array(np.full(len(raw), defaults))
        return pc.if_else(column.is_null(), fill, column.cast(_BOOL))
    if isinstance(defaults, bool):
        return pa.array([flag(r, defaults) for r in raw], _BOOL)
    return pa.array([flag(r, d) for r, d in zip(raw, defaults, strict=True)], _BOOL)


def extract(streams: list[StreamValues], received_us: list[int], index: TagIndex,
            stream_ids: np.ndarray | None = None) -> LiveColumns | None:
    """The values of ``streams`` (``received_us`` per stream) as columns, or None if the value-by-value
    path must take them. ``stream_ids``: the streams' ids, when the caller has them (all subscribed)."""
    if stream_ids is None:
        stream_ids = index.stream_ids(list(map(_web_id, streams)))
        if not index.subscribed(stream_ids).all():  # not this process's streams: the caller drops them
            return None
    lists = list(map(_items, streams))
    if None in lists:
        return None
    counts = list(map(len, lists))
    if counts.count(1) == len(counts):
        flat = list(map(_first, lists))
        ids = stream_ids.astype(np.int32)
        received = np.array(received_us, np.int64)
        stream_units = list(map(_units, streams))
    else:
        flat = list(chain.from_iterable(lists))
        ids = np.repeat(stream_ids.astype(np.int32), counts)
        received = np.repeat(np.array(received_us, np.int64), counts)
        stream_units = list(chain.from_iterable(map(repeat, map(_units, streams), counts)))
    n = len(flat)
    if n == 0:
        return None
    if list(map(_errors, flat)).count(None) != n:
        return None
    texts = list(map(_timestamp, flat))
    if None in texts:
        return None
    ts = parse_timestamps(texts)
    if ts is None:
        return None

    values = list(map(_value, flat))
    kinds = list(map(type, values))
    good_default: list[bool] | bool = True
    if kinds.count(float) == n:
        value_col = pa.array(values, pa.float64())
        text_col = pa.nulls(n, pa.string())
        code_col = pa.nulls(n, pa.int32())
        system_col = pa.array(np.zeros(n, np.bool_))
    else:
        text: list[str | None] = [None] * n
        code: list[int | None] = [None] * n
        system = [False] * n
        goods = [True] * n
        numbers = values.copy()
        for i in np.flatnonzero(np.fromiter(map(is_not, kinds, repeat(float)), np.bool_, n)).tolist():
            numbers[i], text[i], code[i], system[i], is_error = classify_value(values[i])
            goods[i] = not (system[i] or is_error)
        good_default = goods
        value_col = pa.array(numbers, pa.float64())
        text_col = pa.array(text, pa.string())
        code_col = pa.array(code, pa.int32())
        system_col = pa.array(system, pa.bool_())

    flags = [_flags(list(map(_good, flat)), good_default)]
    for getter in (_questionable, _substituted, _annotated):
        flags.append(_flags(list(map(getter, flat)), False))

    units = list(map(_units, flat))
    if None in units or "" in units:
        fallback = [s or index.uoms[i] for s, i in zip(stream_units, ids.tolist(), strict=True)]
        units = [u or f for u, f in zip(units, fallback, strict=True)]

    batch = _table_batch(index, ids, ts, [value_col, text_col, code_col, system_col, pa.array(units, pa.string()),
                                          *flags], received)
    return LiveColumns(ids, ts, batch)


def extract_frames(frames: list[str | bytes], received_us: list[int], index: TagIndex) -> LiveColumns | None:
    """Channel frames (JSON text) straight into columns with the C codec; None if it is not built or the
    frames need the decoding path (it accepts only what it fully understands)."""
    if _framecodec is None:
        return None
    parsed = _framecodec.parse(frames, received_us, index.ids)
    if parsed is None or parsed[0] == 0:
        return None
    return _parsed_columns(parsed, index)


def extract_page(body: bytes, received_us: int, index: TagIndex) -> tuple[LiveColumns, np.ndarray] | None:
    """A ``streamsets/recorded`` answer (the channel message's shape) straight into columns with the C codec,
    and its streams in order as rows of (tag id, values), empty ones too. None if the codec is not built,
    does not take it, it has no stream, or a stream is not one of the index's described tags: the decoding
    path then reads it (and reports what is wrong)."""
    if _framecodec is None:
        return None
    parsed = _framecodec.parse([body], [received_us], index.ids)
    if parsed is None or len(parsed) < 21 or parsed[19]:  # 20 items: a codec built before it listed streams
        return None
    streams = np.frombuffer(parsed[20], np.int32).reshape(-1, 2)
    if not len(streams) or not index.subscribed(streams[:, 0].astype(np.int64)).all():
        return None
    if parsed[0] == 0:
        return LiveColumns(np.zeros(0, np.int32), np.zeros(0, np.int64),
                           pa.RecordBatch.from_pylist([], schema=BUFFER_SCHEMA)), streams
    columns = _parsed_columns(parsed, index)
    return None if columns is None else (columns, streams)


@dataclass(slots=True)
class PageRows:
    """A recorded-values page read by the C codec (``pi.pages.PageColumns``): its rows in the table's
    columns, and per stream its webid and number of rows, for the reader's cursors."""

    webids: list[str]
    counts: np.ndarray
    ts: np.ndarray
    body: bytes
    columns: LiveColumns

    def take(self, keep: np.ndarray) -> LiveColumns:
        if keep.all():
            return self.columns
        c = self.columns
        return LiveColumns(c.ids[keep], c.ts[keep], c.batch.filter(pa.array(keep)))


def page_decoder(index: TagIndex) -> PageDecoder:
    """The recorded-values readers' ``decode`` (history, gap fills): pages straight into columns over the
    buffer's tag ids (the tags must be described in it before their pages come); None where the codec
    leaves a page to msgspec."""
    def decode(body: bytes) -> PageRows | None:
        page = extract_page(body, time.time_ns() // 1000, index)
        if page is None:
            return None
        columns, streams = page
        return PageRows([index.webids[i] for i in streams[:, 0].tolist()], streams[:, 1], columns.ts, body, columns)

    return decode


def _parsed_columns(parsed: tuple[Any, ...], index: TagIndex) -> LiveColumns | None:
    """The codec's packed buffers as table columns (unsubscribed streams' rows left out and listed)."""
    (n, ids_b, ts_b, received_b, value_b, value_null_b, text_b, code_b, code_null_b, system_b, good_b, quest_b,
     subst_b, annot_b, uom_b, stream_uom_b, units, texts, raw, unknown) = parsed[:20]
    ids = np.frombuffer(ids_b, np.int32)
    ts = np.frombuffer(ts_b, np.int64)
    keep = index.subscribed(ids)  # unknown webids are -1; floors of tags no longer listed have no path
    dropped = not keep.all()
    if dropped:
        floors_only, counts = np.unique(ids[(ids >= 0) & ~keep], return_counts=True)
        unknown = unknown + [(index.webids[i], c) for i, c in zip(floors_only.tolist(), counts.tolist(),
                                                                   strict=True)]
        if not keep.any():  # no rows, but the frames must still be ones msgspec reads, as below
            for _, chunk in raw:
                try:
                    msgspec.json.decode(chunk)
                except (msgspec.DecodeError, RecursionError):
                    return None
            return LiveColumns(ids[keep], ts[keep], pa.RecordBatch.from_pylist([], schema=BUFFER_SCHEMA), unknown)
        ids = np.where(keep, ids, ids[keep][0])  # valid ids for building the columns; those rows go below
    value = pa.array(np.frombuffer(value_b, np.float64), mask=np.frombuffer(value_null_b, np.bool_))
    text_index = np.frombuffer(text_b, np.int32)
    text_col = pa.array(texts, pa.string()).take(pa.array(text_index, mask=text_index < 0))
    code_col = pa.array(np.frombuffer(code_b, np.int32), mask=np.frombuffer(code_null_b, np.bool_))
    system = np.frombuffer(system_b, np.bool_)
    good_default = ~system
    if raw:  # errors, arrays, big integers, odd states: classified as the decoding path does
        numbers, text, code = value.to_pylist(), text_col.to_pylist(), code_col.to_pylist()
        system = system.copy()
        for row, chunk in raw:
            try:
                decoded = msgspec.json.decode(chunk)
            except (msgspec.DecodeError, RecursionError):
                return None  # the decoding path reports the frame
            numbers[row], text[row], code[row], system[row], is_error = classify_value(decoded)
            good_default[row] = not (system[row] or is_error)
        value = pa.array(numbers, pa.float64())
        text_col = pa.array(text, pa.string())
        code_col = pa.array(code, pa.int32())
    value_col, system_col = value, pa.array(system)

    flags = []
    for raw_flags, default in ((good_b, good_default), (quest_b, False), (subst_b, False), (annot_b, False)):
        column = np.frombuffer(raw_flags, np.int8)
        flags.append(pa.array(np.where(column < 0, default, column > 0)))

    # Units: the value's own, else the stream's, else the tag's from resolution.
    uom = np.frombuffer(uom_b, np.int32)
    uom = np.where(uom >= 0, uom, np.frombuffer(stream_uom_b, np.int32))
    uom = np.where(uom >= 0, uom, len(units) + ids)
    uom_col = pa.concat_arrays([pa.array(units, pa.string()), index.uom_array()]).take(pa.array(uom))

    batch = _table_batch(index, ids, ts, [value_col, text_col, code_col, system_col, uom_col, *flags],
                         np.frombuffer(received_b, np.int64))
    if dropped:
        return LiveColumns(ids[keep], ts[keep], batch.filter(pa.array(keep)), unknown)
    return LiveColumns(ids, ts, batch)
