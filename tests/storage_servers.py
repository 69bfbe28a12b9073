"""Real cloud storage on loopback for the tests: S3 from moto_server and Azure Blob from Azurite, each a
separate process started once per test session on a free 127.0.0.1 port and stopped at the end.

Registered as a pytest plugin by conftest (``pytest_plugins``). Fixtures:

- ``s3_server``: moto_server (PyPI ``moto[server]``, run as ``python -m moto.server``), with one bucket.
- ``azurite_server``: ``azurite-blob`` (npm ``azurite``), found through ``AZURITE_BIN``, then the repo's
  ``.ci/node`` folder (where ``.ci/run`` installs it), then ``PATH``; with one container.

Each gives a ``StorageServer``: ``uri_prefix`` (e.g. ``s3://pistream-test``), ``storage_options`` for
deltalake, and ``table_uri(name)`` for a fresh table location. A server that is not installed skips its
tests with the reason, except under CI (``CI`` set), where it fails them: there it must run.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

S3_BUCKET = "pistream-test"
AZURE_CONTAINER = "pistream-test"
# Azurite's well-known development account (public, documented; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@dataclass
class StorageServer:
    name: str
    process: subprocess.Popen
    port: int
    uri_prefix: str
    storage_options: dict[str, str]
    log_path: Path
    extra_prefixes: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def table_uri(self, name: str, prefix: str | None = None) -> str:
        """A location no other test uses: the server lives for the whole session."""
        return f"{self.uri_prefix if prefix is None else prefix}/{name}-{uuid.uuid4().hex[:8]}"

    def freeze(self) -> None:
        """Stop the server process (SIGSTOP): connections are accepted by the kernel, never answered."""
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)


def _unavailable(reason: str) -> NoReturn:
    """Skip locally, fail in CI: CI installs every server, so a missing one there is a broken setup."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the storage servers must run here; see .ci/run)", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-limit:]
    except OSError:
        return ""


def _wait_for_port(process: subprocess.Popen, port: int, log_path: Path, what: str) -> None:
    """Poll until the port accepts connections; bounded by STARTUP_TIMEOUT; fail fast if the process exits."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} while starting:\n"
                               f"{_log_tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {STARTUP_TIMEOUT:.0f} s:\n"
                               f"{_log_tail(log_path)}")
        time.sleep(0.1)


def _start(argv_for_port, what: str, log_path: Path, env: dict[str, str] | None = None
           ) -> tuple[subprocess.Popen, int]:
    """Start the server on a free port (a few tries: another process may take the port in between)."""
    error: Exception | None = None
    for _ in range(3):
        port = _free_port()
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(argv_for_port(port), stdin=subprocess.DEVNULL, stdout=log_file,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait_for_port(process, port, log_path, what)
            return process, port
        except RuntimeError as exc:
            error = exc
            _stop(process)
    raise RuntimeError(str(error))


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    try:
        process.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
        process.terminate()
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)
    except ProcessLookupError:
        pass


def _http(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers={"Content-Length": "0", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- S3 (moto_server) ------------------------------------------------------------------------------------

def _server_env() -> dict[str, str]:
    """The servers talk to nobody but the tests: no proxies."""
    return {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageServer]:
    missing = [m for m in ("moto", "flask", "werkzeug") if importlib.util.find_spec(m) is None]
    if missing:
        _unavailable(f"moto_server is not installed ({', '.join(missing)} missing): "
                     "pip install 'moto[server]' (or pip install -e '.[test]')")
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    process, port = _start(
        lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        "moto_server", log_path, env=_server_env())
    try:
        status, body = _http(port, "PUT", f"/{S3_BUCKET}")  # moto takes unsigned requests
        if status != 200:
            raise RuntimeError(f"moto_server: creating bucket {S3_BUCKET} answered {status}: {body[:300]!r}")
        yield StorageServer(
            name="s3",
            process=process,
            port=port,
            uri_prefix=f"s3://{S3_BUCKET}",
            storage_options={
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                "AWS_ALLOW_HTTP": "true",
                "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "aws_conditional_put": "etag",  # safe concurrent commits without a lock service
            },
            log_path=log_path,
        )
    finally:
        _stop(process)


# -- Azure Blob (Azurite) --------------------------------------------------------------------------------

def find_azurite() -> str | None:
    """``AZURITE_BIN``, then the repo-local npm install of .ci/run, then PATH."""
    explicit = os.environ.get("AZURITE_BIN")
    if explicit:
        return explicit if Path(explicit).exists() else shutil.which(explicit)
    local = REPO / ".ci" / "node" / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    return shutil.which("azurite-blob")


def _shared_key_request(port: int, method: str, path: str, query: dict[str, str]) -> tuple[int, bytes]:
    """One Blob REST call signed with Shared Key (no Azure SDK needed for the one call the tests make)."""
    date = formatdate(usegmt=True)
    version = "2021-08-06"
    canonical_headers = f"x-ms-date:{date}\nx-ms-version:{version}\n"
    canonical_resource = f"/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}{path}" + "".join(
        f"\n{k}:{v}" for k, v in sorted(query.items()))
    # VERB, then 11 standard headers (all empty here), then the canonical x-ms headers and resource.
    string_to_sign = method + "\n" * 12 + canonical_headers + canonical_resource
    signature = base64.b64encode(
        hmac.new(base64.b64decode(AZURITE_KEY), string_to_sign.encode(), hashlib.sha256).digest()).decode()
    query_string = "&".join(f"{k}={v}" for k, v in query.items())
    return _http(port, method, f"/{AZURITE_ACCOUNT}{path}?{query_string}", {
        "x-ms-date": date, "x-ms-version": version, "Authorization": f"SharedKey {AZURITE_ACCOUNT}:{signature}",
    })


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageServer]:
    binary = find_azurite()
    if binary is None:
        _unavailable("azurite-blob not found: run .ci/run (npm install into .ci/node), "
                     "npm install -g azurite, or set AZURITE_BIN")
    if shutil.which("node") is None and not os.environ.get("AZURITE_BIN"):
        _unavailable("node is not installed: azurite-blob needs Node.js (apt-get install nodejs npm)")
    location = tmp_path_factory.mktemp("azurite")
    log_path = location / "azurite.log"
    process, port = _start(
        lambda port: [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(location),
                      "--skipApiVersionCheck", "--loose", "--silent", "--disableTelemetry"],
        "azurite-blob", log_path, env=_server_env())
    try:
        status, body = _shared_key_request(port, "PUT", f"/{AZURE_CONTAINER}", {"restype": "container"})
        if status != 201:
            raise RuntimeError(f"azurite: creating container {AZURE_CONTAINER} answered {status}: {body[:300]!r}")
        # Emulator mode, not azure_storage_endpoint: with an endpoint, object_store lists the log with
        # the Blob API's `startFrom`, which Azurite ignores, and delta-rs then fails every second commit
        # ("Invalid table version: 1"). In emulator mode the URL comes from this variable only.
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AZURITE_BLOB_STORAGE_URL", f"http://127.0.0.1:{port}")
            yield StorageServer(
                name="azure",
                process=process,
                port=port,
                uri_prefix=f"az://{AZURE_CONTAINER}",
                storage_options={
                    "azure_storage_use_emulator": "true",
                    "azure_storage_account_name": AZURITE_ACCOUNT,
                    "azure_storage_account_key": AZURITE_KEY,
                },
                log_path=log_path,
                extra_prefixes={"abfss": f"abfss://{AZURE_CONTAINER}@{AZURITE_ACCOUNT}.dfs.core.windows.net"},
            )
    finally:
        _stop(process)
