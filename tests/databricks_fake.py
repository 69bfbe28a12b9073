"""A Databricks workspace on loopback for the tests: Unity Catalog tables, temporary table credentials, the SQL
Statement Execution API and OAuth M2M, in the shapes of the Databricks REST API; the credentials it vends
are REAL short-lived S3 credentials that an S3 server enforces (prefix scope and expiry).

Registered as a pytest plugin by conftest (``pytest_plugins``). Fixtures:

- ``uc_s3`` (session): moto (S3 + IAM + STS) in its own process with IAM enforcement on, one bucket
  (``pistream-uc``), an admin user, and the storage-credential role UC assumes (``databricks-uc-storage``).
  Kept apart from ``s3_server`` (storage_servers.py, moto with no auth).
- ``uc_workspace_server`` (session): the fake workspace, a ``ThreadingHTTPServer`` on 127.0.0.1 port 0.
- ``uc_workspace`` (function): the same server, reset for the test (catalog ``main`` with schema ``bronze``
  and no table, every knob at its default, counters and log empty), with every ``AWS_*`` and
  ``DATABRICKS_*`` variable removed from the environment for the test (delta-rs and boto3 read them by
  themselves: no test may pass on ambient credentials).

Endpoints (JSON unless said; every ``/api/`` call needs ``Authorization: Bearer <PAT or OAuth token>``):

- ``POST /oidc/v1/token`` (form ``grant_type=client_credentials&scope=all-apis``, client id/secret by HTTP
  Basic or as form fields) and ``GET /oidc/.well-known/oauth-authorization-server``.
- ``GET|DELETE /api/2.1/unity-catalog/tables/{full_name}``, ``GET /api/2.1/unity-catalog/tables?catalog_name=
  &schema_name=``, ``POST /api/2.1/unity-catalog/tables`` (EXTERNAL tables only, as the real API).
- ``POST /api/2.1/unity-catalog/temporary-table-credentials`` (``table_id``, ``operation`` READ|READ_WRITE).
- ``POST /api/2.0/sql/statements``, ``GET /api/2.0/sql/statements/{id}``, ``POST .../{id}/cancel``: understands
  ``CREATE TABLE [IF NOT EXISTS] c.s.t (<columns>) [USING DELTA] [PARTITIONED BY (..)] [LOCATION '..']
  [COMMENT '..'] [TBLPROPERTIES (..)]`` and ``COPY INTO`` (``databricks_fake_volumes``); anything else FAILS as a
  syntax error.
- Volumes, the Files API and MANAGED tables as local Delta tables: ``databricks_fake_volumes`` (a mixin).

``uc_workspace`` (a ``FakeWorkspace``): ``host`` (http://127.0.0.1:PORT), ``pat``, ``client_id``,
``client_secret``, ``user``, ``warehouse_id``, ``metastore_id``, ``s3_endpoint``, ``bucket``, ``region``,
``base_storage_options`` (endpoint, allow_http, region, conditional put: no secret), ``admin_storage_options``
(full bucket access, to check results), ``location(name)``, ``storage_options(vend_answer)``,
``register_table(full_name, location=None, table_type="EXTERNAL"|"MANAGED"|"VIEW", ...)``, ``table(name)``,
``drop_table(name)``, ``add_catalog``, ``add_schema("cat.schema")``, ``databrickscfg(dir, profile, auth)``,
``environ(auth)``, ``s3`` (the ``IamS3``). Knobs (plain attributes, reset for every test):
``credential_lifetime`` (s, default 3600), ``oauth_token_lifetime`` (s, 3600), ``warehouse_start_seconds``
(0: the SQL warehouse starts with the first statement after a reset and is up this long after; statements
stay PENDING until then, as on a stopped warehouse), ``statement_seconds`` (0.5: a statement is PENDING when
submitted with wait_timeout 0s, RUNNING on polls once the warehouse is up, until this long after it was
submitted or the warehouse came up, then SUCCEEDED/FAILED; a submission with a wait_timeout holds the
answer that long, or until the statement ends), ``outage`` (every call 503 TEMPORARILY_UNAVAILABLE),
``outage_retry_after``, ``external_data_access`` and ``external_use_schema`` (False: the two 403
PERMISSION_DENIED of vending and of creating tables through the API), ``slow_answers`` (endpoint -> seconds:
the call is carried out, its answer held that long: a client's read timeout then meets a call that did
happen), ``fail_next(n, status, endpoint=None)``, ``down()`` / ``up()`` (the port refuses connections and
open ones are cut / served again on the same port; a reset brings it up). Counters: ``calls`` (per
endpoint), ``statements`` (each submitted statement: id, state, wait_timeout), ``token_requests``,
``credential_vends``, ``vends`` (no secrets), ``request_log`` (no secrets; with each call's User-Agent).

What delta-rs 1.6.6 says with the vended credentials: outside the prefix, ``OSError`` with "403 Forbidden"
and ``<Code>AccessDenied</Code>``; after expiry, "400 Bad Request" and ``<Code>ExpiredToken</Code>`` (an
``OSError`` when opening by URI, a ``deltalake.exceptions.DeltaError`` when writing through an open
``DeltaTable``).

How the S3 side enforces the credentials (moto 5.2.6 alone does neither): moto checks signatures and IAM
policies once ``/moto-api/reset-auth`` is set to 0, but (1) it authorises S3 calls by operation name
(``ListObjectsV2``, ``HeadObject``) rather than by IAM action, ignores ``s3:prefix`` conditions and session
policies, and (2) never rejects expired STS credentials. The moto process here (this file run as a script)
replaces moto's ``S3IAMRequest`` with a subclass that maps operations to IAM actions, evaluates the
``s3:prefix`` condition (StringLike), requires the AssumeRole session policy as well as the role's policies,
and answers ``400 ExpiredToken "The provided token has expired."`` once an assumed role's expiration has
passed. UC vends by AssumeRole of the storage role with a session policy scoped to the table's prefix
(objects under ``prefix/*``, ListBucket with ``s3:prefix`` in ``prefix``, ``prefix/*``) and
``DurationSeconds`` = ``credential_lifetime`` (below STS's 900 s minimum: parameter validation is off on the
fake's STS client); ``expiration_time`` is STS's expiration.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import math
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from databricks_fake_volumes import VolumesMixin, volume_endpoint

MOTO_ACCOUNT = "123456789012"  # moto's default account
UC_BUCKET = "pistream-uc"
UC_REGION = "us-east-1"
STORAGE_ROLE = "databricks-uc-storage"
ADMIN_USER = "databricks-uc-admin"
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
THIS_FILE = Path(__file__).resolve()


# == the moto process (this file run as a script) ===========================================================

# moto authorises S3 calls by API operation; IAM policies speak of actions.
_S3_ACTIONS = {
    "ListObjects": "ListBucket", "ListObjectsV2": "ListBucket", "HeadBucket": "ListBucket",
    "ListObjectVersions": "ListBucketVersions", "HeadObject": "GetObject", "GetObjectAttributes": "GetObject",
    "CreateMultipartUpload": "PutObject", "UploadPart": "PutObject", "CompleteMultipartUpload": "PutObject",
    "CopyObject": "PutObject", "UploadPartCopy": "PutObject", "ListParts": "ListMultipartUploadParts",
    "ListMultipartUploads": "ListBucketMultipartUploads",
}


def _patch_moto() -> None:
    """IAM for S3 as AWS does it, for what the fake needs: see the module docstring."""
    import moto.iam.access_control as access_control
    from moto.core.utils import utcnow
    from moto.iam import policy_conditions
    from moto.s3.exceptions import BucketAccessDeniedError, S3ClientError
    from moto.sts.models import sts_backends

    class ExpiredTokenError(S3ClientError):  # served as 400, as AWS does
        def __init__(self) -> None:
            super().__init__("ExpiredToken", "The provided token has expired.")

    def string_like(expected: Any, actual: str) -> bool:
        patterns = [expected] if isinstance(expected, str) else list(expected)
        return any(fnmatch.fnmatchcase(actual, pattern) for pattern in patterns)

    policy_conditions.CONDITION_OPERATIONS.setdefault("StringLike", string_like)  # type: ignore[arg-type]
    base = access_control.S3IAMRequest

    class EnforcingS3IAMRequest(base):  # type: ignore[misc, valid-type]
        def __init__(self, account_id, method, path, data, body, headers, action):
            action = action[0] if isinstance(action, list) else action
            super().__init__(account_id, method, path, data, body, headers, _S3_ACTIONS.get(action, action))
            self._operation = action
            self._query = parse_qs(urlsplit(path).query, keep_blank_values=True)
            self._session_policy = None
            key = self._access_key
            if isinstance(key, access_control.AssumedRoleAccessKey):
                for role in sts_backends[account_id][key.partition].assumed_roles:
                    if role.access_key_id == key._access_key_id:
                        if role.expiration <= utcnow():
                            print(f"expired: {key._access_key_id} {method} {path}", file=sys.stderr, flush=True)
                            raise ExpiredTokenError()
                        self._session_policy = role.policy
                        break

        def check_action_permitted(self, resource: str) -> None:
            if self._operation == "DeleteObjects":  # AWS checks s3:DeleteObject for each key
                bucket = resource.split(":::", 1)[1]
                keys = re.findall(rb"<Key>(.*?)</Key>", self._body or b"")
                for key in keys:
                    name = key.decode().replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
                    if not self._permitted("s3:DeleteObject", f"arn:aws:s3:::{bucket}/{name}"):
                        raise BucketAccessDeniedError(bucket=bucket)
                return
            if not self._permitted(self._action, resource):
                print(f"denied: {self._action} {resource} {self._path}", file=sys.stderr, flush=True)
                self._raise_access_denied()

        def _permitted(self, action: str, resource: str) -> bool:
            values = None
            if action == "s3:ListBucket":  # absent -> "", which a StringLike on a prefix never matches
                values = {"s3:prefix": self._query.get("prefix", [""])[0]}
            allowed = self._allowed_by(self._access_key.collect_policies(), action, resource, values)
            if allowed and self._session_policy:
                allowed = self._allowed_by([self._session_policy], action, resource, values)
            return allowed

        def _allowed_by(self, policies, action, resource, values) -> bool:
            permitted = False
            for policy in policies:
                result = access_control.IAMPolicy(policy).is_action_permitted(
                    action, resource, incoming_condition_values=values)
                if result == access_control.PermissionResult.DENIED:
                    return False
                if result == access_control.PermissionResult.PERMITTED:
                    permitted = True
            return permitted

    access_control.S3IAMRequest = EnforcingS3IAMRequest  # type: ignore[misc]


def _serve_moto(port_file: str) -> None:
    """moto on 127.0.0.1 port 0, patched; the port goes to ``port_file`` once it listens."""
    import logging

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    _patch_moto()
    server = make_server("127.0.0.1", 0, DomainDispatcherApplication(create_backend_app), True,
                         request_handler=MotoRequestHandler)
    Path(port_file + ".tmp").write_text(str(server.server_port))
    os.replace(port_file + ".tmp", port_file)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


# == the S3 side, seen from the tests ======================================================================

def _unavailable(reason: str):
    """Skip locally, fail in CI (as storage_servers does)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the fake Databricks workspace must run here)", pytrace=False)
    pytest.skip(reason)


def _server_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k.lower() not in ("http_proxy", "https_proxy", "all_proxy") and not k.startswith("AWS_")}


@dataclass
class VendedS3:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expiration: datetime  # aware, UTC


class IamS3:
    """moto with IAM enforced: the bucket, the admin's keys and the role that UC assumes."""

    def __init__(self, process: subprocess.Popen, port: int, log_path: Path):
        self.process = process
        self.port = port
        self.log_path = log_path
        self.bucket = UC_BUCKET
        self.region = UC_REGION
        self.account_id = MOTO_ACCOUNT
        self.role_arn = f"arn:aws:iam::{MOTO_ACCOUNT}:role/{STORAGE_ROLE}"
        self._admin: tuple[str, str] | None = None
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_storage_options(self) -> dict[str, str]:
        """What a delta-rs client needs besides credentials."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": self.region,
                "aws_conditional_put": "etag"}

    @property
    def admin_storage_options(self) -> dict[str, str]:
        """Full access to the bucket (to check what a test wrote, whatever was vended)."""
        assert self._admin is not None
        return {**self.base_storage_options, "AWS_ACCESS_KEY_ID": self._admin[0],
                "AWS_SECRET_ACCESS_KEY": self._admin[1]}

    def client(self, service: str, access_key_id: str | None = None, secret_access_key: str | None = None,
               session_token: str | None = None):
        """A boto3 client on this moto: the admin's unless credentials are given."""
        import boto3
        from botocore.config import Config

        if access_key_id is None:
            assert self._admin is not None
            access_key_id, secret_access_key = self._admin
        session = boto3.session.Session(aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
                                        aws_session_token=session_token, region_name=self.region)
        # parameter_validation off: STS's 900 s minimum DurationSeconds is botocore's check, not moto's.
        return session.client(service, endpoint_url=self.endpoint, config=Config(
            retries={"max_attempts": 1}, parameter_validation=False, connect_timeout=10, read_timeout=30))

    def _admin_client(self, service: str):
        with self._lock:
            if service not in self._clients:
                self._clients[service] = self.client(service)
            return self._clients[service]

    def bootstrap(self) -> None:
        """Bucket, admin user, storage role while moto takes anything; then IAM on, and checked."""
        import urllib.request

        boot = dict(access_key_id="bootstrap", secret_access_key="bootstrap")
        self.client("s3", **boot).create_bucket(Bucket=self.bucket)
        iam = self.client("iam", **boot)
        iam.create_user(UserName=ADMIN_USER)
        iam.put_user_policy(UserName=ADMIN_USER, PolicyName="admin", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName=ADMIN_USER)["AccessKey"]
        admin_arn = f"arn:aws:iam::{MOTO_ACCOUNT}:user/{ADMIN_USER}"
        iam.create_role(RoleName=STORAGE_ROLE, AssumeRolePolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Principal": {"AWS": admin_arn}, "Action": "sts:AssumeRole"}]}))
        iam.put_role_policy(RoleName=STORAGE_ROLE, PolicyName="bucket", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": [
                f"arn:aws:s3:::{self.bucket}", f"arn:aws:s3:::{self.bucket}/*"]}]}))
        self._admin = (key["AccessKeyId"], key["SecretAccessKey"])
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})  # not form: moto reads the raw body
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10) as answer:
            if answer.status != 200:
                raise RuntimeError(f"moto reset-auth answered {answer.status}")
        self._self_check()

    def _self_check(self) -> None:
        """Enforcement is on, or the fake would let every test pass: unknown keys refused, the admin
        served, a scoped credential refused outside its prefix."""
        import botocore.exceptions

        try:
            self.client("s3", "AKIANOSUCHKEY0000000", "nope").list_objects_v2(Bucket=self.bucket)
        except botocore.exceptions.ClientError as exc:
            if exc.response["Error"]["Code"] != "InvalidAccessKeyId":
                raise RuntimeError(f"moto refused an unknown key with {exc}, not InvalidAccessKeyId") from None
        else:
            raise RuntimeError("moto took an unknown access key: IAM enforcement is off")
        self._admin_client("s3").list_objects_v2(Bucket=self.bucket, MaxKeys=1)
        creds = self.vend("selfcheck/a", "READ_WRITE", 60, "selfcheck")
        s3 = self.client("s3", creds.access_key_id, creds.secret_access_key, creds.session_token)
        s3.put_object(Bucket=self.bucket, Key="selfcheck/a/ok", Body=b"ok")
        try:
            s3.put_object(Bucket=self.bucket, Key="selfcheck/b/no", Body=b"no")
        except botocore.exceptions.ClientError as exc:
            if exc.response["Error"]["Code"] != "AccessDenied":
                raise
        else:
            raise RuntimeError("a credential scoped to selfcheck/a/ wrote selfcheck/b/: the moto patch is off")

    def table_policy(self, prefix: str, operation: str) -> dict[str, Any]:
        """The session policy UC attaches for one table: objects under the prefix, listing of it."""
        actions = ["s3:GetObject", "s3:GetObjectVersion"]
        if operation == "READ_WRITE":
            actions += ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                        "s3:ListMultipartUploadParts"]
        return {"Version": "2012-10-17", "Statement": [
            {"Sid": "TableObjects", "Effect": "Allow", "Action": actions,
             "Resource": f"arn:aws:s3:::{self.bucket}/{prefix}/*"},
            {"Sid": "TableListing", "Effect": "Allow", "Action": ["s3:ListBucket"],
             "Resource": f"arn:aws:s3:::{self.bucket}",
             "Condition": {"StringLike": {"s3:prefix": [prefix, f"{prefix}/*"]}}},
        ]}

    def vend(self, prefix: str, operation: str, lifetime: int, session_name: str) -> VendedS3:
        """STS credentials of the storage role, down-scoped to ``prefix`` and valid ``lifetime`` seconds."""
        answer = self._admin_client("sts").assume_role(
            RoleArn=self.role_arn, RoleSessionName=session_name[:64], DurationSeconds=int(lifetime),
            Policy=json.dumps(self.table_policy(prefix.strip("/"), operation)))["Credentials"]
        expiration = answer["Expiration"]
        if expiration.tzinfo is None:
            expiration = expiration.replace(tzinfo=UTC)
        return VendedS3(answer["AccessKeyId"], answer["SecretAccessKey"], answer["SessionToken"], expiration)

    def freeze(self) -> None:
        """S3 down: the process stops (SIGSTOP); connections are accepted by the kernel, never answered."""
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        try:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
        except ProcessLookupError:
            pass


def start_iam_s3(directory: Path) -> IamS3:
    """The patched moto in its own process (port 0: the port comes back in a file), bootstrapped."""
    log_path = directory / "moto_iam.log"
    port_file = directory / "moto_iam.port"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen([sys.executable, str(THIS_FILE), "--serve-moto", str(port_file)],
                                   stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                   env=_server_env(), start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not port_file.exists():
        if process.poll() is not None:
            raise RuntimeError(f"moto (IAM) exited with code {process.returncode} while starting:\n"
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"moto (IAM) did not listen within {STARTUP_TIMEOUT:.0f} s:\n"
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    server = IamS3(process, int(port_file.read_text()), log_path)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            pass
        server.bootstrap()
    except BaseException:
        server.stop()
        raise
    return server


# == the workspace ==========================================================================================

class ApiError(Exception):
    """An error answer: ``status`` and the JSON body the real service gives."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        super().__init__(body.get("message") or body.get("error_description") or "")
        self.status = status
        self.body = body
        self.headers = headers or {}


def _uc_error(status: int, code: str, message: str, **metadata: str) -> ApiError:
    """Unity Catalog's error shape: error_code, message, and google.rpc details."""
    return ApiError(status, {"error_code": code, "message": message, "details": [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": code,
         "domain": "unity-catalog.databricks.com", "metadata": metadata},
        {"@type": "type.googleapis.com/google.rpc.RequestInfo", "request_id": str(uuid.uuid4()),
         "serving_data": ""}]})


def _api_error(status: int, code: str, message: str) -> ApiError:
    return ApiError(status, {"error_code": code, "message": message})


_FAILURE_CODES = {429: "REQUEST_LIMIT_EXCEEDED", 500: "INTERNAL_ERROR", 502: "BAD_GATEWAY",
                  503: "TEMPORARILY_UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_SPARK_TYPE_NAMES = {"int": "INT", "integer": "INT", "bigint": "LONG", "long": "LONG", "smallint": "SHORT",
                     "short": "SHORT", "tinyint": "BYTE", "byte": "BYTE", "float": "FLOAT", "real": "FLOAT",
                     "double": "DOUBLE", "string": "STRING", "varchar": "STRING", "char": "CHAR",
                     "boolean": "BOOLEAN", "date": "DATE", "timestamp": "TIMESTAMP",
                     "timestamp_ntz": "TIMESTAMP_NTZ", "binary": "BINARY", "decimal": "DECIMAL",
                     "array": "ARRAY", "map": "MAP", "struct": "STRUCT", "variant": "VARIANT"}
_SQL_STRING = r"'((?:[^'\\]|\\.|'')*)'"  # backslash escapes, and '' for a quote
_NAME_PART = r"(?:`[^`]+`|[A-Za-z0-9_]+)"


def _sql_unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text.replace("''", "'"))


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Statement:
    statement_id: str
    text: str
    submitted: float
    wait_timeout: str
    state: str = "PENDING"
    error: dict[str, str] | None = None
    result: tuple[list[str], list[str]] | None = None  # columns and the one row of a statement that has one


@dataclass
class Vend:
    """One vend, without secrets."""
    table: str
    table_id: str
    operation: str
    access_key_id: str
    expiration_time: int  # epoch ms, as answered
    location: str
    principal: str


class FakeWorkspace(VolumesMixin):
    """State, knobs and the HTTP server of the fake workspace. Knobs are plain attributes (set them from the
    test thread; every request reads them once); counters and the log are kept under a lock."""

    DEFAULT_CREDENTIAL_LIFETIME = 3600
    DEFAULT_OAUTH_TOKEN_LIFETIME = 3600
    DEFAULT_STATEMENT_SECONDS = 0.5

    def __init__(self, s3: IamS3):
        self.s3 = s3
        self.pat = "dapi" + secrets.token_hex(16)
        self.client_id = str(uuid.uuid4())  # a service principal's application id
        self.client_secret = "dose" + secrets.token_hex(16)
        self.user = "pistream-tests@example.com"
        self.metastore_id = str(uuid.uuid4())
        self.warehouse_id = secrets.token_hex(8)
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0  # kept across down() and up()
        self._connections: set[socket.socket] = set()
        self.reset()

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        workspace = self

        class Handler(_Handler):
            fake = workspace

        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fake-databricks", daemon=True)
        self._thread.start()
        threading.Thread(target=self._run_unpolled, name="fake-databricks-warehouse", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=STOP_TIMEOUT)
            self._thread = None

    def down(self) -> None:
        """The workspace unreachable: its port refuses connections, and open (keep-alive) ones are cut."""
        self.stop()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def up(self) -> None:
        """Served again, on the same port (``host`` does not change)."""
        if self._server is None and self._port:
            self.start()

    def _track(self, connection: socket.socket, is_open: bool) -> None:
        with self._lock:
            if is_open:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def reset(self) -> None:
        """Knobs to defaults; catalog ``main`` with schema ``bronze`` and no table; counters, log, issued
        OAuth tokens and statements cleared (vended S3 credentials stay valid until they expire); served
        (up) again after a ``down()``."""
        with self._lock:
            self.credential_lifetime: float = self.DEFAULT_CREDENTIAL_LIFETIME
            self.oauth_token_lifetime: float = self.DEFAULT_OAUTH_TOKEN_LIFETIME
            self.statement_seconds: float = self.DEFAULT_STATEMENT_SECONDS
            self.warehouse_start_seconds: float = 0.0
            self._warehouse_up_at: float | None = None
            self.slow_answers: dict[str, float] = {}
            self.outage = False
            self.outage_retry_after: int | None = None
            self.external_data_access = True
            self.external_use_schema = True
            self._fail_next: list[tuple[int, str | None]] = []
            self._catalogs: dict[str, set[str]] = {"main": {"bronze"}}
            self._tables: dict[str, dict[str, Any]] = {}
            self._tokens: dict[str, tuple[str, float]] = {}
            self._statements: dict[str, Statement] = {}
            self._calls: Counter[str] = Counter()
            self._log: list[dict[str, Any]] = []
            self._vends: list[Vend] = []
            self.statements_run_unpolled = False  # True: statements go on without polls, as a real warehouse's
            self._reset_volumes()
        self.up()

    # -- what tests use ---------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        assert self._port, "the fake workspace was never started"
        return f"http://127.0.0.1:{self._port}"

    @property
    def s3_endpoint(self) -> str:
        return self.s3.endpoint

    @property
    def bucket(self) -> str:
        return self.s3.bucket

    @property
    def region(self) -> str:
        return self.s3.region

    @property
    def base_storage_options(self) -> dict[str, str]:
        """The non-secret S3 options a client needs besides the vended credentials."""
        return self.s3.base_storage_options

    @property
    def admin_storage_options(self) -> dict[str, str]:
        """Full access to the bucket, to check what a test wrote."""
        return self.s3.admin_storage_options

    def location(self, name: str) -> str:
        """A fresh ``s3://bucket/tables/<name>-<8 hex>`` no other table uses."""
        return f"s3://{self.bucket}/tables/{name}-{uuid.uuid4().hex[:8]}"

    def storage_options(self, answer: dict[str, Any]) -> dict[str, str]:
        """delta-rs options for a ``temporary-table-credentials`` answer (base options + credentials)."""
        aws = answer["aws_temp_credentials"]
        return {**self.base_storage_options, "AWS_ACCESS_KEY_ID": aws["access_key_id"],
                "AWS_SECRET_ACCESS_KEY": aws["secret_access_key"], "AWS_SESSION_TOKEN": aws["session_token"]}

    def add_catalog(self, catalog: str) -> None:
        with self._lock:
            self._catalogs.setdefault(catalog.lower(), set())

    def add_schema(self, full_name: str) -> None:
        catalog, schema = full_name.lower().split(".")
        with self._lock:
            self._catalogs.setdefault(catalog, set()).add(schema)

    def register_table(self, full_name: str, location: str | None = None, table_type: str = "EXTERNAL",
                       data_source_format: str | None = "DELTA", columns: list[dict[str, Any]] | None = None,
                       comment: str | None = None, properties: dict[str, str] | None = None) -> dict[str, Any]:
        """A table as if someone had created it (no privilege checks): EXTERNAL (``location`` defaults to
        a fresh one), MANAGED (UC-owned ``__unitystorage`` location) or VIEW (no location). The TableInfo."""
        table_type = table_type.upper()
        if table_type == "EXTERNAL" and location is None:
            location = self.location(full_name.rsplit(".", 1)[-1])
        if table_type == "MANAGED" and location is None:
            location = (f"s3://{self.bucket}/__unitystorage/catalogs/{uuid.uuid4()}/tables/{uuid.uuid4()}")
        if table_type == "VIEW":
            location, data_source_format = None, None
        catalog, schema, name = self._split(full_name)
        with self._lock:
            self._need_schema(catalog, schema)
            info = self._table_info(catalog, schema, name, table_type, data_source_format, location,
                                    columns or [], comment, properties or {}, self.user)
            self._tables[info["full_name"]] = info
            if table_type == "MANAGED":
                self._create_managed_storage(info["full_name"], columns or [])
            return dict(info)

    def table(self, full_name: str) -> dict[str, Any] | None:
        with self._lock:
            info = self._tables.get(full_name.lower())
            return None if info is None else json.loads(json.dumps(info))

    def drop_table(self, full_name: str) -> None:
        with self._lock:
            self._tables.pop(full_name.lower(), None)

    def stop_warehouse(self) -> None:
        """The SQL warehouse stops (auto-stop): the next statement starts it again, ``warehouse_start_seconds``."""
        with self._lock:
            self._warehouse_up_at = None

    def fail_next(self, count: int, status: int = 503, endpoint: str | None = None) -> None:
        """The next ``count`` calls (of ``endpoint``, or any) answer ``status`` (429/5xx) with the real
        error code, without doing anything."""
        with self._lock:
            self._fail_next.extend([(status, endpoint)] * count)

    @property
    def statements(self) -> list[dict[str, str]]:
        """Every statement submitted since the reset, in order: statement_id, state, wait_timeout."""
        with self._lock:
            return [{"statement_id": s.statement_id, "state": s.state, "wait_timeout": s.wait_timeout}
                    for s in self._statements.values()]

    @property
    def calls(self) -> Counter[str]:
        """Calls per endpoint: oidc_token, oidc_discovery, get_table, list_tables, create_table,
        delete_table, temporary_table_credentials, execute_statement, get_statement, cancel_statement,
        unknown. Every call counts, answered or refused."""
        with self._lock:
            return Counter(self._calls)

    @property
    def token_requests(self) -> int:
        return self.calls["oidc_token"]

    @property
    def credential_vends(self) -> int:
        """Credentials actually vended (refused requests do not count)."""
        with self._lock:
            return len(self._vends)

    @property
    def vends(self) -> list[Vend]:
        with self._lock:
            return list(self._vends)

    @property
    def request_log(self) -> list[dict[str, Any]]:
        """One entry per request: time, method, path, endpoint, status, error_code, auth (pat, oauth,
        client_credentials, missing, invalid, none), principal. Never a token, secret or body."""
        with self._lock:
            return [dict(entry) for entry in self._log]

    def databrickscfg(self, directory: str | os.PathLike[str], profile: str = "DEFAULT", auth: str = "pat",
                      **extra: str) -> Path:
        """Append a profile to ``<directory>/.databrickscfg`` (created if missing) and return the file's
        path: ``host`` and ``token`` (auth="pat") or ``client_id``/``client_secret`` (auth="oauth-m2m");
        ``extra`` keys are written as given (e.g. token="wrong"). Point DATABRICKS_CONFIG_FILE (or HOME) at it."""
        values = {"host": self.host, **self._credentials(auth), **extra}
        path = Path(directory) / ".databrickscfg"
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        if text and not text.endswith("\n"):
            text += "\n"
        text += f"[{profile}]\n" + "".join(f"{key} = {value}\n" for key, value in values.items()) + "\n"
        path.write_text(text, encoding="utf-8")
        return path

    def environ(self, auth: str = "pat") -> dict[str, str]:
        """``DATABRICKS_*`` variables for this workspace (auth: pat or oauth-m2m)."""
        return {f"DATABRICKS_{key.upper()}": value
                for key, value in {"host": self.host, **self._credentials(auth)}.items()}

    def _credentials(self, auth: str) -> dict[str, str]:
        if auth == "pat":
            return {"token": self.pat}
        if auth in ("oauth", "oauth-m2m"):
            return {"client_id": self.client_id, "client_secret": self.client_secret}
        raise ValueError(f"auth is pat or oauth-m2m, not {auth!r}")

    # -- request handling -------------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes
               ) -> tuple[int, dict[str, str], dict[str, Any]]:
        parts = urlsplit(raw_path)
        path, query = parts.path, parse_qs(parts.query)
        endpoint = _endpoint(method, path)
        entry: dict[str, Any] = {"time": time.time(), "method": method, "path": path, "endpoint": endpoint,
                                 "auth": "none", "principal": None, "user_agent": headers.get("user-agent")}
        with self._lock:
            self._calls[endpoint] += 1
        try:
            self._maybe_fail(path, endpoint)
            if path.startswith("/oidc/"):
                status, answer = self._oidc(method, path, headers, body, entry)
            elif path.startswith("/api/"):
                principal = self._authenticate(headers, entry)
                status, answer = self._api(method, path, query, body, principal, endpoint)
            else:
                raise _api_error(404, "ENDPOINT_NOT_FOUND", f"No API found for '{method} {path}'")
            reply_headers: dict[str, str] = {}
        except ApiError as exc:
            status, answer, reply_headers = exc.status, exc.body, exc.headers
        entry["status"] = status
        entry["error_code"] = answer.get("error_code") or answer.get("error") if status >= 400 else None
        with self._lock:
            self._log.append(entry)
        delay = self.slow_answers.get(endpoint)
        if delay:
            time.sleep(delay)
        return status, reply_headers, answer

    def _maybe_fail(self, path: str, endpoint: str) -> None:
        with self._lock:
            index = next((i for i, (_, only) in enumerate(self._fail_next) if only in (None, endpoint)), None)
            status = self._fail_next.pop(index)[0] if index is not None else None
        if status is None and self.outage:
            status = 503
        if status is None:
            return
        headers = {"Retry-After": str(self.outage_retry_after)} if self.outage_retry_after is not None else {}
        message = (f"The service at {path} is temporarily unavailable. Please try again later."
                   if status == 503 else f"The service at {path} answered {status}.")
        raise ApiError(status, {"error_code": _FAILURE_CODES.get(status, "INTERNAL_ERROR"), "message": message},
                       headers)

    def _authenticate(self, headers: dict[str, str], entry: dict[str, Any]) -> str:
        value = headers.get("authorization", "")
        scheme, _, token = value.partition(" ")
        if not value or scheme.lower() != "bearer" or not token.strip():
            entry["auth"] = "missing"
            raise _api_error(401, "UNAUTHENTICATED",
                             "Credential was not sent or was of an unsupported type for this API.")
        token = token.strip()
        if secrets.compare_digest(token, self.pat):
            entry.update(auth="pat", principal=self.user)
            return self.user
        with self._lock:
            issued = self._tokens.get(token)
        if issued is not None and issued[1] > time.time():
            entry.update(auth="oauth", principal=issued[0])
            return issued[0]
        entry["auth"] = "invalid"
        # What workspaces answer for an unknown, revoked or expired token (error_code is a number there).
        raise ApiError(403, {"error_code": 403, "message": "Invalid access token."})

    def _oidc(self, method: str, path: str, headers: dict[str, str], body: bytes, entry: dict[str, Any]
              ) -> tuple[int, dict[str, Any]]:
        if path == "/oidc/.well-known/oauth-authorization-server" and method == "GET":
            return 200, {"issuer": f"{self.host}/oidc", "authorization_endpoint": f"{self.host}/oidc/v1/authorize",
                         "token_endpoint": f"{self.host}/oidc/v1/token", "grant_types_supported": [
                             "client_credentials", "authorization_code", "refresh_token"],
                         "scopes_supported": ["all-apis", "offline_access"]}
        if path != "/oidc/v1/token" or method != "POST":
            raise _api_error(404, "ENDPOINT_NOT_FOUND", f"No API found for '{method} {path}'")
        form = {key: values[0] for key, values in parse_qs(body.decode("utf-8", "replace")).items()}
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        scheme, _, encoded = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                client_id, _, client_secret = base64.b64decode(encoded).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                client_id = client_secret = None
        entry["auth"] = "client_credentials"
        if form.get("grant_type") != "client_credentials":
            raise ApiError(400, {"error": "unsupported_grant_type",
                                 "error_description": f"Grant type {form.get('grant_type')!r} is not supported"})
        if not client_id or not client_secret or client_id != self.client_id or not secrets.compare_digest(
                client_secret, self.client_secret):
            entry["auth"] = "invalid"
            raise ApiError(401, {"error": "invalid_client", "error_description": "Client authentication failed"})
        scope = form.get("scope", "")
        if "all-apis" not in scope.split():
            raise ApiError(400, {"error": "invalid_scope",
                                 "error_description": f"The requested scope {scope!r} is invalid"})
        token = "eyJ" + secrets.token_urlsafe(48)
        lifetime = self.oauth_token_lifetime
        with self._lock:
            self._tokens[token] = (self.client_id, time.time() + lifetime)
        entry["principal"] = self.client_id
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": int(lifetime), "scope": scope}

    def _api(self, method: str, path: str, query: dict[str, list[str]], body: bytes, principal: str,
             endpoint: str) -> tuple[int, Any]:
        if volume_endpoint(method, path) is not None:
            return self._volumes_api(endpoint, method, path, query, body, principal)
        try:
            request = json.loads(body) if body.strip() else {}
        except ValueError:
            raise _api_error(400, "MALFORMED_REQUEST", "Request body is not valid JSON.") from None
        if not isinstance(request, dict):
            raise _api_error(400, "MALFORMED_REQUEST", "Request body must be a JSON object.")
        if endpoint == "get_table":
            return 200, self._get_table(unquote(path.rsplit("/", 1)[1]))
        if endpoint == "delete_table":
            full_name = unquote(path.rsplit("/", 1)[1])
            self._get_table(full_name)
            self.drop_table(full_name)
            return 200, {}
        if endpoint == "list_tables":
            return 200, self._list_tables(query)
        if endpoint == "create_table":
            return 200, self._create_table(request, principal)
        if endpoint == "temporary_table_credentials":
            return 200, self._vend(request, principal)
        if endpoint == "execute_statement":
            return 200, self._execute_statement(request, principal)
        if endpoint == "get_statement":
            return 200, self._statement_answer(path.rsplit("/", 1)[1], principal)
        if endpoint == "cancel_statement":
            statement = self._statement(path.rsplit("/", 2)[1])
            with self._lock:
                if statement.state in ("PENDING", "RUNNING"):
                    statement.state = "CANCELED"
            return 200, {}
        raise _api_error(404, "ENDPOINT_NOT_FOUND", f"No API found for '{method} {path.removeprefix('/api/2.1')}'")

    # -- Unity Catalog ----------------------------------------------------------------------------------

    @staticmethod
    def _split(full_name: str) -> tuple[str, str, str]:
        parts = [part.strip("`").lower() for part in re.findall(_NAME_PART, full_name)]
        if len(parts) != 3 or not all(parts):
            raise _uc_error(400, "INVALID_PARAMETER_VALUE",
                            f"Invalid table full name '{full_name}': expected catalog.schema.table.")
        return parts[0], parts[1], parts[2]

    def _need_schema(self, catalog: str, schema: str) -> None:
        if catalog not in self._catalogs:
            raise _uc_error(404, "CATALOG_DOES_NOT_EXIST", f"Catalog '{catalog}' does not exist.")
        if schema not in self._catalogs[catalog]:
            raise _uc_error(404, "SCHEMA_DOES_NOT_EXIST", f"Schema '{catalog}.{schema}' does not exist.")

    def _get_table(self, full_name: str) -> dict[str, Any]:
        catalog, schema, name = self._split(full_name)
        with self._lock:
            self._need_schema(catalog, schema)
            info = self._tables.get(f"{catalog}.{schema}.{name}")
            if info is None:
                raise _uc_error(404, "TABLE_DOES_NOT_EXIST", f"Table '{catalog}.{schema}.{name}' does not exist.")
            return json.loads(json.dumps(info))

    def _list_tables(self, query: dict[str, list[str]]) -> dict[str, Any]:
        catalog = (query.get("catalog_name") or [""])[0].lower()
        schema = (query.get("schema_name") or [""])[0].lower()
        if not catalog or not schema:
            raise _uc_error(400, "INVALID_PARAMETER_VALUE", "catalog_name and schema_name are required.")
        with self._lock:
            self._need_schema(catalog, schema)
            prefix = f"{catalog}.{schema}."
            return {"tables": [json.loads(json.dumps(info)) for key, info in sorted(self._tables.items())
                               if key.startswith(prefix)]}

    def _table_info(self, catalog: str, schema: str, name: str, table_type: str, data_source_format: str | None,
                    location: str | None, columns: list[dict[str, Any]], comment: str | None,
                    properties: dict[str, str], principal: str) -> dict[str, Any]:
        now = _now_ms()
        full_name = f"{catalog}.{schema}.{name}"
        info: dict[str, Any] = {
            "name": name, "catalog_name": catalog, "schema_name": schema, "full_name": full_name,
            "table_type": table_type, "columns": columns, "owner": principal, "created_at": now,
            "created_by": principal, "updated_at": now, "updated_by": principal, "table_id": str(uuid.uuid4()),
            "metastore_id": self.metastore_id, "properties": properties, "securable_type": "TABLE",
            "securable_kind": {"EXTERNAL": "TABLE_DELTA_EXTERNAL", "MANAGED": "TABLE_DELTA",
                               "VIEW": "TABLE_VIEW"}.get(table_type, "TABLE_" + table_type),
            "browse_only": False,
        }
        if data_source_format:
            info["data_source_format"] = data_source_format
        if location:
            info["storage_location"] = location
        if table_type == "EXTERNAL":
            info["storage_credential_name"] = "pistream-uc-storage"
        if table_type == "VIEW":
            info["view_definition"] = "SELECT 1 AS one"
        if comment is not None:
            info["comment"] = comment
        return info

    def _check_external_access(self, catalog: str, schema: str) -> None:
        """The two gates of credential vending and of creating external tables from outside."""
        if not self.external_data_access:
            raise _uc_error(403, "PERMISSION_DENIED",
                            f"External data access is not enabled on metastore '{self.metastore_id}'.",
                            metastoreId=self.metastore_id)
        if not self.external_use_schema:
            raise _uc_error(403, "PERMISSION_DENIED",
                            f"User does not have EXTERNAL USE SCHEMA on Schema '{catalog}.{schema}'.",
                            principalName=self.user, msg="EXTERNAL USE SCHEMA", resourceType="Schema",
                            resourceName=f"{catalog}.{schema}")

    def _check_location(self, location: str, full_name: str, api: str) -> None:
        match = re.match(r"^s3a?://([^/]+)/(.+)$", location)
        if not match or match.group(1) != self.bucket:
            raise _uc_error(400, "INVALID_PARAMETER_VALUE",
                            f"Input path url '{location}' is not covered by any external location "
                            f"(the fake has one: s3://{self.bucket}/).")
        path = location.rstrip("/") + "/"
        for other in self._tables.values():
            existing = (other.get("storage_location") or "").rstrip("/") + "/"
            if other["full_name"] != full_name and existing != "/" and (
                    path.startswith(existing) or existing.startswith(path)):
                raise _uc_error(400, "INVALID_PARAMETER_VALUE",
                                f"Input path url '{location}' overlaps with other external tables or volumes "
                                f"within '{api}' call. Conflicting tables/volumes: {other['full_name']}.")

    def _create_table(self, request: dict[str, Any], principal: str) -> dict[str, Any]:
        missing = [key for key in ("name", "catalog_name", "schema_name", "table_type") if not request.get(key)]
        if missing:
            raise _uc_error(400, "INVALID_PARAMETER_VALUE", f"Missing required field: {missing[0]}.")
        catalog, schema, name = (str(request[key]).lower() for key in ("catalog_name", "schema_name", "name"))
        table_type = str(request["table_type"]).upper()
        fmt = str(request.get("data_source_format") or "").upper()
        if table_type != "EXTERNAL":
            raise _uc_error(400, "INVALID_PARAMETER_VALUE",
                            f"Only EXTERNAL tables can be created with this API, not {table_type}.")
        if fmt != "DELTA":
            raise _uc_error(400, "INVALID_PARAMETER_VALUE",
                            f"Only DELTA external tables can be created with this API, not {fmt or 'none'}.")
        location = request.get("storage_location")
        if not location:
            raise _uc_error(400, "INVALID_PARAMETER_VALUE", "storage_location is required for an EXTERNAL table.")
        with self._lock:
            self._need_schema(catalog, schema)
            full_name = f"{catalog}.{schema}.{name}"
            if full_name in self._tables:
                raise _uc_error(409, "TABLE_ALREADY_EXISTS", f"Table '{full_name}' already exists.")
            self._check_external_access(catalog, schema)
            self._check_location(str(location), full_name, "CreateTable")
            info = self._table_info(catalog, schema, name, table_type, fmt, str(location),
                                    list(request.get("columns") or []), request.get("comment"),
                                    dict(request.get("properties") or {}), principal)
            self._tables[full_name] = info
            return json.loads(json.dumps(info))

    def _vend(self, request: dict[str, Any], principal: str) -> dict[str, Any]:
        table_id = request.get("table_id")
        operation = str(request.get("operation") or "")
        if not table_id:
            raise _uc_error(400, "INVALID_PARAMETER_VALUE", "Missing required field: table_id.")
        if operation not in ("READ", "READ_WRITE"):
            raise _uc_error(400, "INVALID_PARAMETER_VALUE",
                            f"Invalid operation '{operation}': expected one of READ, READ_WRITE.")
        with self._lock:
            info = next((t for t in self._tables.values() if t["table_id"] == table_id), None)
            if info is None:
                raise _uc_error(404, "TABLE_DOES_NOT_EXIST", f"Table '{table_id}' does not exist.")
            self._check_external_access(info["catalog_name"], info["schema_name"])
            lifetime = max(1, math.ceil(self.credential_lifetime))
        if info["table_type"] == "VIEW" or not info.get("storage_location"):
            raise _uc_error(400, "INVALID_PARAMETER_VALUE",
                            f"Table '{info['full_name']}' is a {info['table_type']}: it has no storage location "
                            "to vend credentials for.")
        if info["table_type"] == "MANAGED" and operation == "READ_WRITE":
            raise _uc_error(403, "PERMISSION_DENIED",
                            f"READ_WRITE credentials cannot be vended for managed table '{info['full_name']}': "
                            "external engines may only read managed tables.")
        location = info["storage_location"]
        prefix = urlsplit(location).path.strip("/")
        creds = self.s3.vend(prefix, operation, lifetime, f"uc-{principal.split('@')[0][:20]}-{secrets.token_hex(4)}")
        expiration_ms = int(creds.expiration.timestamp() * 1000)
        with self._lock:
            self._vends.append(Vend(info["full_name"], table_id, operation, creds.access_key_id, expiration_ms,
                                    location, principal))
        return {"aws_temp_credentials": {"access_key_id": creds.access_key_id,
                                         "secret_access_key": creds.secret_access_key,
                                         "session_token": creds.session_token},
                "expiration_time": expiration_ms, "url": location}

    # -- SQL statements ---------------------------------------------------------------------------------

    def _execute_statement(self, request: dict[str, Any], principal: str) -> dict[str, Any]:
        for key in ("warehouse_id", "statement"):
            if not request.get(key):
                raise _api_error(400, "INVALID_PARAMETER_VALUE", f"Missing required field: {key}.")
        if request["warehouse_id"] != self.warehouse_id:
            raise _api_error(404, "RESOURCE_DOES_NOT_EXIST",
                             f"SQL warehouse {request['warehouse_id']} does not exist.")
        wait = str(request.get("wait_timeout") or "10s")
        match = re.fullmatch(r"(\d+)s", wait)
        if not match or not (int(match.group(1)) == 0 or 5 <= int(match.group(1)) <= 50):
            raise _api_error(400, "INVALID_PARAMETER_VALUE",
                             f"wait_timeout must be 0s or between 5s and 50s, not {wait!r}.")
        on_timeout = str(request.get("on_wait_timeout") or "CONTINUE").upper()
        statement = Statement(str(uuid.uuid4()), str(request["statement"]), time.monotonic(), wait)
        with self._lock:
            if self._warehouse_up_at is None:  # a stopped warehouse starts with its first statement
                self._warehouse_up_at = statement.submitted + self.warehouse_start_seconds
            self._statements[statement.statement_id] = statement
        seconds = int(match.group(1))
        if seconds:
            deadline = time.monotonic() + seconds
            while self._advance(statement, principal) in ("PENDING", "RUNNING") and time.monotonic() < deadline:
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            if statement.state in ("PENDING", "RUNNING") and on_timeout == "CANCEL":
                statement.state = "CANCELED"
        return self._render(statement)

    def _statement(self, statement_id: str) -> Statement:
        with self._lock:
            statement = self._statements.get(statement_id)
        if statement is None:
            raise _api_error(404, "RESOURCE_DOES_NOT_EXIST", f"Statement {statement_id} does not exist.")
        return statement

    def _statement_answer(self, statement_id: str, principal: str) -> dict[str, Any]:
        statement = self._statement(statement_id)
        self._advance(statement, principal)
        return self._render(statement)

    def _advance(self, statement: Statement, principal: str) -> str:
        """PENDING until polled and the warehouse is up, RUNNING until ``statement_seconds`` after
        submission (or after the warehouse came up), then run."""
        with self._lock:
            now, up_at = time.monotonic(), self._warehouse_up_at or 0.0
            if statement.state == "PENDING" and now >= up_at:
                statement.state = "RUNNING"
            elif statement.state == "RUNNING" and now - max(statement.submitted, up_at) >= self.statement_seconds:
                try:
                    statement.result = self._run_sql(statement.text, principal)
                    statement.state = "SUCCEEDED"
                except _SqlError as exc:
                    statement.state = "FAILED"
                    statement.error = {"error_code": exc.code, "message": str(exc)}
            return statement.state

    @staticmethod
    def _render(statement: Statement) -> dict[str, Any]:
        status: dict[str, Any] = {"state": statement.state}
        if statement.error:
            status["error"] = dict(statement.error)
        answer: dict[str, Any] = {"statement_id": statement.statement_id, "status": status}
        if statement.state == "SUCCEEDED" and statement.result is not None:
            columns, row = statement.result
            answer["manifest"] = {"format": "JSON_ARRAY", "schema": {"column_count": len(columns), "columns": [
                {"name": name, "type_name": "LONG", "type_text": "BIGINT", "position": i}
                for i, name in enumerate(columns)]}, "total_chunk_count": 1, "total_row_count": 1, "truncated": False}
            answer["result"] = {"chunk_index": 0, "row_offset": 0, "row_count": 1, "data_array": [row]}
        elif statement.state == "SUCCEEDED":
            answer["manifest"] = {"format": "JSON_ARRAY", "schema": {"column_count": 0, "columns": []},
                                  "total_chunk_count": 0, "total_row_count": 0, "truncated": False}
            answer["result"] = {"chunk_index": 0, "row_offset": 0, "row_count": 0}
        return answer

    def _run_unpolled(self) -> None:
        """With ``statements_run_unpolled``: every statement goes on as if polled (until the server stops)."""
        while self._server is not None:
            if self.statements_run_unpolled:
                with self._lock:
                    waiting = [s for s in self._statements.values() if s.state in ("PENDING", "RUNNING")]
                for statement in waiting:
                    self._advance(statement, "unpolled")
            time.sleep(0.1)

    def _run_sql(self, text: str, principal: str) -> tuple[list[str], list[str]] | None:
        copied = self._copy_into(text)
        if copied is not None:
            return copied
        create = _parse_create_table(text)
        catalog, schema, name = create["name"]
        full_name = f"{catalog}.{schema}.{name}"
        quoted = f"`{catalog}`.`{schema}`.`{name}`"
        if catalog not in self._catalogs:
            raise _SqlError(f"[NO_SUCH_CATALOG_EXCEPTION] Catalog '{catalog}' was not found. SQLSTATE: 42704")
        if schema not in self._catalogs[catalog]:
            raise _SqlError(f"[SCHEMA_NOT_FOUND] The schema `{catalog}`.`{schema}` cannot be found. Verify the "
                            "spelling and correctness of the schema and catalog. SQLSTATE: 42704")
        if full_name in self._tables:
            if create["if_not_exists"]:
                return None
            raise _SqlError(f"[TABLE_OR_VIEW_ALREADY_EXISTS] Cannot create table or view {quoted} because it "
                            "already exists. SQLSTATE: 42P07")
        location = create["location"]
        table_type = "EXTERNAL" if location else "MANAGED"
        if location:
            try:
                self._check_location(location, full_name, "CreateTable")
            except ApiError as exc:
                raise _SqlError(f"[INVALID_PARAMETER_VALUE] {exc}") from None
        else:
            location = f"s3://{self.bucket}/__unitystorage/catalogs/{uuid.uuid4()}/tables/{uuid.uuid4()}"
        self._tables[full_name] = self._table_info(
            catalog, schema, name, table_type, create["format"], location, create["columns"], create["comment"],
            create["properties"], principal)
        if table_type == "MANAGED":
            self._create_managed_storage(full_name, create["columns"])
        return None


class _SqlError(Exception):
    def __init__(self, message: str, code: str = "BAD_REQUEST"):
        super().__init__(message)
        self.code = code


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses, angle brackets and quotes."""
    parts, depth, current, quote = [], 0, [], ""
    for char in text:
        if quote:
            current.append(char)
            if char == quote:
                quote = ""
            continue
        if char in "'`\"":
            quote = char
        elif char in "(<":
            depth += 1
        elif char in ")>":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    if "".join(current).strip():
        parts.append("".join(current).strip())
    return parts


def _parse_create_table(text: str) -> dict[str, Any]:
    """The parts of ``CREATE TABLE`` the fake acts on, parsed loosely; anything else is a syntax error."""
    sql = text.strip().rstrip(";").strip()
    head = re.match(rf"(?is)^CREATE\s+(?:EXTERNAL\s+)?TABLE\s+(IF\s+NOT\s+EXISTS\s+)?"
                    rf"({_NAME_PART})\.({_NAME_PART})\.({_NAME_PART})\s*", sql)
    if not head:
        word = sql.split(None, 1)[0] if sql else "<EOF>"
        raise _SqlError(f"[PARSE_SYNTAX_ERROR] Syntax error at or near '{word}'. SQLSTATE: 42601 "
                        "(the fake workspace runs CREATE TABLE catalog.schema.table only)")
    rest = sql[head.end():]
    columns: list[dict[str, Any]] = []
    if rest.startswith("("):
        depth, end = 0, -1
        for index, char in enumerate(rest):
            depth += char == "("
            depth -= char == ")"
            if depth == 0:
                end = index
                break
        if end < 0:
            raise _SqlError("[PARSE_SYNTAX_ERROR] Syntax error at or near end of input. SQLSTATE: 42601")
        for position, definition in enumerate(_split_top_level(rest[1:end])):
            column = re.match(rf"(?is)^({_NAME_PART})\s+(.+?)(\s+NOT\s+NULL)?(?:\s+COMMENT\s+{_SQL_STRING})?$",
                              definition.strip())
            if not column:
                raise _SqlError(f"[PARSE_SYNTAX_ERROR] Syntax error at or near '{definition}'. SQLSTATE: 42601")
            name = column.group(1).strip("`")
            type_text = re.sub(r"\s+", "", column.group(2)).lower()
            nullable = not column.group(3)
            info: dict[str, Any] = {
                "name": name, "type_text": type_text,
                "type_name": _SPARK_TYPE_NAMES.get(re.split(r"[(<]", type_text)[0], type_text.upper()),
                "type_json": json.dumps({"name": name, "type": type_text, "nullable": nullable, "metadata": {}}),
                "position": position, "nullable": nullable}
            if column.group(4) is not None:
                info["comment"] = _sql_unescape(column.group(4))
            columns.append(info)
        rest = rest[end + 1:]
    using = re.search(r"(?i)\bUSING\s+(\w+)", rest)
    partitioned = re.search(r"(?is)\bPARTITIONED\s+BY\s*\(([^)]*)\)", rest)
    location = re.search(rf"(?is)\bLOCATION\s+{_SQL_STRING}", rest)
    comment = re.search(rf"(?is)\bCOMMENT\s+{_SQL_STRING}", rest)
    properties: dict[str, str] = {}
    tblproperties = re.search(r"(?is)\bTBLPROPERTIES\s*\((.*)\)", rest)
    if tblproperties:
        for key, value in re.findall(rf"{_SQL_STRING}\s*=\s*{_SQL_STRING}", tblproperties.group(1)):
            properties[_sql_unescape(key)] = _sql_unescape(value)
    if partitioned:
        names = [part.strip().strip("`").lower() for part in partitioned.group(1).split(",") if part.strip()]
        for index, name in enumerate(names):
            match = next((c for c in columns if c["name"].lower() == name), None)
            if match is None:
                raise _SqlError(f"[COLUMN_NOT_DEFINED_IN_TABLE] partition column `{name}` is not defined in "
                                "table. SQLSTATE: 42703")
            match["partition_index"] = index
    return {"name": tuple(part.strip("`").lower() for part in head.group(2, 3, 4)),
            "if_not_exists": bool(head.group(1)), "columns": columns,
            "format": (using.group(1).upper() if using else "DELTA"),
            "location": _sql_unescape(location.group(1)) if location else None,
            "comment": _sql_unescape(comment.group(1)) if comment else None, "properties": properties}


def _endpoint(method: str, path: str) -> str:
    volumes = volume_endpoint(method, path)
    if volumes is not None:
        return volumes
    if path == "/oidc/v1/token":
        return "oidc_token"
    if path.startswith("/oidc/.well-known/"):
        return "oidc_discovery"
    if path == "/api/2.1/unity-catalog/tables":
        return {"GET": "list_tables", "POST": "create_table"}.get(method, "unknown")
    if path.startswith("/api/2.1/unity-catalog/tables/") and path.count("/") == 5:
        return {"GET": "get_table", "DELETE": "delete_table"}.get(method, "unknown")
    if path == "/api/2.1/unity-catalog/temporary-table-credentials" and method == "POST":
        return "temporary_table_credentials"
    if path == "/api/2.0/sql/statements" and method == "POST":
        return "execute_statement"
    if re.fullmatch(r"/api/2\.0/sql/statements/[^/]+", path) and method == "GET":
        return "get_statement"
    if re.fullmatch(r"/api/2\.0/sql/statements/[^/]+/cancel", path) and method == "POST":
        return "cancel_statement"
    return "unknown"


class _Handler(BaseHTTPRequestHandler):
    fake: FakeWorkspace
    protocol_version = "HTTP/1.1"
    server_version = "databricks-fake"

    def setup(self) -> None:
        super().setup()
        self.fake._track(self.connection, True)

    def finish(self) -> None:
        self.fake._track(self.connection, False)
        try:
            super().finish()
        except OSError:  # the client went away (its read timeout) or down() cut the connection
            pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {key.lower(): value for key, value in self.headers.items()}
        try:
            status, extra, answer = self.fake.handle(self.command, self.path, headers, body)
        except Exception as exc:  # a bug in the fake: say so, as a 500 the client can see
            status, extra, answer = 500, {}, {"error_code": "INTERNAL_ERROR", "message": f"fake: {exc!r}"}
        binary = isinstance(answer, bytes)
        data = answer if binary else json.dumps(answer).encode()
        self.send_response(status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else None)
        self.send_header("Content-Type", "application/octet-stream" if binary else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in extra.items():
            self.send_header(key, value)
        try:
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client went away (its read timeout) or down() cut the connection
            self.close_connection = True

    do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = do_HEAD = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # the fake keeps its own log, without secrets


# == fixtures ===============================================================================================

_DEPENDENCIES = ("moto", "flask", "werkzeug", "boto3", "botocore")


@pytest.fixture(scope="session")
def uc_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IamS3]:
    import importlib.util

    missing = [m for m in _DEPENDENCIES if importlib.util.find_spec(m) is None]
    if missing:
        _unavailable(f"the fake Databricks workspace needs moto[server] and boto3 ({', '.join(missing)} "
                     "missing): pip install 'moto[server]' boto3 (or pip install -e '.[test]')")
    server = start_iam_s3(tmp_path_factory.mktemp("moto_iam"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def uc_workspace_server(uc_s3: IamS3) -> Iterator[FakeWorkspace]:
    workspace = FakeWorkspace(uc_s3)
    workspace.start()
    try:
        yield workspace
    finally:
        workspace.stop()
        workspace.cleanup_volumes()


@pytest.fixture
def uc_workspace(uc_workspace_server: FakeWorkspace, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeWorkspace]:
    """The fake workspace, reset, with no AWS_* or DATABRICKS_* variable in the environment."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "DATABRICKS_")):
            monkeypatch.delenv(name)
    uc_workspace_server.reset()
    yield uc_workspace_server
    uc_workspace_server.reset()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-moto":
        _serve_moto(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} --serve-moto PORT_FILE")
