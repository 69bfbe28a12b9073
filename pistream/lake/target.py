"""Which table ``--table`` names: a local folder, an object-store URI (``s3://``, ``abfss://``, ``gs://``), or
a Unity Catalog name ``catalog.schema.table`` whose storage location and short-lived credentials come from
the Databricks workspace. The pipeline, the sink and the maintenance commands all reach the table through
a ``TableTarget``: ``uri`` is where the files are, ``storage_options()`` the options to reach them now.

``await target.open()`` gets a target ready in a stream: a Unity Catalog table's workspace is asked again
with backoff while it is unreachable, answers 5xx or times out (``workspace_unreachable``), as a storage outage
is later; only what a person must fix (credentials, names, privileges) ends the start. Cancelling it (the
stop) cancels what it waits for. ``prepare()`` is for the one-shot commands: blocking, no retry, no creation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ..backoff import Backoff
from ..config import load_config_file
from ..errors import ConfigError
from .storage import effective_storage_options, is_remote

if TYPE_CHECKING:
    from .unitycatalog import CatalogTable, UnityCatalog

log = structlog.get_logger(__name__)

REMOTE_LOCATIONS = ("s3://", "s3a://", "abfss://", "abfs://", "az://", "azure://", "gs://")


class TableTarget:
    """A table given by path or URI: its options are the user's, as they are."""

    catalog_name: str | None = None
    generation = 0  # a new generation of storage options means the table must be opened again

    def __init__(self, uri: str, storage_options: Mapping[str, str] | None = None):
        self.uri = uri
        self.base_options = dict(storage_options or {})

    @property
    def display(self) -> str:
        from .storage import redact_uri

        return redact_uri(self.uri)

    def prepare(self) -> None:
        """Blocking: find the table's location and credentials (nothing to do for a path or URI)."""

    async def open(self) -> None:
        """``prepare`` for a stream (a Unity Catalog table: retried while the workspace is unreachable)."""
        self.prepare()

    def storage_options(self) -> dict[str, str]:
        """The options to reach the table now (with pistream's defaults for object stores)."""
        return effective_storage_options(self.uri, self.base_options)

    def invalidate(self) -> None:
        """The storage refused the credentials: get new ones on the next ``storage_options()``."""

    def close(self) -> None:
        pass

    def __enter__(self) -> TableTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CatalogTarget(TableTarget):
    """A Unity Catalog table: resolved (and, with ``location``, created) at ``prepare``; credentials vended
    and refreshed by ``VendedCredentials``. ``base_options`` add non-secret settings (endpoint, region)."""

    def __init__(self, full_name: str, *, profile: str | None = None, warehouse_id: str | None = None,
                 location: str | None = None, storage_options: Mapping[str, str] | None = None,
                 environ: Mapping[str, str] | None = None, workspace: Any = None,
                 warehouse_wait: float | None = None, managed_write: str | None = None):
        from .databricks import Workspace
        from .unitycatalog import WAREHOUSE_WAIT

        super().__init__("", storage_options)
        self.catalog_name = full_name
        self.warehouse_id = warehouse_id
        self.warehouse_wait = warehouse_wait or WAREHOUSE_WAIT
        self.location = location.rstrip("/") if location else None
        if self.location and not self.location.startswith(REMOTE_LOCATIONS):
            raise ConfigError(f"--location {self.location} is not a cloud storage URI: an external table "
                              "needs s3://..., abfss://...@ACCOUNT.dfs.core.windows.net/... or gs://...")
        self.workspace = workspace or Workspace(_workspace_config(full_name, profile, environ))
        self.credentials: Any = None
        # A MANAGED table is taken (written through the warehouse: ``copyinto``) only when a stream says how.
        self.managed_write = managed_write
        self.table: CatalogTable | None = None  # as Unity Catalog describes it, once resolved

    @property
    def managed(self) -> bool:
        """A MANAGED table: no credentials are vended, its files are Unity Catalog's; ``copyinto`` writes it."""
        return self.table is not None and self.table.table_type.upper() == "MANAGED"

    @property
    def display(self) -> str:
        from .storage import redact_uri

        return f"{self.catalog_name} ({redact_uri(self.uri)})" if self.uri else str(self.catalog_name)

    @property
    def generation(self) -> int:  # type: ignore[override]
        return self.credentials.generation if self.credentials is not None else 0

    def prepare(self) -> None:
        """Blocking, for the one-shot commands: find the table (never created here) and vend its first
        credentials; an unreachable workspace is an error at once."""
        from .unitycatalog import UnityCatalog

        assert self.catalog_name is not None
        catalog = UnityCatalog(self.workspace)
        table = catalog.get_table(self.catalog_name)
        if table is None:
            raise self._missing()
        self._use(catalog, table)

    async def open(self, *, retry: bool = True) -> None:
        """Find (or create) the table and vend its first credentials. An unreachable workspace, a 5xx or a
        timeout is tried again with backoff until it answers or this is cancelled; what a person must fix
        (credentials, a missing catalog or schema, a managed table) raises at once."""
        from .databricks import WorkspaceUnavailable

        backoff = Backoff(initial=1.0, maximum=60.0)
        while True:
            try:
                await self._open_once()
                return
            except WorkspaceUnavailable as exc:
                if not retry:
                    raise
                delay = backoff.next_delay()
                log.warning("workspace_unreachable", host=self.workspace.config.host, table=self.catalog_name,
                            attempt=backoff.attempt, next_delay=round(delay, 1), error=str(exc))
                await trio.sleep(delay)

    async def _open_once(self) -> None:
        from .unitycatalog import UnityCatalog, in_thread

        assert self.catalog_name is not None
        catalog = UnityCatalog(self.workspace)
        table = await in_thread(catalog.get_table, self.catalog_name)  # first: an unanswered create may have landed
        if table is None:
            if not self.location and not (self.managed_write and self.warehouse_id):
                raise self._missing()
            table = await catalog.create_table(self.catalog_name, self.location, self.warehouse_id,
                                               self.warehouse_wait)
        await in_thread(self._use, catalog, table)

    def _missing(self) -> ConfigError:
        return ConfigError(f"Unity Catalog table {self.catalog_name} does not exist: pass --location "
                           "s3://BUCKET/PATH (or abfss://...) to create it as an external table there "
                           "(with --warehouse-id to create it through a SQL warehouse), or only --warehouse-id "
                           "to create it as a MANAGED table through that warehouse")

    def _use(self, catalog: UnityCatalog, table: CatalogTable) -> None:
        """Blocking: check the table, then the first vend (refused privileges show here, at start)."""
        from .unitycatalog import VendedCredentials, check_writable

        check_writable(table, managed=self.managed_write is not None)
        self.table = table
        if self.managed:
            self.uri = table.storage_location
            log.info("catalog_table_resolved", table=self.catalog_name, table_type="MANAGED",
                     managed_write=self.managed_write)
            return
        if self.location and self.location != table.storage_location.rstrip("/"):
            log.warning("location_ignored", table=self.catalog_name, location=self.location,
                        storage_location=table.storage_location, note="the table exists; its own location is used")
        self.uri = table.storage_location
        credentials = VendedCredentials(catalog, table, self.base_options)
        credentials.storage_options()
        self.credentials = credentials
        log.info("catalog_table_resolved", table=self.catalog_name, storage_location=self.display,
                 expires_in=round(credentials.expires_at - credentials.clock(), 1))

    def storage_options(self) -> dict[str, str]:
        if self.managed:
            raise ConfigError(f"{self.catalog_name} is a MANAGED table: Unity Catalog vends no credentials to "
                              "write its files; pistream writes it through a SQL warehouse (--managed-write)")
        if self.credentials is None:
            self.prepare()
        return effective_storage_options(self.uri, self.credentials.storage_options())

    def invalidate(self) -> None:
        if self.credentials is not None:
            self.credentials.invalidate()

    def close(self) -> None:
        self.workspace.close()


def _workspace_config(full_name: str, profile: str | None, environ: Mapping[str, str] | None) -> Any:
    """The workspace of a Unity Catalog ``--table``; without one, say that the name was read as a UC table,
    where a workspace was looked for, and the least that configures one."""
    import os

    from .databricks import config_file_path, load_workspace_config

    try:
        return load_workspace_config(profile, environ)
    except ConfigError as exc:
        environ = os.environ if environ is None else environ
        path = config_file_path(environ)
        name = profile or environ.get("DATABRICKS_CONFIG_PROFILE") or "DEFAULT"
        looked = (f"looked for DATABRICKS_HOST, DATABRICKS_TOKEN, DATABRICKS_CLIENT_ID/_SECRET and profile {name} in "
                  f"{path}" + ("" if path.exists() else " (no such file; DATABRICKS_CONFIG_FILE names another)"))
        raise ConfigError(
            f"--table {full_name} was read as a Unity Catalog table (catalog.schema.table), but {exc} ({looked}); "
            f"the least that works: a [{name}] profile in {path} with host = https://<workspace> and client_id "
            "and client_secret of a service principal (or token), or the DATABRICKS_HOST and DATABRICKS_TOKEN "
            f"variables; for a local folder of that name write --table ./{full_name} (docs/unity-catalog.md)"
        ) from None


_DOTTED_LOCAL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def dotted_local_name(table: str) -> str | None:
    """A note for a local ``--table`` that looks like a misspelt Unity Catalog name (``bronze.pi_events``:
    two parts), else None."""
    if _DOTTED_LOCAL.match(table) and table.count(".") != 2:
        return (f"read as the local folder ./{table}: a Unity Catalog table has three parts, "
                f"catalog.schema.table; write --table ./{table} if the folder is meant")
    return None


def make_target(table: str, *, storage_options: Mapping[str, str] | None = None,
                databricks_profile: str | None = None, warehouse_id: str | None = None,
                location: str | None = None, warehouse_wait: float | None = None,
                managed_write: str | None = None) -> TableTarget:
    """The target ``--table`` names (cheap: a UC target reads its workspace profile, but calls nothing).
    ``managed_write``: how a stream writes a MANAGED table (None: refuse one, as the one-shot commands do)."""
    from .unitycatalog import is_table_name

    if is_table_name(table) and not is_remote(table):
        return CatalogTarget(table, profile=databricks_profile, warehouse_id=warehouse_id, location=location,
                             storage_options=storage_options, warehouse_wait=warehouse_wait,
                             managed_write=managed_write)
    if location or warehouse_id:
        raise ConfigError(f"--location and --warehouse-id are for Unity Catalog tables (catalog.schema.table), "
                          f"not {table}: drop them, or name the table as catalog.schema.table")
    note = dotted_local_name(table)
    if note:
        log.warning("table_name_dotted", table=table, note=note)
    return TableTarget(table, storage_options)


def open_target(table: str, config_path: str | None = None, databricks_profile: str | None = None
                ) -> TableTarget:
    """For the one-shot commands (optimize, vacuum, stats): the target, prepared, with the storage options
    and Databricks profile of the config file when one is given (the command line wins)."""
    values = load_config_file(config_path) if config_path else {}
    options = values.get("storage_options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"config file {config_path}: storage_options must be a table of strings")
    target = make_target(table, storage_options={str(k): str(v) for k, v in options.items()},
                         databricks_profile=databricks_profile or values.get("databricks_profile"))
    try:
        target.prepare()
    except BaseException:
        target.close()
        raise
    return target
