"""Committed floors on local disk, so a restart knows where each tag stopped without scanning the table.

The file is rewritten atomically after every commit and names the Delta transaction version it matches.
On start, a file that matches the table is used as it is; otherwise (lost, stale after a crash between
commit and save, or from another table) the floors are rebuilt from the table itself.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import msgspec
import structlog

from .dedup import EventFilter, event_key

log = structlog.get_logger(__name__)

FORMAT = 2


class _StateFile(msgspec.Struct, forbid_unknown_fields=True):
    format: int
    table: str
    app_id: str
    txn_version: int
    lookback_us: int
    # webid -> [floor_us, recent events: [[timestamp_us, value, value_text, state_code, good, questionable,
    # substituted, annotated], ...]]
    floors: dict[str, tuple[int, Any]]  # recent events: lists of key tuples


# The lists of key tuples go to msgspec as they are: no per-key Python work on every save.
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_StateFile)


def state_path(state_dir: str | Path, table_uri: str, app_id: str) -> Path:
    """One file per (table, writer); the name is readable and unique."""
    digest = hashlib.sha256(f"{table_uri}\n{app_id}".encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", app_id)[:60]
    return Path(state_dir) / f"{safe}-{digest}.json"


class StateStore:
    def __init__(self, path: Path, table_uri: str, app_id: str):
        self.path = path
        self.table_uri = table_uri
        self.app_id = app_id

    def save(self, committed: EventFilter, txn_version: int) -> None:
        committed.sync_recent()
        recent = committed.recent
        floors = {webid: (ts, recent.get(webid, ())) for webid, ts in committed.floors.items()}
        data = _encoder.encode(_StateFile(FORMAT, self.table_uri, self.app_id, txn_version,
                                          committed.lookback_us, floors))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def load(self, lookback_us: int) -> tuple[EventFilter, int] | None:
        """The saved floors and the transaction version they match, or None if there is no usable file."""
        try:
            state = _decoder.decode(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("state_unreadable", path=str(self.path), error=str(exc))
            return None
        if state.format != FORMAT or state.table != self.table_uri or state.app_id != self.app_id:
            log.warning("state_ignored", path=str(self.path), reason="written for another table or writer")
            return None
        if state.lookback_us < lookback_us:
            log.info("state_ignored", path=str(self.path), reason="written with a shorter look-back")
            return None
        result = EventFilter(lookback_us)
        for webid, (ts, keys) in state.floors.items():
            result.floors[webid] = ts
            result.recent[webid] = list(event_key(*k) for k in sorted(keys, key=lambda k: k[0])
                                         if k[0] >= ts - lookback_us)
        return result, state.txn_version
