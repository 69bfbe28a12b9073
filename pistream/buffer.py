"""The columnar buffer: decoded channel values appended to plain column lists, turned into one Arrow
RecordBatch per flush (timestamps parsed and dates derived vectorised, exact repeats dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import structlog

from .messages import StreamValues, classify_value, flag
from .schema import TABLE_SCHEMA
from .timeutil import TIMESTAMP_US, parse_iso_array

log = structlog.get_logger(__name__)

# Built nullable so that rows with an unparseable timestamp can be filtered out before the final cast.
_BUILD_SCHEMA = pa.schema([f.with_nullable(True) for f in TABLE_SCHEMA])


@dataclass(frozen=True)
class StreamInfo:
    """What pistream knows of a subscribed stream before any value arrives (from tag resolution)."""

    path: str
    webid: str
    uom: str | None = None


@dataclass
class Flush:
    """One batch ready to commit, with the counts the summary line reports."""

    batch: pa.RecordBatch
    repeats_dropped: int
    rejected: int


class ColumnBuffer:
    """Accumulates rows column by column; ``take()`` hands them over as a RecordBatch and starts afresh."""

    def __init__(self, streams: dict[str, StreamInfo]):
        self.streams = streams
        self._reset()

    def _reset(self) -> None:
        self.tag: list[str] = []
        self.tag_webid: list[str] = []
        self.timestamp: list[str] = []
        self.value: list[float | None] = []
        self.value_text: list[str | None] = []
        self.state_code: list[int | None] = []
        self.system_state: list[bool] = []
        self.uom: list[str | None] = []
        self.good: list[bool] = []
        self.questionable: list[bool] = []
        self.substituted: list[bool] = []
        self.annotated: list[bool] = []
        self.received_us: list[int] = []
        self._keys: set[tuple] = set()
        self._repeats = 0
        self._rejected = 0

    def __len__(self) -> int:
        return len(self.tag)

    def add_stream(self, stream: StreamValues, received_us: int) -> int:
        """Append one stream's values from a channel message or REST answer; returns rows added."""
        webid = stream.web_id or ""
        info = self.streams.get(webid)
        path = info.path if info else (stream.path or webid)
        stream_uom = stream.units_abbreviation or (info.uom if info else None)
        added = 0
        for tv in stream.timed_values():
            if not tv.timestamp:
                self._rejected += 1
                log.error("value_rejected", tag=path, reason="no timestamp")
                continue
            value, text, code, system, is_error = classify_value(tv.value)
            if tv.errors:
                text = "; ".join(str(e) for e in tv.errors) if text is None else text
                is_error = True
            good = flag(tv.good, default=not (system or is_error))
            questionable = flag(tv.questionable, False)
            substituted = flag(tv.substituted, False)
            annotated = flag(tv.annotated, False)
            key = (webid, tv.timestamp, value, text, code, good, questionable, substituted, annotated)
            if key in self._keys:
                self._repeats += 1
                continue
            self._keys.add(key)
            self.tag.append(path)
            self.tag_webid.append(webid)
            self.timestamp.append(tv.timestamp)
            self.value.append(value)
            self.value_text.append(text)
            self.state_code.append(code)
            self.system_state.append(system)
            self.uom.append(tv.units_abbreviation or stream_uom)
            self.good.append(good)
            self.questionable.append(questionable)
            self.substituted.append(substituted)
            self.annotated.append(annotated)
            self.received_us.append(received_us)
            added += 1
        return added

    def take(self) -> Flush | None:
        """The buffered rows as a RecordBatch in the table schema, or None when empty."""
        if not self.tag:
            return None
        timestamps, bad = parse_iso_array(self.timestamp)
        columns = {
            "tag": pa.array(self.tag, pa.string()),
            "tag_webid": pa.array(self.tag_webid, pa.string()),
            "timestamp": timestamps,
            "value": pa.array(self.value, pa.float64()),
            "value_text": pa.array(self.value_text, pa.string()),
            "state_code": pa.array(self.state_code, pa.int32()),
            "system_state": pa.array(self.system_state, pa.bool_()),
            "uom": pa.array(self.uom, pa.string()),
            "good": pa.array(self.good, pa.bool_()),
            "questionable": pa.array(self.questionable, pa.bool_()),
            "substituted": pa.array(self.substituted, pa.bool_()),
            "annotated": pa.array(self.annotated, pa.bool_()),
            "received_timestamp": pa.array(self.received_us, pa.int64()).cast(TIMESTAMP_US),
            "partition_date": pc.cast(timestamps, pa.date32()),
        }
        batch = pa.RecordBatch.from_pydict(columns, schema=_BUILD_SCHEMA)
        rejected = self._rejected + len(bad)
        if bad:
            for i in bad[:5]:
                log.error("value_rejected", tag=self.tag[i], value_timestamp=self.timestamp[i],
                          reason="unparseable timestamp")
            batch = batch.filter(pc.is_valid(batch.column("timestamp")))
        batch = batch.cast(TABLE_SCHEMA)
        flush = Flush(batch, self._repeats, rejected)
        self._reset()
        return flush
