"""The fake workspace's Unity Catalog volumes, Files API, MANAGED tables and ``COPY INTO`` (a mixin of
``databricks_fake.FakeWorkspace``; see its docstring for the rest).

- ``POST /api/2.1/unity-catalog/volumes`` (catalog_name, schema_name, name, volume_type MANAGED) and
  ``GET /api/2.1/unity-catalog/volumes/{full_name}``: 403 PERMISSION_DENIED "CREATE VOLUME" while
  ``create_volume_allowed`` is False.
- Files API on ``/Volumes/<catalog>/<schema>/<volume>/...``: ``PUT|GET|DELETE|HEAD /api/2.0/fs/files/...``
  (PUT with ``overwrite=true`` replaces; without it an existing file is 409 ALREADY_EXISTS; PUT makes the parent
  folders), ``GET|PUT|DELETE /api/2.0/fs/directories/...`` (list: ``contents`` of path, is_directory,
  file_size, last_modified, name; DELETE only of an empty folder, else 409 DIRECTORY_NOT_EMPTY). A path in a
  volume that does not exist: 404 NOT_FOUND. Files live in a local folder of the fake's.
- A MANAGED table (``CREATE TABLE`` without ``LOCATION``, or ``register_table(table_type="MANAGED",
  columns=...)``) is a real local Delta table the fake owns (``managed_table_path``), created with the
  table's columns and partition columns; ``storage_location`` says ``s3://.../__unitystorage/...`` as
  Databricks does, which nobody may write (no READ_WRITE vend for a managed table).
- ``COPY INTO <table> FROM '/Volumes/...' FILEFORMAT = PARQUET [FILES = ('a', ...) | PATTERN = '...']``, run by
  the statement API: reads the named Parquet files (all ``*.parquet`` of the folder without FILES), skips
  those already loaded into that table (by full path, as Databricks does, even if the file changed), checks
  their columns against the table's and appends the rest in ONE Delta commit with deltalake. Its result row:
  ``num_affected_rows``, ``num_inserted_rows`` (strings, JSON_ARRAY). ``copy_log`` has one entry per COPY INTO
  run: table, source, files named, loaded, skipped, inserted.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

FILES = "/api/2.0/fs/files"
DIRECTORIES = "/api/2.0/fs/directories"
VOLUMES = "/api/2.1/unity-catalog/volumes"
_ARROW_TYPES = {"string": "string", "timestamp": "timestamp", "double": "float64", "int": "int32",
                "integer": "int32", "boolean": "bool_", "date": "date32", "bigint": "int64", "long": "int64"}
_COPY = re.compile(r"(?is)^\s*COPY\s+INTO\s+(?P<table>\S+)\s+FROM\s+'(?P<source>[^']+)'\s+FILEFORMAT\s*=\s*"
                   r"(?P<format>\w+)(?:\s+FILES\s*=\s*\((?P<files>[^)]*)\)|\s+PATTERN\s*=\s*'(?P<pattern>[^']*)')?"
                   r"\s*;?\s*$")


def volume_endpoint(method: str, path: str) -> str | None:
    """The endpoint name of a volumes / Files API call (None: not one)."""
    if path == VOLUMES:
        return {"POST": "create_volume", "GET": "list_volumes"}.get(method, "unknown")
    if path.startswith(VOLUMES + "/"):
        return {"GET": "get_volume", "DELETE": "delete_volume"}.get(method, "unknown")
    if path.startswith(FILES + "/"):
        return {"PUT": "put_file", "GET": "get_file", "DELETE": "delete_file", "HEAD": "head_file"}.get(
            method, "unknown")
    if path.startswith(DIRECTORIES + "/"):
        return {"GET": "list_directory", "PUT": "create_directory", "DELETE": "delete_directory"}.get(
            method, "unknown")
    return None


class VolumesMixin:
    """State: volumes, their files (a local folder), managed tables' local Delta tables, loaded files."""

    _lock: threading.RLock
    _tables: dict[str, dict[str, Any]]

    def _reset_volumes(self) -> None:
        root = getattr(self, "_volumes_root", None)
        if root is None:
            self._volumes_root = Path(tempfile.mkdtemp(prefix="databricks-fake-"))
        else:
            for child in root.iterdir():
                shutil.rmtree(child, ignore_errors=True)
        self.create_volume_allowed = True
        self._volumes: dict[str, dict[str, Any]] = {}
        self._managed: dict[str, Path] = {}
        self._loaded_files: dict[str, set[str]] = {}
        self._copy_log: list[dict[str, Any]] = []

    def cleanup_volumes(self) -> None:
        root = getattr(self, "_volumes_root", None)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    # -- what tests use ---------------------------------------------------------------------------------

    def add_volume(self, full_name: str) -> None:
        catalog, schema, name = full_name.lower().split(".")
        with self._lock:
            self._need_schema(catalog, schema)  # type: ignore[attr-defined]
            self._volumes[f"{catalog}.{schema}.{name}"] = {"catalog_name": catalog, "schema_name": schema,
                                                           "name": name, "full_name": f"{catalog}.{schema}.{name}",
                                                           "volume_type": "MANAGED"}
            self._volume_dir(catalog, schema, name).mkdir(parents=True, exist_ok=True)

    def volume(self, full_name: str) -> dict[str, Any] | None:
        with self._lock:
            info = self._volumes.get(full_name.lower())
            return dict(info) if info else None

    def volume_files(self, full_name: str) -> list[str]:
        """Every file in the volume, as ``/Volumes/...`` paths, sorted."""
        catalog, schema, name = full_name.lower().split(".")
        base = self._volume_dir(catalog, schema, name)
        if not base.exists():
            return []
        return sorted(f"/Volumes/{catalog}/{schema}/{name}/{p.relative_to(base).as_posix()}"
                      for p in base.rglob("*") if p.is_file())

    def managed_table_path(self, full_name: str) -> Path:
        with self._lock:
            return self._managed[full_name.lower()]

    @property
    def copy_log(self) -> list[dict[str, Any]]:
        with self._lock:
            return json.loads(json.dumps(self._copy_log))

    # -- storage of managed tables ----------------------------------------------------------------------

    def _create_managed_storage(self, full_name: str, columns: list[dict[str, Any]]) -> None:
        """The local Delta table of a MANAGED table, with its columns (none given: made at the first load)."""
        path = self._volumes_root / "__managed" / full_name
        self._managed[full_name] = path
        if not columns:
            return
        import pyarrow as pa
        from deltalake import DeltaTable

        fields = [pa.field(c["name"], _arrow_type(c["type_text"]), c.get("nullable", True)) for c in columns]
        partitions = [c["name"] for c in sorted((c for c in columns if "partition_index" in c),
                                                key=lambda c: c["partition_index"])]
        DeltaTable.create(str(path), pa.schema(fields), partition_by=partitions or None, mode="ignore")

    # -- request handling -------------------------------------------------------------------------------

    def _volume_dir(self, catalog: str, schema: str, name: str) -> Path:
        return self._volumes_root / "volumes" / catalog / schema / name

    def _local(self, volume_path: str) -> Path:
        """``/Volumes/c/s/v/rest`` -> the local file; 404 if the volume does not exist."""
        from databricks_fake import _api_error

        parts = volume_path.strip("/").split("/")
        if len(parts) < 4 or parts[0] != "Volumes":
            raise _api_error(400, "INVALID_PARAMETER_VALUE", f"Path {volume_path!r} is not in a volume: "
                             "/Volumes/<catalog>/<schema>/<volume>/...")
        catalog, schema, name = (p.lower() for p in parts[1:4])
        with self._lock:
            if f"{catalog}.{schema}.{name}" not in self._volumes:
                raise _api_error(404, "NOT_FOUND", f"The volume /Volumes/{catalog}/{schema}/{name} does not exist.")
        rest = [p for p in parts[4:] if p not in ("", ".", "..")]
        return self._volume_dir(catalog, schema, name).joinpath(*rest)

    def _volumes_api(self, endpoint: str, method: str, path: str, query: dict[str, list[str]], body: bytes,
                     principal: str) -> tuple[int, Any]:
        from databricks_fake import _api_error, _uc_error

        if endpoint == "create_volume":
            request = json.loads(body or b"{}")
            catalog, schema, name = (str(request.get(k) or "").lower() for k in ("catalog_name", "schema_name", "name"))
            with self._lock:
                self._need_schema(catalog, schema)  # type: ignore[attr-defined]
                if not self.create_volume_allowed:
                    raise _uc_error(403, "PERMISSION_DENIED", f"User does not have CREATE VOLUME on Schema "
                                    f"'{catalog}.{schema}'.")
                if f"{catalog}.{schema}.{name}" in self._volumes:
                    raise _uc_error(409, "VOLUME_ALREADY_EXISTS", f"Volume '{catalog}.{schema}.{name}' already exists")
            self.add_volume(f"{catalog}.{schema}.{name}")
            return 200, self.volume(f"{catalog}.{schema}.{name}")
        if endpoint == "get_volume":
            full_name = unquote(path.rsplit("/", 1)[1]).lower()
            info = self.volume(full_name)
            if info is None:
                catalog, schema, _ = (full_name.split(".") + ["", "", ""])[:3]
                with self._lock:
                    self._need_schema(catalog, schema)  # type: ignore[attr-defined]
                raise _uc_error(404, "VOLUME_DOES_NOT_EXIST", f"Volume '{full_name}' does not exist.")
            return 200, info
        base = FILES if endpoint.endswith("_file") else DIRECTORIES
        local = self._local(unquote(path[len(base):]))
        if endpoint == "put_file":
            if local.exists() and (query.get("overwrite") or ["false"])[0].lower() != "true":
                raise _api_error(409, "ALREADY_EXISTS", "The file being created already exists.")
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.{threading.get_ident()}.tmp")
            tmp.write_bytes(body)
            tmp.replace(local)
            return 204, b""
        if endpoint in ("get_file", "head_file"):
            if not local.is_file():
                raise _api_error(404, "NOT_FOUND", "The file does not exist.")
            return 200, (local.read_bytes() if endpoint == "get_file" else b"")
        if endpoint == "delete_file":
            if not local.is_file():
                raise _api_error(404, "NOT_FOUND", "The file does not exist.")
            local.unlink()
            return 204, b""
        if endpoint == "create_directory":
            local.mkdir(parents=True, exist_ok=True)
            return 204, b""
        if endpoint == "delete_directory":
            if not local.is_dir():
                raise _api_error(404, "NOT_FOUND", "The directory does not exist.")
            if any(local.iterdir()):
                raise _api_error(409, "DIRECTORY_NOT_EMPTY", "The directory is not empty.")
            local.rmdir()
            return 204, b""
        if endpoint == "list_directory":
            if not local.is_dir():
                raise _api_error(404, "NOT_FOUND", "The directory does not exist.")
            prefix = unquote(path[len(base):]).rstrip("/")
            contents = []
            for child in sorted(local.iterdir()):
                if child.name.startswith(".") and child.name.endswith(".tmp"):
                    continue
                stat = child.stat()
                entry: dict[str, Any] = {"path": f"{prefix}/{child.name}", "name": child.name,
                                         "is_directory": child.is_dir()}
                if child.is_file():
                    entry.update(file_size=stat.st_size, last_modified=int(stat.st_mtime * 1000))
                contents.append(entry)
            return 200, {"contents": contents}
        raise _api_error(404, "ENDPOINT_NOT_FOUND", f"No API found for '{method} {path}'")

    # -- COPY INTO --------------------------------------------------------------------------------------

    def _copy_into(self, text: str) -> tuple[list[str], list[str]] | None:
        """Run ``text`` if it is a COPY INTO (None otherwise): the result's columns and its one row."""
        from databricks_fake import _SqlError

        match = _COPY.match(text)
        if not match:
            if re.match(r"(?is)^\s*COPY\s+INTO\b", text):
                raise _SqlError("[PARSE_SYNTAX_ERROR] Syntax error in COPY INTO (the fake runs COPY INTO t FROM "
                                "'/Volumes/...' FILEFORMAT = PARQUET [FILES = (...) | PATTERN = '...']). SQLSTATE: 42601")
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq
        from deltalake import DeltaTable, write_deltalake

        full_name = ".".join(part.strip("`").lower() for part in match["table"].split("."))
        if match["format"].upper() != "PARQUET":
            raise _SqlError(f"[COPY_INTO_FILE_FORMAT] the fake loads PARQUET only, not {match['format']}")
        info = self._tables.get(full_name)
        if info is None:
            raise _SqlError(f"[TABLE_OR_VIEW_NOT_FOUND] The table or view `{full_name}` cannot be found. "
                            "SQLSTATE: 42P01")
        if full_name not in self._managed:
            raise _SqlError(f"[COPY_INTO_TARGET] the fake loads MANAGED tables only, not {full_name}")
        source = match["source"].rstrip("/")
        try:
            folder = self._local(source)
        except Exception as exc:  # noqa: BLE001 - an API error of the path check, as a statement error
            raise _SqlError(f"[PATH_NOT_FOUND] Path does not exist: {source}. {exc}") from None
        if match["files"] is not None:
            names = [n.strip().strip("'") for n in match["files"].split(",") if n.strip()]
        else:
            pattern = match["pattern"] or "*.parquet"
            names = sorted(p.name for p in folder.iterdir() if fnmatch.fnmatch(p.name, pattern)
                           and not p.name.startswith(("_", "."))) if folder.is_dir() else []
        loaded = self._loaded_files.setdefault(full_name, set())
        new = [n for n in names if f"{source}/{n}" not in loaded]
        parts = []
        for name in new:
            path = folder / name
            if not path.is_file():
                raise _SqlError(f"[PATH_NOT_FOUND] Path does not exist: {source}/{name}. SQLSTATE: 42K03")
            parts.append(pq.read_table(path))
        table_path = self._managed[full_name]
        inserted = 0
        if parts:
            data = pa.concat_tables(parts, promote_options="permissive")
            if not (table_path / "_delta_log").exists():
                DeltaTable.create(str(table_path), data.schema, mode="ignore")
            target = DeltaTable(str(table_path))
            schema = pa.schema(target.schema().to_arrow())
            extra = [n for n in data.column_names if n not in schema.names]
            if extra:
                raise _SqlError(f"[COPY_INTO_SCHEMA_MISMATCH] A schema mismatch detected: column(s) {extra} are not "
                                f"in the table {full_name}. SQLSTATE: 42KD9")
            try:
                data = data.select([n for n in schema.names if n in data.column_names])
                data = data.cast(pa.schema([schema.field(n) for n in data.column_names]))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise _SqlError(f"[COPY_INTO_SCHEMA_MISMATCH] cannot cast column types: {exc}") from None
            write_deltalake(target, data, mode="append",
                            partition_by=target.metadata().partition_columns or None)
            inserted = data.num_rows
        loaded.update(f"{source}/{n}" for n in new)
        self._copy_log.append({"table": full_name, "source": source, "files": names, "loaded": new,
                               "skipped": [n for n in names if n not in new], "inserted": inserted,
                               "time": time.time()})
        return ["num_affected_rows", "num_inserted_rows"], [str(inserted), str(inserted)]


def _arrow_type(type_text: str):
    import pyarrow as pa

    name = _ARROW_TYPES.get(type_text.lower())
    if name is None:
        raise ValueError(f"the fake makes no local table column of type {type_text}")
    if name == "timestamp":
        return pa.timestamp("us", tz="UTC")
    return getattr(pa, name)()
