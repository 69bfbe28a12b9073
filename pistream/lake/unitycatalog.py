"""Unity Catalog: find (or create) the external table behind a three-part name, and keep the short-lived
cloud credentials UC vends for it fresh.

pistream writes the table's storage location itself with delta-rs, using ``temporary-table-credentials``
mapped to delta-rs storage options here (delta-rs's own ``uc://`` handler was seen to hang against a
loopback UC in 1.6.6, ignores ``~/.databrickscfg`` and never renews its credentials). Only EXTERNAL DELTA
tables are written: UC owns the files of a MANAGED table, and writing them from outside is not allowed.

A missing table is created once: ``create_table`` never sends its POST twice (see ``databricks``); through a SQL
warehouse the statement is submitted with ``wait_timeout`` 0s (answered at once, however long the warehouse
takes to start) and polled by id with backoff for up to ``--warehouse-wait``; stopped or out of time, it is
cancelled on the warehouse.

Credentials last about an hour. ``VendedCredentials`` re-vends before they expire (margin: 20 % of their
lifetime, at least 10 minutes, at most half of it) and, should UC be down then, keeps the old ones until
they really expire; only then does a commit fail, and the commit writer retries it like a storage outage.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote

import pyarrow as pa
import structlog
import trio

from ..backoff import Backoff
from ..errors import AuthError, ConfigError, PistreamError, SinkError, TableConflictError
from ..stream.schema import PARTITION_COLUMN, TABLE_COMMENT, TABLE_PROPERTIES, TABLE_SCHEMA
from ..timeutil import TIMESTAMP_US
from .databricks import Workspace, WorkspaceError, WorkspaceUnavailable

log = structlog.get_logger(__name__)

_PART = r"(?:[A-Za-z0-9_][A-Za-z0-9_-]*|`[^`]+`)"
_NAME = re.compile(rf"^{_PART}\.{_PART}\.{_PART}$")
TABLES = "/api/2.1/unity-catalog/tables"
STATEMENTS = "/api/2.0/sql/statements"
WAREHOUSE_WAIT = 600.0  # --warehouse-wait: a classic SQL warehouse may need minutes to start
POLL_INITIAL, POLL_MAXIMUM = 0.25, 10.0  # backoff between polls of a SQL statement
CANCEL_TIMEOUT = 5.0  # a stopped statement's cancel gets this long
FINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELED", "CLOSED")
MIN_REVEND_INTERVAL = 1.0  # never ask UC more often than this, whatever the expiration says


T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A blocking workspace call in a worker thread, abandoned (it ends by its own timeout) if cancelled."""
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs), abandon_on_cancel=True)


def is_table_name(table: str) -> bool:
    """``catalog.schema.table`` (a three-part Unity Catalog name), not a path or a URI."""
    return bool(_NAME.match(table)) and "/" not in table and "\\" not in table


def split_name(full_name: str) -> tuple[str, str, str]:
    catalog, schema, table = (part.strip("`") for part in re.findall(_PART, full_name))
    return catalog, schema, table


@dataclass(frozen=True)
class CatalogTable:
    full_name: str
    table_id: str
    storage_location: str
    table_type: str
    data_source_format: str


class UnityCatalog:
    """The UC calls pistream makes, on one workspace."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace

    def get_table(self, full_name: str) -> CatalogTable | None:
        """The table, or None if it does not exist; a missing catalog or schema is a ConfigError."""
        try:
            info = self.workspace.call("GET", f"/api/2.1/unity-catalog/tables/{quote(full_name, safe='')}")
        except WorkspaceError as exc:
            if exc.code == "TABLE_DOES_NOT_EXIST" or (exc.status == 404 and not exc.code):
                return None
            raise self._translate(exc, full_name) from None
        return CatalogTable(
            full_name=str(info.get("full_name") or full_name), table_id=str(info.get("table_id") or ""),
            storage_location=str(info.get("storage_location") or ""), table_type=str(info.get("table_type") or ""),
            data_source_format=str(info.get("data_source_format") or ""))

    async def create_table(self, full_name: str, location: str | None, warehouse_id: str | None,
                           warehouse_wait: float = WAREHOUSE_WAIT) -> CatalogTable:
        """Register an EXTERNAL DELTA table at ``location``: through a SQL warehouse when one is given (as a
        person would, ``CREATE TABLE IF NOT EXISTS``), else through the UC tables API. Without ``location``, a
        MANAGED table (the warehouse only: the UC API creates external tables). Sent once: a create that got no
        answer raises ``WorkspaceUncertain``, and the caller GETs the table before trying again."""
        catalog, schema, name = split_name(full_name)
        try:
            if warehouse_id or not location:
                assert warehouse_id, "a managed table is created through a SQL warehouse"
                await self.run_statement(create_table_sql(full_name, location), warehouse_id,
                                         wait=warehouse_wait, what=f"CREATE TABLE {full_name}")
            else:
                await in_thread(self.workspace.call, "POST", TABLES, resend=False, json={
                    "name": name, "catalog_name": catalog, "schema_name": schema, "table_type": "EXTERNAL",
                    "data_source_format": "DELTA", "storage_location": location, "columns": uc_columns(),
                    "comment": TABLE_COMMENT, "properties": dict(TABLE_PROPERTIES)})
        except WorkspaceError as exc:
            if warehouse_id and exc.status == 404 and exc.code == "RESOURCE_DOES_NOT_EXIST":
                raise ConfigError(f"{exc}; check --warehouse-id (the id in the SQL warehouse's connection "
                                  "details), or leave it out to create the table through Unity Catalog") from None
            if exc.code not in ("TABLE_ALREADY_EXISTS", "RESOURCE_ALREADY_EXISTS"):
                raise self._translate(exc, full_name) from None
        table = await in_thread(self.get_table, full_name)
        if table is None:
            raise SinkError(f"Unity Catalog table {full_name} was created but cannot be found: check that "
                            "the principal may see it (USE CATALOG, USE SCHEMA, SELECT)")
        log.info("catalog_table_created", table=full_name, table_type=table.table_type, location=location,
                 via="sql warehouse" if warehouse_id else "unity catalog api")
        return table

    async def run_statement(self, statement: str, warehouse_id: str, *, wait: float, what: str,
                            submitted: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Submit ``statement`` once with ``wait_timeout`` 0s (answered at once, whatever the warehouse
        does), then poll it by id with backoff for up to ``wait`` seconds while the warehouse starts.
        Stopped (cancelled), out of time or failing: the statement is cancelled on the warehouse. The last
        answer (``manifest`` and ``result``: the statement's rows) once SUCCEEDED. ``submitted(id)`` is
        called as soon as the statement has its id (to find it again after a crash: ``await_statement``)."""
        answer = await in_thread(self.workspace.call, "POST", STATEMENTS, resend=False, json={
            "warehouse_id": warehouse_id, "statement": statement, "wait_timeout": "0s",
            "on_wait_timeout": "CONTINUE"})
        if submitted is not None:
            submitted(str(answer.get("statement_id") or ""))
        return await self._poll(answer, warehouse_id, wait=wait, what=what)

    async def await_statement(self, statement_id: str, warehouse_id: str, *, wait: float, what: str
                              ) -> dict[str, Any] | None:
        """A statement submitted earlier (maybe by a run that crashed), polled to its end as ``run_statement``
        does; None if the warehouse no longer knows it."""
        try:
            answer = await in_thread(self.workspace.call, "GET", f"{STATEMENTS}/{statement_id}")
        except WorkspaceError as exc:
            if exc.status == 404:
                return None
            raise
        return await self._poll(answer, warehouse_id, wait=wait, what=what)

    async def _poll(self, answer: dict[str, Any], warehouse_id: str, *, wait: float, what: str) -> dict[str, Any]:
        statement_id = str(answer.get("statement_id") or "")
        status: dict[str, Any] = answer.get("status") or {}
        started = trio.current_time()
        backoff = Backoff(initial=POLL_INITIAL, maximum=POLL_MAXIMUM)
        try:
            while status.get("state") not in FINAL_STATES:
                elapsed = trio.current_time() - started
                if elapsed >= wait:
                    raise SinkError(f"{what} on SQL warehouse {warehouse_id} still {status.get('state')} after "
                                    f"{elapsed:.0f} s: start the warehouse (or see why it cannot start) and try "
                                    f"again, or give it longer with --warehouse-wait (now {wait:g} s)")
                if status.get("state") == "PENDING":
                    log.info("warehouse_starting", warehouse_id=warehouse_id, statement_id=statement_id,
                             elapsed=round(elapsed, 1))
                await trio.sleep(min(backoff.next_delay(), wait - elapsed))
                try:
                    answer = await in_thread(self.workspace.call, "GET", f"{STATEMENTS}/{statement_id}")
                except WorkspaceUnavailable as exc:  # the statement goes on meanwhile: ask again later
                    log.warning("statement_poll_failed", statement_id=statement_id, error=str(exc))
                    continue
                status = answer.get("status") or {}
        finally:
            if status.get("state") not in FINAL_STATES:
                with trio.CancelScope(shield=True):
                    await self._cancel_statement(statement_id)
        if status.get("state") != "SUCCEEDED":
            error = status.get("error") or {}
            raise WorkspaceError(f"{what} on SQL warehouse {warehouse_id} {status.get('state')}: "
                                 f"{error.get('message', '')}", 400, str(error.get("error_code") or status["state"]))
        return answer

    async def _cancel_statement(self, statement_id: str) -> None:
        """Best effort and brief: a statement left behind would still wait for (or start) the warehouse."""
        with trio.move_on_after(CANCEL_TIMEOUT) as scope:
            try:
                await in_thread(self.workspace.call, "POST", f"{STATEMENTS}/{statement_id}/cancel")
            except PistreamError as exc:
                log.warning("statement_cancel_failed", statement_id=statement_id, error=str(exc))
                return
        if scope.cancelled_caught:
            log.warning("statement_cancel_failed", statement_id=statement_id,
                        error=f"no answer within {CANCEL_TIMEOUT:g} s")
        else:
            log.info("statement_cancelled", statement_id=statement_id)

    def temporary_credentials(self, table_id: str, full_name: str) -> dict[str, Any]:
        try:
            return self.workspace.call("POST", "/api/2.1/unity-catalog/temporary-table-credentials",
                                       json={"table_id": table_id, "operation": "READ_WRITE"})
        except WorkspaceError as exc:
            raise self._translate(exc, full_name) from None

    def _translate(self, exc: WorkspaceError, full_name: str) -> Exception:
        """UC's answers as errors that name the fix."""
        catalog, schema, _ = split_name(full_name)
        text = str(exc)
        lowered = text.lower()
        if exc.code == "CATALOG_DOES_NOT_EXIST":
            return ConfigError(f"{text}; check the catalog in --table {full_name} (or create it: "
                               f"CREATE CATALOG {catalog})")
        if exc.code == "SCHEMA_DOES_NOT_EXIST":
            return ConfigError(f"{text}; check the schema in --table {full_name} (or create it: "
                               f"CREATE SCHEMA {catalog}.{schema})")
        if "external use schema" in lowered:
            return AuthError(f"{text}; a schema owner must grant it: GRANT EXTERNAL USE SCHEMA ON SCHEMA "
                             f"{catalog}.{schema} TO `<principal>` (pistream writes the table's files itself)")
        if "external data access" in lowered or "external access" in lowered:
            return AuthError(f"{text}; a metastore admin must enable External data access on the metastore "
                             "(Catalog Explorer > Metastore details), which credential vending needs")
        if exc.status == 403 or "[insufficient_permissions]" in lowered:
            return AuthError(f"{text}; grant the principal USE CATALOG on {catalog}, USE SCHEMA and CREATE "
                             f"TABLE on {catalog}.{schema}, MODIFY and SELECT on {full_name} (see README)")
        return SinkError(text)


def uc_columns() -> list[dict[str, Any]]:
    """The bronze schema as UC ``ColumnInfo``s (the partition column with its ``partition_index``)."""
    columns = []
    for position, field in enumerate(TABLE_SCHEMA):
        sql = spark_type(field.type)
        column: dict[str, Any] = {
            "name": field.name, "type_name": sql.upper(), "type_text": sql, "position": position,
            "nullable": field.nullable,
            "type_json": json.dumps({"name": field.name, "type": sql, "nullable": field.nullable, "metadata": {}}),
        }
        if field.name == PARTITION_COLUMN:
            column["partition_index"] = 0
        columns.append(column)
    return columns


_SPARK_TYPES = {pa.string(): "string", TIMESTAMP_US: "timestamp", pa.float64(): "double", pa.int32(): "int",
                pa.bool_(): "boolean", pa.date32(): "date"}


def spark_type(arrow_type: pa.DataType) -> str:
    if arrow_type in _SPARK_TYPES:
        return _SPARK_TYPES[arrow_type]
    raise ValueError(f"no Spark type for {arrow_type}")


def _quote_name(full_name: str) -> str:
    return ".".join(f"`{part}`" for part in split_name(full_name))


def _sql_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def create_table_sql(full_name: str, location: str | None) -> str:
    """``CREATE TABLE IF NOT EXISTS`` of the bronze table: EXTERNAL at ``location``, MANAGED without one."""
    columns = ",\n  ".join(f"`{f.name}` {spark_type(f.type).upper()}{'' if f.nullable else ' NOT NULL'}"
                           for f in TABLE_SCHEMA)
    properties = ", ".join(f"{_sql_string(k)} = {_sql_string(v)}" for k, v in TABLE_PROPERTIES.items())
    where = f"LOCATION {_sql_string(location)} " if location else ""
    return (f"CREATE TABLE IF NOT EXISTS {_quote_name(full_name)} (\n  {columns}\n) USING DELTA "
            f"PARTITIONED BY (`{PARTITION_COLUMN}`) {where}"
            f"COMMENT {_sql_string(TABLE_COMMENT)} TBLPROPERTIES ({properties})")


def vended_storage_options(answer: Mapping[str, Any], location: str) -> dict[str, str]:
    """delta-rs storage options for the credentials UC vended (``temporary-table-credentials``)."""
    aws = answer.get("aws_temp_credentials")
    if aws:
        options = {"AWS_ACCESS_KEY_ID": str(aws["access_key_id"]),
                   "AWS_SECRET_ACCESS_KEY": str(aws["secret_access_key"])}
        if aws.get("session_token"):
            options["AWS_SESSION_TOKEN"] = str(aws["session_token"])
        return options
    azure = answer.get("azure_user_delegation_sas")
    if azure:
        options = {"azure_storage_sas_key": str(azure["sas_token"]).lstrip("?")}
        account = re.match(r"^abfss?://[^@/]+@([^./]+)\.", location)
        if account:
            options["azure_storage_account_name"] = account.group(1)
        return options
    if answer.get("gcp_oauth_token"):
        raise ConfigError("Unity Catalog vended a GCP OAuth token, which delta-rs cannot take as a storage "
                          "option: give pistream a service account key in the config file's storage_options "
                          "(google_service_account_key) for this gs:// table")
    kinds = ", ".join(k for k in answer if k not in ("expiration_time", "url")) or "none"
    raise ConfigError(f"Unity Catalog vended credentials pistream cannot use ({kinds}): only S3 (aws_temp_"
                      "credentials) and ADLS (azure_user_delegation_sas) tables are supported")


def refresh_margin(lifetime: float) -> float:
    """How long before expiry to re-vend: 20 % of the lifetime, at least 10 minutes, at most half of it."""
    return min(max(600.0, 0.2 * lifetime), 0.5 * lifetime)


class VendedCredentials:
    """The storage options of one UC table: the user's own (endpoint, region, ...) plus credentials UC
    vends, re-vended before they expire. Thread-safe: the commit writer and maintenance both ask."""

    def __init__(self, catalog: UnityCatalog, table: CatalogTable, base_options: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.time):
        self.catalog = catalog
        self.table = table
        self.base_options = dict(base_options or {})
        self.clock = clock
        self.generation = 0  # counts vends: a new generation means the sink must reopen the table
        self.expires_at = 0.0
        self._refresh_at = 0.0
        self._vended_at = -MIN_REVEND_INTERVAL
        self._options: dict[str, str] | None = None
        self._lock = threading.Lock()

    def storage_options(self) -> dict[str, str]:
        """The options to use now; re-vends when due. If UC cannot be reached while the current
        credentials are still valid, keeps them (and tries again on the next call)."""
        with self._lock:
            now = self.clock()
            if self._options is None or now >= self._refresh_at:
                try:
                    self._vend(now)
                except SinkError as exc:
                    if self._options is None or now >= self.expires_at:
                        raise
                    log.warning("credentials_refresh_failed", table=self.table.full_name, error=str(exc),
                                expires_in=round(self.expires_at - now, 1))
                    self._refresh_at = now + min(30.0, max(MIN_REVEND_INTERVAL, (self.expires_at - now) / 4))
            assert self._options is not None
            return {**self.base_options, **self._options}

    def invalidate(self) -> None:
        """The storage refused the credentials (revoked, expired early): vend new ones on the next call."""
        with self._lock:
            self._refresh_at = 0.0

    def _vend(self, now: float) -> None:
        if now - self._vended_at < MIN_REVEND_INTERVAL and self._options is not None:
            return
        answer = self.catalog.temporary_credentials(self.table.table_id, self.table.full_name)
        options = vended_storage_options(answer, self.table.storage_location)
        expires = float(answer.get("expiration_time") or 0) / 1000.0 or now + 3600.0
        lifetime = max(expires - now, 0.0)
        self._options = options
        self._vended_at = now
        self.expires_at = expires
        self._refresh_at = expires - refresh_margin(lifetime)
        self.generation += 1
        log.info("credentials_vended", table=self.table.full_name, expires_in=round(lifetime, 1),
                 refresh_in=round(self._refresh_at - now, 1), generation=self.generation)


def check_writable(table: CatalogTable, *, managed: bool = False) -> None:
    """EXTERNAL DELTA tables (and MANAGED ones if ``managed``: through a warehouse, ``copyinto``): a clear
    exit-2 error for anything else."""
    kind = table.table_type.upper()
    if managed and kind == "MANAGED" and table.data_source_format.upper() == "DELTA":
        return
    if kind != "EXTERNAL":
        what = {"MANAGED": "a MANAGED table (Unity Catalog owns its files; outside writers may not write them)",
                "VIEW": "a view", "MATERIALIZED_VIEW": "a materialized view",
                "STREAMING_TABLE": "a streaming table"}.get(kind, f"of type {kind or 'unknown'}")
        raise TableConflictError(f"Unity Catalog table {table.full_name} is {what}: pistream writes EXTERNAL "
                                 "Delta tables only; point --table at a new name and pass --location "
                                 "s3://...|abfss://... to create one")
    if table.data_source_format.upper() != "DELTA":
        raise TableConflictError(f"Unity Catalog table {table.full_name} is {table.data_source_format}, not "
                                 "DELTA: point --table at a Delta table or a new name with --location")
    if not table.storage_location or not table.table_id:
        raise TableConflictError(f"Unity Catalog gave no storage location or id for {table.full_name}: "
                                 "check that the principal may read the table's metadata")
