"""A Unity Catalog volume through the Databricks Files API: the staging area of the COPY INTO path
(``copyinto``). Found or created at start (``POST /api/2.1/unity-catalog/volumes``, a MANAGED volume), then
files are put, read, listed and deleted under ``/Volumes/<catalog>/<schema>/<volume>/``.

Every Files API call here is idempotent (a PUT with ``overwrite=true`` of the same bytes, a DELETE of what may
be gone already), so each is sent again on 429/5xx or a lost answer, as ``Workspace.call`` does. Creating the
volume is not: it is sent once, and an answer lost on the way is settled by looking (GET) before trying again.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

import httpx
import structlog

from ..errors import AuthError, ConfigError, SinkError
from .databricks import Workspace, WorkspaceError, WorkspaceUncertain

log = structlog.get_logger(__name__)

VOLUMES = "/api/2.1/unity-catalog/volumes"
FILES = "/api/2.0/fs/files"
DIRECTORIES = "/api/2.0/fs/directories"


@dataclass(frozen=True)
class Entry:
    """One entry of a volume directory: its full ``/Volumes/...`` path."""

    path: str
    name: str
    is_directory: bool
    size: int


class Volume:
    """One volume, by its three-part name; paths given to the methods are relative to its root."""

    def __init__(self, workspace: Workspace, full_name: str):
        parts = full_name.split(".")
        if len(parts) != 3 or not all(parts):
            raise ConfigError(f"--staging-volume {full_name!r} is not a volume name: write catalog.schema.volume "
                              "(e.g. main.bronze.pistream_staging)")
        self.workspace = workspace
        self.full_name = full_name
        self.catalog, self.schema, self.name = parts
        self.root = f"/Volumes/{self.catalog}/{self.schema}/{self.name}"

    def ensure(self) -> None:
        """Find the volume, or create it as a MANAGED volume; a refusal names the privileges it needs."""
        if self._exists():
            return
        try:
            self.workspace.call("POST", VOLUMES, resend=False, json={
                "catalog_name": self.catalog, "schema_name": self.schema, "name": self.name,
                "volume_type": "MANAGED", "comment": "pistream: Parquet files staged for COPY INTO"})
        except WorkspaceUncertain:
            if not self._exists():
                raise
        except WorkspaceError as exc:
            if exc.code in ("VOLUME_ALREADY_EXISTS", "RESOURCE_ALREADY_EXISTS"):
                return
            if exc.status == 403 or exc.code == "PERMISSION_DENIED":
                raise AuthError(
                    f"{exc}; pistream stages files in the volume {self.full_name} and may not create it: create it "
                    f"once (CREATE VOLUME {self.full_name}) and GRANT READ VOLUME, WRITE VOLUME ON VOLUME "
                    f"{self.full_name} TO `<principal>`, or grant CREATE VOLUME ON SCHEMA {self.catalog}."
                    f"{self.schema} (with USE CATALOG and USE SCHEMA)") from None
            raise self._translate(exc) from None
        log.info("staging_volume_created", volume=self.full_name)

    def _exists(self) -> bool:
        try:
            self.workspace.call("GET", f"{VOLUMES}/{quote(self.full_name, safe='')}")
        except WorkspaceError as exc:
            if exc.status == 404 and exc.code in ("VOLUME_DOES_NOT_EXIST", "RESOURCE_DOES_NOT_EXIST", ""):
                return False
            raise self._translate(exc) from None
        return True

    def _translate(self, exc: WorkspaceError) -> Exception:
        if exc.code == "CATALOG_DOES_NOT_EXIST":
            return ConfigError(f"{exc}; check the catalog of --staging-volume {self.full_name}")
        if exc.code == "SCHEMA_DOES_NOT_EXIST":
            return ConfigError(f"{exc}; check the schema of --staging-volume {self.full_name} (or create it: "
                               f"CREATE SCHEMA {self.catalog}.{self.schema})")
        if exc.status == 403 or exc.code == "PERMISSION_DENIED":
            return AuthError(f"{exc}; GRANT READ VOLUME, WRITE VOLUME ON VOLUME {self.full_name} TO `<principal>` "
                             f"(with USE CATALOG on {self.catalog} and USE SCHEMA on {self.catalog}.{self.schema})")
        return SinkError(f"{exc}; staging volume {self.full_name}")

    def _url(self, base: str, path: str) -> str:
        full = f"{self.root}/{path.strip('/')}".rstrip("/")
        return base + quote(full)

    def put(self, path: str, data: bytes) -> None:
        self._files("PUT", FILES, path, content=data, params={"overwrite": "true"})

    def get(self, path: str) -> bytes:
        response = self._files("GET", FILES, path)
        assert response is not None
        return response.content

    def delete(self, path: str) -> None:
        """Delete a file; one that is gone already is fine."""
        self._files("DELETE", FILES, path, missing_ok=True)

    def list(self, path: str) -> list[Entry]:
        """The entries of a directory, [] if it does not exist."""
        entries: list[Entry] = []
        token = ""
        for _ in range(10_000):  # pages of up to 1,000 entries
            params = {"page_token": token} if token else None
            answer = self._files("GET", DIRECTORIES, path, params=params, missing_ok=True)
            if answer is None:
                return []
            body = answer.json() if answer.content else {}
            for item in body.get("contents") or []:
                entries.append(Entry(str(item["path"]), str(item.get("name") or item["path"].rsplit("/", 1)[-1]),
                                     bool(item.get("is_directory")), int(item.get("file_size") or 0)))
            token = str(body.get("next_page_token") or "")
            if not token:
                break
        return entries

    def remove_tree(self, path: str) -> int:
        """Delete a directory with everything in it (the Files API deletes only empty ones); files deleted."""
        count = 0
        for entry in self.list(path):
            relative = entry.path.removeprefix(self.root).strip("/")
            if entry.is_directory:
                count += self.remove_tree(relative)
            else:
                self.delete(relative)
                count += 1
        self._files("DELETE", DIRECTORIES, path, missing_ok=True)
        return count

    def _files(self, method: str, base: str, path: str, *, content: bytes | None = None,
               params: dict[str, str] | None = None, missing_ok: bool = False) -> httpx.Response | None:
        """One Files API call; None for a missing file or directory if ``missing_ok``; a missing volume or a
        refusal as an error that names the fix."""
        try:
            return self.workspace.request(method, self._url(base, path), content=content, params=params)
        except WorkspaceError as exc:
            if exc.status == 404 and missing_ok and exc.code != "VOLUME_DOES_NOT_EXIST":
                return None
            if exc.status == 404:
                raise ConfigError(f"{exc}; the staging volume {self.full_name} is gone: create it again "
                                  f"(CREATE VOLUME {self.full_name}) or restart pistream to create it") from None
            raise self._translate(exc) from None
