"""A backfill's plan and per-tag progress on local disk, so that a re-run resumes where the table stands.

The plan (the range as given and as resolved at the first start, each tag's own end) is fixed when the
backfill starts for the first time. Progress is kept per Delta transaction version of the backfill's app id,
and written *before* each commit: the file holds the progress at the last commit and at the one about to
land, so whichever version the table ends up at after a crash (``kill -9`` in the middle of a commit), the
file has the progress that matches it. A re-run reads the table's version for the app id and resumes each
tag from the progress recorded for that version: values committed are not read again, values read but not
committed are.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields
from pathlib import Path

import pyarrow as pa
import structlog

from ..errors import ConfigError
from ..pi.history import TagProgress
from .buffer import Flush
from .state import _write_atomically, state_path

log = structlog.get_logger(__name__)

FORMAT = 1
UNPLANNED = -(1 << 62)  # a live backfill's tag whose range end is not known yet (no live value committed)
SCHEMA = pa.schema([
    pa.field("tag_webid", pa.string(), nullable=False),
    pa.field("tag", pa.string(), nullable=False),
    pa.field("end_us", pa.int64(), nullable=False),  # the tag's own range end (included)
    pa.field("txn_version", pa.int64(), nullable=False),
    pa.field("cursor_us", pa.int64(), nullable=False),
    pa.field("seen", pa.int64(), nullable=False),
    pa.field("done", pa.bool_(), nullable=False),
    pa.field("values", pa.int64(), nullable=False),
    pa.field("first_us", pa.int64()),
    pa.field("last_us", pa.int64()),
])


@dataclass
class HistoryFlush(Flush):
    """A batch of history, with where each tag it touched stands once it is committed."""

    progress: dict[str, TagProgress] | None = None

    @classmethod
    def of(cls, flush: Flush, progress: dict[str, TagProgress]) -> HistoryFlush:
        return cls(**{f.name: getattr(flush, f.name) for f in fields(Flush)}, progress=progress)


@dataclass
class Plan:
    """What a backfill reads: the range (as given and resolved) and each tag's path and own end."""

    start: str
    end: str
    start_us: int
    end_us: int
    paths: dict[str, str]  # webid -> tag path
    ends: dict[str, int]  # webid -> the tag's range end (included)


def progress_path(state_dir: str | Path, table_uri: str, app_id: str) -> Path:
    """Beside the state files, named as they are (``state.state_path``)."""
    return state_path(state_dir, table_uri, app_id, ".backfill.arrow")


class ProgressStore:
    """The plan and the progress at the last one or two transaction versions of one backfill."""

    def __init__(self, path: Path, table_uri: str, app_id: str):
        self.path = path
        self.table_uri = table_uri
        self.app_id = app_id
        self.plan: Plan | None = None
        self.versions: dict[int, dict[str, TagProgress]] = {}
        # The commit writer's thread (``before_commit``) and a live backfill adding tags (``add_tags``,
        # ``set_ends``, in another thread) change the plan and the progress: one at a time.
        self._lock = threading.Lock()

    def load(self) -> bool:
        """Read the file; False if there is none. A file that is unreadable or for another table or app
        id is an error: resuming from it could write values twice."""
        try:
            with pa.ipc.open_file(pa.BufferReader(self.path.read_bytes())) as reader:
                data = reader.read_all()
        except FileNotFoundError:
            return False
        except (OSError, pa.ArrowInvalid) as exc:
            raise ConfigError(f"cannot read the backfill progress file {self.path}: {exc}; restore it from a "
                              "backup, or remove it to start the backfill afresh") from None
        meta = {k.decode(): v.decode() for k, v in (data.schema.metadata or {}).items()}
        if meta.get("format") != str(FORMAT) or not data.schema.remove_metadata().equals(SCHEMA):
            raise ConfigError(f"{self.path} is not a backfill progress file of this pistream version")
        if (meta.get("table"), meta.get("app_id")) != (self.table_uri, self.app_id):
            raise ConfigError(f"{self.path} is the progress of another backfill ({meta.get('app_id')} on "
                              f"{meta.get('table')}): give this backfill a --state-dir of its own")
        rows = data.to_pylist()
        self.plan = Plan(meta["start"], meta["end"], int(meta["start_us"]), int(meta["end_us"]),
                         {r["tag_webid"]: r["tag"] for r in rows}, {r["tag_webid"]: r["end_us"] for r in rows})
        # No rows: a live backfill (``--backfill``) stopped before any tag joined its plan: no commit either.
        self.versions = {} if rows else {0: {}}
        for r in rows:
            self.versions.setdefault(r["txn_version"], {})[r["tag_webid"]] = TagProgress(
                r["cursor_us"], r["seen"], r["done"], r["values"], r["first_us"], r["last_us"])
        return True

    def start(self, plan: Plan) -> None:
        """A new backfill: its plan, every tag at the start of its range, as of no commit (version 0)."""
        self.plan = plan
        self.versions = {0: {webid: TagProgress(plan.start_us) for webid in plan.ends}}
        self._save()

    def at(self, txn_version: int) -> dict[str, TagProgress] | None:
        """The progress that matches the table at ``txn_version`` of this app id, if the file has it."""
        return self.versions.get(txn_version)

    def before_commit(self, flush: Flush, txn_version: int) -> None:
        """Called by the commit writer, in its thread, before it commits ``flush`` as ``txn_version``: the
        commit before it has landed, so keep that one's progress and this one's (see the module docstring)."""
        with self._lock:
            committed = self.versions.get(txn_version - 1) or self.versions[max(self.versions)]
            progress = flush.progress if isinstance(flush, HistoryFlush) and flush.progress else {}
            self.versions = {txn_version - 1: committed, txn_version: {**committed, **progress}}
            self._save()

    def add_tags(self, paths: dict[str, str], start_us: int, end_us: int) -> None:
        """Tags joining the plan (a live backfill's, ``--backfill``): each at ``start_us`` with ``end_us``
        as its end (``UNPLANNED`` until known), in every version kept: none of their values is committed."""
        with self._lock:
            assert self.plan is not None
            self.plan.paths.update(paths)
            self.plan.ends.update(dict.fromkeys(paths, end_us))
            new = {webid: TagProgress(start_us) for webid in paths}
            # New dicts, not changed in place: the trio thread reads ``latest()`` for the stats.
            self.versions = {version: {**progress, **new} for version, progress in self.versions.items()}
            self._save()

    def set_ends(self, ends: dict[str, int]) -> None:
        """The ends of tags added with ``UNPLANNED`` (before any of their values was read); a tag whose end
        is before its start has nothing to read: done."""
        with self._lock:
            assert self.plan is not None
            self.plan.ends.update(ends)
            versions = {}
            for version, progress in self.versions.items():
                progress = dict(progress)
                for webid, end_us in ends.items():
                    p = progress[webid]
                    if end_us < p.cursor_us and not p.done:
                        progress[webid] = TagProgress(p.cursor_us, p.seen, True, p.values, p.first_us, p.last_us)
                versions[version] = progress
            self.versions = versions
            self._save()

    def latest(self) -> dict[str, TagProgress]:
        return self.versions[max(self.versions)]

    def _save(self) -> None:
        assert self.plan is not None
        plan = self.plan
        columns: dict[str, list] = {f.name: [] for f in SCHEMA}
        for version, progress in sorted(self.versions.items()):
            for webid, p in progress.items():
                for name, value in (("tag_webid", webid), ("tag", plan.paths[webid]), ("end_us", plan.ends[webid]),
                                    ("txn_version", version), ("cursor_us", p.cursor_us), ("seen", p.seen),
                                    ("done", p.done), ("values", p.values), ("first_us", p.first_us),
                                    ("last_us", p.last_us)):
                    columns[name].append(value)
        metadata = {"format": str(FORMAT), "table": self.table_uri, "app_id": self.app_id, "start": plan.start,
                    "end": plan.end, "start_us": str(plan.start_us), "end_us": str(plan.end_us)}
        schema = SCHEMA.with_metadata(metadata)
        _write_atomically(self.path, schema, [pa.table(columns, schema=schema)])
