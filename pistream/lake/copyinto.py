"""Unity Catalog MANAGED tables, exactly once, through a SQL warehouse (``--managed-write copy-into``).

deltalake 1.6 cannot commit to a catalog-managed table (it cannot even open one: "Max catalog version is
required when loading a catalog-managed table"), and Unity Catalog vends no write credentials for managed
tables. So the commit step goes through the warehouse instead; the buffer, flush policy, commit writer,
state dir, metrics and graceful stop are the Delta path's.

One batch, transaction version N of writer ``app_id``:

1. its rows are written as Parquet files with ``datafiles.write_partitions`` (the Delta path's files, with the
   partition column kept as a column: COPY INTO reads columns, not paths), each uploaded with the Files API to
   ``/Volumes/<staging volume>/pistream/<app_id>/<N:012d>/part-<seq>-<date>.parquet`` (a spilled part of a
   large batch as soon as it is spilled); the names follow from app id, N and the order of the parts alone;
2. ``_batch.json`` is put last beside them: the batch is complete (listing its files and rows);
3. one ``COPY INTO <table> FROM '<batch folder>' FILEFORMAT = PARQUET FILES = (...)`` through the Statement
   Execution API (submitted once, polled while the warehouse starts: ``UnityCatalog.run_statement``);
4. the writer saves the state dir (floors, version N), then ``state_saved`` deletes the batch folder.

Why that is exactly once: COPY INTO skips files it already loaded into the table, by path, even if they
changed since; a COPY INTO that is sent again (its answer lost, or the process killed after it) loads
nothing twice. On a start, ``open`` reads the staging folder: a batch folder without ``_batch.json`` was never
loaded (nothing is loaded before it is complete) and is deleted, its rows read back from PI as usual; a
complete batch at or below the state file's version was loaded and saved, and is deleted; a complete batch
above it may or may not have been loaded: it is loaded again (idempotent) before the next batch, and its rows
raise the floors the state file lacks (``read_event_keys``). A fresh batch whose COPY INTO inserts nothing
although it has rows means the table loaded files of these names before: a state dir that was lost or
belongs elsewhere; that stops the stream (exit 2) rather than drop the batch without a word.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import date
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import structlog
import trio

from ..errors import AuthError, ConfigError, PistreamError, SinkError, TableConflictError
from ..stream.schema import EVENT_KEY, PARTITION_COLUMN, TABLE_SCHEMA
from ..stream.state import StateStore
from .databricks import WorkspaceError
from .datafiles import write_partitions
from .sink import CommitResult
from .unitycatalog import CatalogTable, UnityCatalog, _quote_name, _sql_string
from .volumes import Volume

log = structlog.get_logger(__name__)

STAGING_FOLDER = "pistream"
MANIFEST = "_batch.json"
DEFAULT_VOLUME = "pistream_staging"  # --staging-volume: in the table's schema unless named
MAX_FILES = 1000  # COPY INTO takes at most this many names in FILES = (...)
EVENT_KEY_SCHEMA = pa.schema([TABLE_SCHEMA.field(name) for name in EVENT_KEY])


@dataclass(frozen=True)
class StagedFile:
    """One Parquet file staged for a batch: its name in the batch folder and its rows."""

    name: str
    rows: int


class CopyIntoSink:
    """The sink of a MANAGED table: stages each batch in a volume, loads it with COPY INTO. Blocking, run in
    the commit writer's worker thread (a trio worker thread: the statement is awaited in the trio loop)."""

    credentials = None  # no vended credentials: the metrics show none

    def __init__(self, catalog: UnityCatalog, table: CatalogTable, volume: Volume, app_id: str, state: StateStore,
                 *, warehouse_id: str, warehouse_wait: float, local_dir: Path):
        self.catalog = catalog
        self.table = table
        self.volume = volume
        self.app_id = app_id
        self.state = state
        self.warehouse_id = warehouse_id
        self.warehouse_wait = warehouse_wait
        self.uri = table.storage_location
        self.display_uri = f"{table.full_name} (MANAGED, via COPY INTO)"
        self.local_dir = local_dir
        self.folder = f"{STAGING_FOLDER}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', app_id)}"
        self._version = 0  # the newest version loaded (or, at start, maybe loaded)
        self._pending: dict[int, list[str]] = {}  # complete batches of an earlier run that may not be loaded
        self._loaded: set[int] = set()  # loaded, their folders kept until the state file holds them
        self._submitted: set[int] = set()  # versions whose COPY INTO was sent by this process
        self._ahead = (0, 0)  # (version, files) staged ahead for the batch being gathered
        self.copy_statements = 0  # COPY INTO statements sent (the metrics and the tests count them)

    # -- start -----------------------------------------------------------------------------------------

    def open(self) -> None:
        """The staging volume (created if missing), and what an earlier run left in it (module docstring)."""
        self.volume.ensure()
        self.local_dir.mkdir(parents=True, exist_ok=True)
        saved = self.state.saved_version()
        removed = 0
        for entry in self.volume.list(self.folder):
            if not (entry.is_directory and entry.name.isdigit()):
                continue
            version = int(entry.name)
            manifest = self._manifest(version)
            if manifest is None or version <= saved:
                removed += self.volume.remove_tree(self._batch_folder(version))
                self._record(version).unlink(missing_ok=True)
                log.info("staged_batch_removed", txn_version=version,
                         reason="incomplete: never loaded" if manifest is None else "loaded and saved")
            else:
                self._pending[version] = list(manifest["files"])
        self._version = max([saved, *self._pending])
        log.info("staging_volume_ready", volume=self.volume.full_name, folder=f"{self.volume.root}/{self.folder}",
                 saved_version=saved, pending_batches=sorted(self._pending), files_removed=removed)

    def _manifest(self, version: int) -> dict[str, Any] | None:
        names = {entry.name for entry in self.volume.list(self._batch_folder(version))}
        if MANIFEST not in names:
            return None
        manifest = json.loads(self.volume.get(f"{self._batch_folder(version)}/{MANIFEST}"))
        return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), list) else None

    def last_txn_version(self) -> int:
        return self._version

    def read_event_keys(self, since: date | None = None, until: date | None = None,
                        webids: Collection[str] | None = None) -> pa.Table:
        """The event keys of the batches an earlier run staged that may not be in the state file (the only
        rows the floors may lack: everything older is in it)."""
        parts = []
        for version, names in sorted(self._pending.items()):
            for name in names:
                data = pq.read_table(pa.BufferReader(self.volume.get(f"{self._batch_folder(version)}/{name}")),
                                     columns=[*EVENT_KEY, PARTITION_COLUMN])
                parts.append(_select(data, since, until, webids))
        if not parts:
            return EVENT_KEY_SCHEMA.empty_table()
        return pa.concat_tables(parts, promote_options="permissive").cast(EVENT_KEY_SCHEMA)

    # -- writing ---------------------------------------------------------------------------------------

    def write_ahead(self, rows: pa.Table) -> list[StagedFile]:
        """Stage a spilled part of the next batch now (its rows stay out of the table until its COPY INTO)."""
        version = self._version + 1
        first = self._ahead[1] if self._ahead[0] == version else 0
        staged = self._stage(rows, version, first)
        self._ahead = (version, first + len(staged))
        return staged

    def commit(self, batch: pa.RecordBatch | pa.Table, txn_version: int,
               written_ahead: Sequence[StagedFile] = ()) -> CommitResult:
        """Load batch ``txn_version`` (and its parts staged ahead) with one COPY INTO; first, the batches an
        earlier run may not have loaded."""
        if txn_version <= self._version:
            log.warning("commit_skipped", txn_version=txn_version, committed=self._version, app_id=self.app_id)
            return CommitResult(-1, txn_version, 0, skipped=True)
        for version in sorted(self._pending):
            self._copy_into(version, self._pending[version], None)
            del self._pending[version]
        files = list(written_ahead)
        if batch.num_rows:  # named after the parts staged ahead: the same names when the commit is tried again
            files += self._stage(batch, txn_version, first=len(written_ahead))
        rows = sum(f.rows for f in files)
        if files:
            manifest = {"app_id": self.app_id, "txn_version": txn_version, "rows": rows,
                        "files": [f.name for f in files]}
            self.volume.put(f"{self._batch_folder(txn_version)}/{MANIFEST}", json.dumps(manifest).encode())
            self._copy_into(txn_version, [f.name for f in files], rows)
        self._version = txn_version
        return CommitResult(-1, txn_version, batch.num_rows, skipped=False)

    def state_saved(self, txn_version: int) -> None:
        """The state file holds ``txn_version``: the staged folders of the batches up to it go (a failure
        to delete them is logged; they go at the next save, or at the next start)."""
        for version in sorted(v for v in self._loaded if v <= txn_version):
            try:
                files = self.volume.remove_tree(self._batch_folder(version))
            except PistreamError as exc:
                log.warning("staged_files_not_deleted", txn_version=version, error=str(exc),
                            note="deleted after the next save or start")
                return
            self._loaded.discard(version)
            self._record(version).unlink(missing_ok=True)
            log.debug("staged_files_deleted", txn_version=version, files=files)

    def _record(self, version: int) -> Path:
        """Where the id of a batch's COPY INTO is kept until the state file holds the batch: a restart then
        waits for that statement (or reads its result) instead of sending another."""
        return self.local_dir / f"{version:012d}.statement"

    def _batch_folder(self, version: int) -> str:
        return f"{self.folder}/{version:012d}"

    def _stage(self, rows: pa.Table | pa.RecordBatch, version: int, first: int) -> list[StagedFile]:
        """Write ``rows`` as Parquet files (one per date) in the local folder, upload each to the batch folder
        and delete it here. Files are numbered from ``first``: the parts staged ahead in the order they came,
        then the batch's own, so that names do not depend on the attempt."""
        counter = [first]
        names: list[str] = []

        def name(day: str) -> str:
            names.append(f"part-{counter[0]:05d}-{day}.parquet")
            counter[0] += 1
            return names[-1]

        local = pafs.SubTreeFileSystem(str(self.local_dir), pafs.LocalFileSystem())
        try:
            write_partitions(local, rows, name=name, with_partition_column=True)
            staged = []
            for file_name in names:
                path = self.local_dir / file_name
                data = path.read_bytes()
                count = pq.read_metadata(pa.BufferReader(data)).num_rows
                self.volume.put(f"{self._batch_folder(version)}/{file_name}", data)
                staged.append(StagedFile(file_name, count))
        except OSError as exc:
            raise SinkError(f"cannot write the staged Parquet files in {self.local_dir}: {exc}") from exc
        finally:
            for file_name in names:
                (self.local_dir / file_name).unlink(missing_ok=True)
        return staged

    def _copy_into(self, version: int, names: list[str], rows: int | None) -> None:
        """One COPY INTO of a batch's files; ``rows`` None for a batch an earlier run may have loaded."""
        if len(names) > MAX_FILES:
            raise SinkError(f"batch {version} has {len(names)} files, more than COPY INTO takes ({MAX_FILES}): "
                            "lower --flush-rows")
        source = f"{self.volume.root}/{self._batch_folder(version)}"
        sql = (f"COPY INTO {_quote_name(self.table.full_name)} FROM {_sql_string(source)} FILEFORMAT = PARQUET "
               f"FILES = ({', '.join(_sql_string(n) for n in names)})")
        what = f"COPY INTO {self.table.full_name}"
        again = rows is None or version in self._submitted
        record = self._record(version)
        answer = self._earlier_statement(record, what) if again else None
        if answer is None:
            self._submitted.add(version)
            self.copy_statements += 1
            try:
                answer = trio.from_thread.run(partial(
                    self.catalog.run_statement, sql, self.warehouse_id, wait=self.warehouse_wait, what=what,
                    submitted=partial(_write_atomically, record)))
            except WorkspaceError as exc:
                raise self._translate(exc) from None
        inserted = _inserted_rows(answer)
        self._loaded.add(version)
        log.info("copy_into_done", txn_version=version, files=len(names), inserted=inserted,
                 expected=rows if rows is not None else "unknown (staged by an earlier run)")
        if inserted == 0 and rows and not again:
            raise TableConflictError(
                f"COPY INTO {self.table.full_name} skipped the {len(names)} files of batch {version} as loaded "
                f"before: the table already took files named {source}/..., so the state dir "
                f"({self.state.path.parent}) is not the one this writer (--app-id {self.app_id}) used; restore "
                "it, or start with a new --app-id")

    def _earlier_statement(self, record: Path, what: str) -> dict[str, Any] | None:
        """The answer of the COPY INTO an earlier attempt (or run) sent for this batch, awaited to its end if it
        still runs (two loads of the same files at once could both commit); None if there is none, or it did
        not succeed: then the batch is loaded (again)."""
        try:
            statement_id = record.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if not statement_id:
            return None
        try:
            answer = trio.from_thread.run(partial(self.catalog.await_statement, statement_id, self.warehouse_id,
                                                  wait=self.warehouse_wait, what=what))
        except WorkspaceError as exc:
            if exc.code == "CLOSED":  # it succeeded; its result is gone
                return {}
            log.info("copy_into_earlier_failed", statement_id=statement_id, error=str(exc), note="sent again")
            return None
        if answer is not None:
            log.info("copy_into_earlier_found", statement_id=statement_id, note="not sent again")
        return answer

    def _translate(self, exc: WorkspaceError) -> PistreamError:
        text = str(exc)
        lowered = text.lower()
        name = self.table.full_name
        if "permission" in lowered or "privilege" in lowered or exc.status == 403:
            return AuthError(f"{text}; GRANT MODIFY, SELECT ON TABLE {name} and READ VOLUME ON VOLUME "
                             f"{self.volume.full_name} TO `<principal>` (COPY INTO reads the staged files)")
        if "schema" in lowered or "column" in lowered or "cast" in lowered:
            return TableConflictError(f"{text}; the table {name} does not have the pistream bronze columns: "
                                      "point --table at a new name (pistream creates it) or at a pistream table")
        return SinkError(text)


def copy_into_sink(target: Any, app_id: str, state: StateStore, staging_volume: str | None) -> CopyIntoSink:
    """The sink of a resolved MANAGED ``target.CatalogTarget``; what is missing to load it, as a ConfigError."""
    from .unitycatalog import split_name

    name = target.catalog_name
    if not target.warehouse_id:
        raise ConfigError(f"--table {name} is a MANAGED table, which pistream loads with COPY INTO through a SQL "
                          "warehouse: pass --warehouse-id (in the warehouse's connection details), or "
                          "--managed-write zerobus (at-least-once)")
    catalog, schema, _ = split_name(name)
    volume = Volume(target.workspace, staging_volume or f"{catalog}.{schema}.{DEFAULT_VOLUME}")
    return CopyIntoSink(UnityCatalog(target.workspace), target.table, volume, app_id, state,
                        warehouse_id=target.warehouse_id, warehouse_wait=target.warehouse_wait,
                        local_dir=state.path.with_name(state.path.name.removesuffix(".state.arrow") + ".staging"))


def _write_atomically(path: Path, text: str) -> None:
    """The statement id of a COPY INTO, kept until it ended (written before the first poll)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _select(data: pa.Table, since: date | None, until: date | None, webids: Collection[str] | None) -> pa.Table:
    keep = pa.array([True] * data.num_rows)
    if since is not None:
        keep = pc.and_(keep, pc.greater_equal(data[PARTITION_COLUMN], pa.scalar(since, pa.date32())))
    if until is not None:
        keep = pc.and_(keep, pc.less_equal(data[PARTITION_COLUMN], pa.scalar(until, pa.date32())))
    if webids is not None:
        keep = pc.and_(keep, pc.is_in(data["tag_webid"], pa.array(sorted(webids), pa.string())))
    return data.filter(keep).select(list(EVENT_KEY))


def _inserted_rows(answer: dict[str, Any]) -> int | None:
    """``num_inserted_rows`` of a COPY INTO's answer (its one result row), None if the answer has none."""
    columns = [c.get("name") for c in ((answer.get("manifest") or {}).get("schema") or {}).get("columns") or []]
    rows = (answer.get("result") or {}).get("data_array") or []
    for wanted in ("num_inserted_rows", "num_affected_rows"):
        if wanted in columns and rows:
            value = rows[0][columns.index(wanted)]
            return int(value) if value is not None else None
    return None
