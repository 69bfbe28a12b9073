"""The table side of ``pistream check``: can pistream reach and write the table ``--table`` names, without
committing anything? Each function returns what it found as one line of text, or raises the PistreamError a
run would meet (its message names the fix).

- A local folder: it (or the folder it will be created in) takes a file, which is deleted again.
- An object-store URI, or a Unity Catalog table's location with the credentials UC vends for it: a one-row
  Parquet file is written in the table's folder the way data files are, and deleted (an object, not a commit:
  the table does not change).
- A Unity Catalog name: the workspace accepts the credentials; the table is found (EXTERNAL, DELTA), or its
  schema exists for it to be created at ``--location``; UC vends READ_WRITE credentials.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError, SinkError
from .databricks import WorkspaceError
from .storage import local_folder, redact_text, redact_uri, secret_values, table_files
from .target import CatalogTarget
from .unitycatalog import CatalogTable, UnityCatalog, VendedCredentials, check_writable, split_name

PROBE_PREFIX = "_pistream_check_"


def probe_folder(uri: str, storage_options: Mapping[str, str] | None = None) -> str:
    """Write a test file or object in the table's folder and delete it again."""
    folder = local_folder(uri)
    if folder is not None:
        return _probe_local(Path(folder))
    name = f"{PROBE_PREFIX}{uuid.uuid4().hex}.parquet"
    options = dict(storage_options or {})
    written = False
    try:
        files = table_files(uri, options)
        with files.open_output_stream(name) as out:  # the way data files are written (see datafiles)
            pq.write_table(pa.table({"note": ["written by pistream check; safe to delete"]}), out)
        written = True
        files.delete_file(name)
    except Exception as exc:  # noqa: BLE001 - delta-rs raises OSError or its own errors: one message either way
        text = redact_text(str(exc) or type(exc).__name__, secret_values(options))
        what = (f"wrote a test object in {redact_uri(uri)} but could not delete it ({name})" if written
                else f"cannot write a test object in {redact_uri(uri)}")
        raise SinkError(f"{what}: {text}; check the storage credentials and that they may write and delete "
                        "objects under this prefix") from None
    return f"a test object was written and deleted in {redact_uri(uri)}"


def _probe_local(folder: Path) -> str:
    """The folder, or the nearest folder above it that exists (pistream creates the rest), takes a file."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{existing} is a file, not a folder: --table {folder} cannot be created there; "
                          "choose another path")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=PROBE_PREFIX):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write in {existing} ({exc.strerror or exc}): give this account write access "
                          f"to it, or choose another folder") from None
    if existing == folder:
        return f"folder {folder} is writable"
    return f"{folder} does not exist yet; {existing}, where it will be created, is writable"


def check_workspace(target: CatalogTarget) -> tuple[UnityCatalog, CatalogTable | None, str]:
    """The workspace accepts the credentials: the table's lookup answers (found or not)."""
    catalog = UnityCatalog(target.workspace)
    assert target.catalog_name is not None
    table = catalog.get_table(target.catalog_name)
    config = target.workspace.config
    return catalog, table, f"{config.host} accepted the {config.auth_kind} credentials of {config.source}"


def check_catalog_table(catalog: UnityCatalog, target: CatalogTarget, table: CatalogTable | None) -> str:
    """Found and writable from outside (EXTERNAL, DELTA), or to be created at ``--location`` in a schema that
    exists (creating it is left to the first start: the CREATE privileges show only then)."""
    assert target.catalog_name is not None
    if table is not None:
        check_writable(table)
        return f"{table.full_name}: {table.table_type} {table.data_source_format} at {redact_uri(table.storage_location)}"
    if not target.location:
        raise ConfigError(f"Unity Catalog table {target.catalog_name} does not exist: pass --location "
                          "s3://BUCKET/PATH (or abfss://...) to create it as an external table there "
                          "(with --warehouse-id to create it through a SQL warehouse)")
    catalog_name, schema, _ = split_name(target.catalog_name)
    try:  # listing the schema's tables needs it to exist, and USE CATALOG and USE SCHEMA on it
        catalog.workspace.call("GET", "/api/2.1/unity-catalog/tables",
                               params={"catalog_name": catalog_name, "schema_name": schema, "max_results": "1"})
    except WorkspaceError as exc:
        raise catalog._translate(exc, target.catalog_name) from None  # the lake folder's one translation
    how = f"through SQL warehouse {target.warehouse_id}" if target.warehouse_id else "through the Unity Catalog API"
    return (f"{target.catalog_name} does not exist yet: the first start creates it at {redact_uri(target.location)} "
            f"{how} (schema {catalog_name}.{schema} found; CREATE TABLE and the external location's CREATE "
            "EXTERNAL TABLE are checked only then)")


def check_credentials(catalog: UnityCatalog, target: CatalogTarget, table: CatalogTable) -> float:
    """UC vends READ_WRITE credentials for the table; ``target`` then reaches it with them. Seconds until
    they expire."""
    credentials = VendedCredentials(catalog, table, target.base_options)
    credentials.storage_options()
    target.uri = table.storage_location
    target.credentials = credentials
    return credentials.expires_at - credentials.clock()


def nearest_writable(folder: str) -> str:
    """A folder pistream will write (the state folder): it, or where it will be created, takes a file."""
    return _probe_local(Path(os.path.abspath(folder)))
