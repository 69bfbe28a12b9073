"""Committed floors on local disk, so a restart knows where each tag stopped without scanning the table;
and the gaps still being read back, so a restart reads them again.

The floors file is rewritten atomically after commits and names the Delta transaction version it matches.
On start, a file that matches the table is used as it is; otherwise (lost, stale after a crash between
commit and save, or from another table) the floors are rebuilt from the table itself.

The open-gaps file cannot be rebuilt from the table: a tag's floor moves past a gap as soon as the live
values after its reconnect are committed, while the gap is still being read. So it is written *before* each
commit that changes it, and holds the gaps open at the last commit and at the one about to land: whichever
of the two the table ends up at, a crash leaves every gap it needs in the file (a gap read twice is
harmless, the table's own events are known to the second read).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import structlog

from ..pi.flow import GapRequest
from .dedup import RECENT_SCHEMA, EventFilter, RecentRows, event_key
from .floors import NO_FLOOR
from .opengaps import OpenGaps
from .schema import EVENT_KEY

log = structlog.get_logger(__name__)

FORMAT = 4  # an Arrow IPC file; formats 3 (text tags) and 2 (JSON, ``.json``) are still read after an upgrade
PLAIN_TAGS_FORMAT = 3
LEGACY_FORMAT = 2

# One file, two kinds of rows: a tag's floor (``floor`` set, the event columns null) and a recent event
# (``floor`` null). Columns write without a Python object per event, which at 100,000 tags was ~250,000
# key tuples and a 20 MB JSON text every save. The tags are a dictionary over the floors' tags, in their
# order (the floors come first): each webId's text is in the file once, not once a row (format 3's 40 MB at
# 100,000 tags with 250,000 events, rewritten after every commit, became ~15 MB).
TAG_DICTIONARY = pa.dictionary(pa.int32(), pa.string())
FILE_SCHEMA = pa.schema([pa.field("floor", pa.int64()), pa.field("tag_webid", TAG_DICTIONARY),
                         *list(RECENT_SCHEMA)[1:]])
PLAIN_TAGS_SCHEMA = pa.schema([pa.field("floor", pa.int64()), *RECENT_SCHEMA])

GAPS_FORMAT = 1
GAPS_SCHEMA = pa.schema([pa.field("tag_webid", pa.string()), pa.field("start_us", pa.int64()),
                         pa.field("end_us", pa.int64())])


class _LegacyStateFile(msgspec.Struct):
    format: int
    table: str
    app_id: str
    txn_version: int
    lookback_us: int
    # webid -> [floor_us, [[timestamp_us, value, value_text, state_code, good, questionable, substituted,
    # annotated], ...]]
    floors: dict[str, tuple[int, Any]]


_legacy_decoder = msgspec.json.Decoder(_LegacyStateFile)


def state_path(state_dir: str | Path, table_uri: str, app_id: str, suffix: str = ".state.arrow") -> Path:
    """One file per (table, writer) and kind (``suffix``); the name is readable and unique."""
    digest = hashlib.sha256(f"{table_uri}\n{app_id}".encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", app_id)[:60]
    return Path(state_dir) / f"{safe}-{digest}{suffix}"


class StateStore:
    def __init__(self, path: Path, table_uri: str, app_id: str):
        self.path = path
        self.table_uri = table_uri
        self.app_id = app_id

    @property
    def legacy_path(self) -> Path:
        """Where format 2 kept the same floors (read if there is no file of the current format)."""
        return self.path.with_name(self.path.name.removesuffix(".state.arrow") + ".json")

    @property
    def gaps_path(self) -> Path:
        return self.path.with_name(self.path.name.removesuffix(".state.arrow") + ".gaps.arrow")

    def save(self, committed: EventFilter, txn_version: int) -> None:
        webids, values = committed.floors.columns()
        dictionary = pa.array(webids, pa.string())
        metadata = {"format": str(FORMAT), "table": self.table_uri, "app_id": self.app_id,
                    "txn_version": str(txn_version), "lookback_us": str(committed.lookback_us)}
        schema = FILE_SCHEMA.with_metadata(metadata)
        event_fields = list(RECENT_SCHEMA)[1:]
        floors = pa.RecordBatch.from_arrays(
            [pa.array(values, pa.int64()),
             pa.DictionaryArray.from_arrays(pa.array(np.arange(len(webids), dtype=np.int32)), dictionary),
             *(pa.nulls(len(webids), f.type) for f in event_fields)], schema=schema)
        parts = [floors]
        # Each event's tag as its floor's position (the dictionary's order): by tag id, no text per event
        position = np.full(len(committed.floors.tags), -1, np.int32)
        position[committed.floors.present()] = np.arange(len(webids), dtype=np.int32)
        for ids, table in committed.recent_parts():
            tags = np.full(len(ids), -1, np.int32)
            inside = (ids >= 0) & (ids < len(position))
            tags[inside] = position[ids[inside]]
            known = tags >= 0  # events of a tag without a floor: a load would leave them out
            if not known.all():
                table, tags = table.filter(pa.array(known)), tags[known]
            offset = 0
            for events in table.to_batches():  # one batch per part, the same dictionary: no copy
                part_tags = pa.array(tags[offset:offset + len(events)])
                offset += len(events)
                parts.append(pa.RecordBatch.from_arrays(
                    [pa.nulls(len(events), pa.int64()), pa.DictionaryArray.from_arrays(part_tags, dictionary),
                     *(events.column(f.name) for f in event_fields)], schema=schema))
        _write_atomically(self.path, schema, parts)

    def save_gaps(self, gaps: OpenGaps | Collection[GapRequest]) -> None:
        """Replace the open-gaps file (see the module docstring for when)."""
        if not isinstance(gaps, OpenGaps):
            gaps = OpenGaps.of(gaps)
        data = pa.table([pa.array(gaps.webids(), pa.string()), pa.array(gaps.start_us, pa.int64()),
                         pa.array(gaps.end_us, pa.int64())], schema=GAPS_SCHEMA)
        metadata = {"format": str(GAPS_FORMAT), "table": self.table_uri, "app_id": self.app_id}
        _write_atomically(self.gaps_path, GAPS_SCHEMA.with_metadata(metadata), [data])

    def load_gaps(self) -> list[GapRequest]:
        """The gaps an earlier run left open, to read again; none if there is no usable file."""
        try:
            with pa.OSFile(str(self.gaps_path)) as file, pa.ipc.open_file(file) as reader:
                data = reader.read_all()
        except FileNotFoundError:
            return []
        except (OSError, pa.ArrowInvalid) as exc:
            log.error("gaps_unreadable", path=str(self.gaps_path), error=str(exc),
                      note="gaps open at the last stop are not read back")
            return []
        meta = {k.decode(): v.decode() for k, v in (data.schema.metadata or {}).items()}
        if meta.get("format") != str(GAPS_FORMAT) or not data.schema.remove_metadata().equals(GAPS_SCHEMA):
            log.error("gaps_unreadable", path=str(self.gaps_path), error="not a pistream open-gaps file of this "
                      "version", note="gaps open at the last stop are not read back")
            return []
        if (meta.get("table"), meta.get("app_id")) != (self.table_uri, self.app_id):
            log.warning("gaps_ignored", path=str(self.gaps_path), reason="written for another table or writer")
            return []
        return [GapRequest(*row) for row in zip(*(data.column(n).to_pylist() for n in GAPS_SCHEMA.names),
                                                strict=True)]

    def saved_version(self) -> int:
        """The transaction version the state file holds (its metadata only), 0 without a usable file."""
        try:
            with pa.OSFile(str(self.path)) as file, pa.ipc.open_file(file) as reader:
                meta = {k.decode(): v.decode() for k, v in (reader.schema.metadata or {}).items()}
        except (OSError, pa.ArrowInvalid):
            return 0
        if (meta.get("table"), meta.get("app_id")) != (self.table_uri, self.app_id):
            return 0
        return int(meta.get("txn_version") or 0)

    def load(self, lookback_us: int) -> tuple[EventFilter, int] | None:
        """The saved floors and the transaction version they match, or None if there is no usable file."""
        if not self.path.exists() and self.legacy_path.exists():
            return self._load_legacy(lookback_us)
        try:
            with pa.OSFile(str(self.path)) as file, pa.ipc.open_file(file) as reader:
                data = reader.read_all()
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowInvalid) as exc:
            log.warning("state_unreadable", path=str(self.path), error=str(exc))
            return None
        meta = {k.decode(): v.decode() for k, v in (data.schema.metadata or {}).items()}
        schema = {str(FORMAT): FILE_SCHEMA, str(PLAIN_TAGS_FORMAT): PLAIN_TAGS_SCHEMA}.get(meta.get("format", ""))
        if schema is None or not data.schema.remove_metadata().equals(schema) or "txn_version" not in meta:
            log.warning("state_unreadable", path=str(self.path), error="not a pistream state file of this version")
            return None
        if not self._usable(meta.get("table"), meta.get("app_id"), meta.get("lookback_us"), lookback_us):
            return None
        result = EventFilter(lookback_us)
        is_floor = pc.is_valid(data.column("floor")).to_numpy(zero_copy_only=False)
        floor_rows = np.flatnonzero(is_floor)
        events = np.flatnonzero(~is_floor)
        tags = data.column("tag_webid")
        if schema is FILE_SCHEMA:  # tag ids: the dictionary's entries, by the floors' rows that name them
            if not data.num_rows:
                return result, int(meta["txn_version"])
            dictionary = tags.chunk(0).dictionary
            indices = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in tags.chunks])
            webids = dictionary.take(pa.array(indices[floor_rows]))
            result.floors.set_many(webids.to_pylist(), data.column("floor").take(pa.array(floor_rows)).to_numpy())
            tag_of = np.full(len(dictionary), -1, np.int64)
            tag_of[indices[floor_rows]] = np.arange(len(floor_rows))  # a fresh registry: ids in the floors' order
            ids = tag_of[indices[events]]
        else:  # format 3: text tags, found among the floors' tags
            webids = tags.take(pa.array(floor_rows)).combine_chunks()
            result.floors.set_many(webids.to_pylist(), data.column("floor").take(pa.array(floor_rows)).to_numpy())
            found = pc.index_in(tags.take(pa.array(events)), value_set=webids)
            ids = pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        if len(events) and len(result.floors.tags) == len(floor_rows):
            _load_events(result, data, events, ids, webids)
        return result, int(meta["txn_version"])

    def _usable(self, table: object, app_id: object, saved_lookback: object, lookback_us: int) -> bool:
        if table != self.table_uri or app_id != self.app_id:
            log.warning("state_ignored", path=str(self.path), reason="written for another table or writer")
            return False
        if int(str(saved_lookback)) < lookback_us:
            log.info("state_ignored", path=str(self.path), reason="written with a shorter look-back")
            return False
        return True

    def _load_legacy(self, lookback_us: int) -> tuple[EventFilter, int] | None:
        """A format 2 (JSON) file from an earlier version: its floors spare a rebuild from the table."""
        try:
            state = _legacy_decoder.decode(self.legacy_path.read_bytes())
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("state_unreadable", path=str(self.legacy_path), error=str(exc))
            return None
        if state.format != LEGACY_FORMAT:
            log.warning("state_unreadable", path=str(self.legacy_path), error=f"format {state.format}")
            return None
        if not self._usable(state.table, state.app_id, state.lookback_us, lookback_us):
            return None
        result = EventFilter(lookback_us)
        for webid, (ts, keys) in state.floors.items():
            result.floors[webid] = ts
            result.recent[webid] = [event_key(*k) for k in sorted(keys, key=lambda k: k[0])
                                    if k[0] >= ts - lookback_us]
        return result, state.txn_version


def _load_events(result: EventFilter, data: pa.Table, events: np.ndarray, ids: np.ndarray, webids: pa.Array) -> None:
    """The saved recent events (rows ``events`` of ``data``, of tag ids ``ids``, -1 for a tag without a
    floor) as rows accepted in bulk: columns, not a key tuple each (after a restart at 100,000 tags, ~250,000
    tuples, ~45 MB, held by each tag's gap window until its gap was read), sorted by tag and time, their tags
    a dictionary over ``webids`` (the tags with a floor, in the order of their ids). Those out of their tag's
    look-back (or without a floor) are left out. One copy of the rows kept: filtering and sorting the whole
    file's rows took ~130 MB for a moment at 100,000 tags."""
    ts = pc.cast(data.column("timestamp").take(pa.array(events)), pa.int64()).to_numpy(zero_copy_only=False)
    known = ids >= 0
    floors = np.full(len(ids), NO_FLOOR, np.int64)
    floors[known] = result.floors.array()[ids[known]]
    keep = np.flatnonzero(known & (floors != NO_FLOOR))
    keep = keep[ts[keep] >= floors[keep] - result.lookback_us]
    keep = keep[np.lexsort((ts[keep], ids[keep]))]
    kept = data.select(list(EVENT_KEY)[1:]).take(pa.array(events[keep]))
    tags = pa.DictionaryArray.from_arrays(pa.array(ids[keep], pa.int32()), webids)
    result.add_recent(RecentRows(ids[keep].astype(np.int32), ts[keep], kept.add_column(0, "tag_webid", tags)))


def _write_atomically(path: Path, schema: pa.Schema, parts: list[pa.Table] | list[pa.RecordBatch]) -> None:
    """An Arrow IPC file that is either the old one or the whole new one, also after a power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        with pa.ipc.new_file(f, schema) as writer:
            for part in parts:
                writer.write(part)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
