"""The fake Databricks workspace (tests/databricks_fake.py) against its real counterparts' behaviour: REST
shapes and errors, and vended S3 credentials that the S3 server really enforces (prefix scope, expiry), seen
by boto3 and by delta-rs itself."""

from __future__ import annotations

import base64
import configparser
import json
import os
import time

import botocore.exceptions
import httpx
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import DeltaError

TABLE = "main.bronze.events"


def api(workspace, method: str, path: str, token: str | None = "pat", **kwargs) -> httpx.Response:
    headers = kwargs.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"Bearer {workspace.pat if token == 'pat' else token}"
    with httpx.Client(base_url=workspace.host, timeout=30, trust_env=False) as client:
        return client.request(method, path, headers=headers, **kwargs)


def vend(workspace, table_id: str, operation: str = "READ_WRITE") -> dict:
    response = api(workspace, "POST", "/api/2.1/unity-catalog/temporary-table-credentials",
                   json={"table_id": table_id, "operation": operation})
    assert response.status_code == 200, response.text
    return response.json()


def s3_client(workspace, answer: dict):
    aws = answer["aws_temp_credentials"]
    return workspace.s3.client("s3", aws["access_key_id"], aws["secret_access_key"], aws["session_token"])


def error_code(exc: botocore.exceptions.ClientError) -> str:
    return exc.response["Error"]["Code"]


def wait_past(expiration_ms: int, margin: float = 0.3) -> None:
    time.sleep(max(0.0, expiration_ms / 1000 - time.time() + margin))


def small_table(first: int = 0, n: int = 3) -> pa.Table:
    return pa.table({"id": pa.array(range(first, first + n), pa.int64()),
                     "name": pa.array([f"row{i}" for i in range(first, first + n)])})


# -- authentication -------------------------------------------------------------------------------------

def test_oauth_m2m_token_by_basic_auth_and_form_fields(uc_workspace):
    basic = base64.b64encode(f"{uc_workspace.client_id}:{uc_workspace.client_secret}".encode()).decode()
    with httpx.Client(base_url=uc_workspace.host, trust_env=False) as client:
        by_basic = client.post("/oidc/v1/token", data={"grant_type": "client_credentials", "scope": "all-apis"},
                               headers={"Authorization": f"Basic {basic}"})
        by_form = client.post("/oidc/v1/token", data={
            "grant_type": "client_credentials", "scope": "all-apis", "client_id": uc_workspace.client_id,
            "client_secret": uc_workspace.client_secret})
        wrong = client.post("/oidc/v1/token", data={"grant_type": "client_credentials", "scope": "all-apis"},
                            auth=(uc_workspace.client_id, "not-the-secret"))
    for response in (by_basic, by_form):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["token_type"] == "Bearer" and answer["scope"] == "all-apis" and answer["expires_in"] == 3600
        uc_workspace.register_table(TABLE)
        assert api(uc_workspace, "GET", f"/api/2.1/unity-catalog/tables/{TABLE}",
                   token=answer["access_token"]).status_code == 200
        uc_workspace.drop_table(TABLE)
    assert wrong.status_code == 401
    assert wrong.json() == {"error": "invalid_client", "error_description": "Client authentication failed"}
    assert uc_workspace.token_requests == 3
    assert [e["auth"] for e in uc_workspace.request_log if e["endpoint"] == "get_table"] == ["oauth", "oauth"]


def test_oauth_token_expires(uc_workspace):
    uc_workspace.oauth_token_lifetime = 1
    answer = httpx.post(f"{uc_workspace.host}/oidc/v1/token", auth=(uc_workspace.client_id, uc_workspace.client_secret),
                        data={"grant_type": "client_credentials", "scope": "all-apis"}, trust_env=False).json()
    assert answer["expires_in"] == 1
    path = f"/api/2.1/unity-catalog/tables/{TABLE}"
    assert api(uc_workspace, "GET", path, token=answer["access_token"]).status_code == 404  # authenticated
    time.sleep(1.2)
    assert api(uc_workspace, "GET", path, token=answer["access_token"]).status_code == 403


def test_api_calls_need_a_valid_bearer_token(uc_workspace):
    path = f"/api/2.1/unity-catalog/tables/{TABLE}"
    missing = api(uc_workspace, "GET", path, token=None)
    assert missing.status_code == 401 and missing.json()["error_code"] == "UNAUTHENTICATED"
    invalid = api(uc_workspace, "GET", path, token="dapi0000")
    assert invalid.status_code == 403
    assert invalid.json() == {"error_code": 403, "message": "Invalid access token."}
    basic = api(uc_workspace, "GET", path, token=None, headers={"Authorization": "Basic eDp5"})
    assert basic.status_code == 401


def test_outage_and_transient_failures(uc_workspace):
    uc_workspace.register_table(TABLE)
    path = f"/api/2.1/unity-catalog/tables/{TABLE}"
    uc_workspace.outage = True
    uc_workspace.outage_retry_after = 2
    for response in (api(uc_workspace, "GET", path),
                     httpx.post(f"{uc_workspace.host}/oidc/v1/token", trust_env=False,
                                data={"grant_type": "client_credentials", "scope": "all-apis"})):
        assert response.status_code == 503
        assert response.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
        assert response.headers["Retry-After"] == "2"
    uc_workspace.outage = False
    uc_workspace.fail_next(2, status=429)
    assert [api(uc_workspace, "GET", path).status_code for _ in range(3)] == [429, 429, 200]
    assert uc_workspace.calls["get_table"] == 4


# -- Unity Catalog tables ---------------------------------------------------------------------------------

def test_get_table_and_its_errors(uc_workspace):
    location = uc_workspace.location("events")
    registered = uc_workspace.register_table("Main.Bronze.Events", location)
    info = api(uc_workspace, "GET", "/api/2.1/unity-catalog/tables/main.bronze.events").json()
    assert info == registered
    assert info["full_name"] == TABLE and info["table_type"] == "EXTERNAL"
    assert info["data_source_format"] == "DELTA" and info["storage_location"] == location
    assert len(info["table_id"]) == 36 and info["owner"] and info["created_at"] > 0
    cases = {
        "nope.bronze.t": (404, "CATALOG_DOES_NOT_EXIST", "Catalog 'nope' does not exist."),
        "main.nope.t": (404, "SCHEMA_DOES_NOT_EXIST", "Schema 'main.nope' does not exist."),
        "main.bronze.t": (404, "TABLE_DOES_NOT_EXIST", "Table 'main.bronze.t' does not exist."),
    }
    for name, (status, code, message) in cases.items():
        response = api(uc_workspace, "GET", f"/api/2.1/unity-catalog/tables/{name}")
        assert (response.status_code, response.json()["error_code"], response.json()["message"]) == (
            status, code, message)
    listed = api(uc_workspace, "GET", "/api/2.1/unity-catalog/tables",
                 params={"catalog_name": "main", "schema_name": "bronze"}).json()
    assert [t["full_name"] for t in listed["tables"]] == [TABLE]


def test_managed_tables_and_views_are_described_as_such(uc_workspace):
    managed = uc_workspace.register_table("main.bronze.managed", table_type="MANAGED")
    view = uc_workspace.register_table("main.bronze.v", table_type="VIEW")
    assert managed["table_type"] == "MANAGED" and "__unitystorage" in managed["storage_location"]
    assert view["table_type"] == "VIEW" and "storage_location" not in view
    write = api(uc_workspace, "POST", "/api/2.1/unity-catalog/temporary-table-credentials",
                json={"table_id": managed["table_id"], "operation": "READ_WRITE"})
    assert write.status_code == 403 and write.json()["error_code"] == "PERMISSION_DENIED"
    assert vend(uc_workspace, managed["table_id"], "READ")["url"] == managed["storage_location"]
    on_view = api(uc_workspace, "POST", "/api/2.1/unity-catalog/temporary-table-credentials",
                  json={"table_id": view["table_id"], "operation": "READ"})
    assert on_view.status_code == 400


def test_create_external_table_through_the_api(uc_workspace):
    location = uc_workspace.location("created")
    columns = [{"name": "id", "type_name": "LONG", "type_text": "bigint", "position": 0, "nullable": False,
                "type_json": json.dumps({"name": "id", "type": "long", "nullable": False, "metadata": {}})},
               {"name": "day", "type_name": "DATE", "type_text": "date", "position": 1, "nullable": True,
                "partition_index": 0, "type_json": "{}"}]
    body = {"name": "created", "catalog_name": "main", "schema_name": "bronze", "table_type": "EXTERNAL",
            "data_source_format": "DELTA", "storage_location": location, "columns": columns,
            "comment": "made by a test", "properties": {"delta.appendOnly": "true"}}
    response = api(uc_workspace, "POST", "/api/2.1/unity-catalog/tables", json=body)
    assert response.status_code == 200, response.text
    info = response.json()
    assert info["full_name"] == "main.bronze.created" and info["columns"] == columns
    assert info["comment"] == "made by a test" and info["properties"] == {"delta.appendOnly": "true"}
    assert uc_workspace.table("main.bronze.created") == info

    again = api(uc_workspace, "POST", "/api/2.1/unity-catalog/tables", json=body)
    assert again.status_code == 409 and again.json()["error_code"] == "TABLE_ALREADY_EXISTS"
    managed = api(uc_workspace, "POST", "/api/2.1/unity-catalog/tables",
                  json={**body, "name": "m", "table_type": "MANAGED"})
    assert managed.status_code == 400 and managed.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    inside = api(uc_workspace, "POST", "/api/2.1/unity-catalog/tables",
                 json={**body, "name": "inner", "storage_location": location + "/inner"})
    assert inside.status_code == 400 and "overlaps with other external tables" in inside.json()["message"]
    no_schema = api(uc_workspace, "POST", "/api/2.1/unity-catalog/tables", json={**body, "schema_name": "silver"})
    assert no_schema.status_code == 404 and no_schema.json()["error_code"] == "SCHEMA_DOES_NOT_EXIST"
    uc_workspace.external_use_schema = False
    denied = api(uc_workspace, "POST", "/api/2.1/unity-catalog/tables",
                 json={**body, "name": "other", "storage_location": uc_workspace.location("other")})
    assert denied.status_code == 403
    assert denied.json()["message"] == "User does not have EXTERNAL USE SCHEMA on Schema 'main.bronze'."


# -- SQL statements ---------------------------------------------------------------------------------------

CREATE_SQL = """CREATE TABLE IF NOT EXISTS `main`.`bronze`.`from_sql` (
  `tag` STRING NOT NULL,
  `timestamp` TIMESTAMP NOT NULL,
  `value` DOUBLE,
  `state_code` INT,
  `price` DECIMAL(10, 2) COMMENT 'it''s money',
  `partition_date` DATE NOT NULL
) USING DELTA PARTITIONED BY (`partition_date`) LOCATION '{location}' COMMENT 'PI events: it\\'s bronze'
TBLPROPERTIES ('delta.appendOnly' = 'false', 'pistream.version' = '1')"""


def poll(workspace, statement_id: str) -> dict:
    return api(workspace, "GET", f"/api/2.0/sql/statements/{statement_id}").json()


def test_sql_create_table_pending_running_succeeded(uc_workspace):
    location = uc_workspace.location("from_sql")
    uc_workspace.statement_seconds = 0.3
    response = api(uc_workspace, "POST", "/api/2.0/sql/statements", json={
        "warehouse_id": uc_workspace.warehouse_id, "statement": CREATE_SQL.format(location=location),
        "wait_timeout": "0s"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["status"] == {"state": "PENDING"}
    assert poll(uc_workspace, answer["statement_id"])["status"]["state"] == "RUNNING"
    assert uc_workspace.table("main.bronze.from_sql") is None
    time.sleep(0.4)
    done = poll(uc_workspace, answer["statement_id"])
    assert done["status"] == {"state": "SUCCEEDED"}
    info = uc_workspace.table("main.bronze.from_sql")
    assert info["table_type"] == "EXTERNAL" and info["data_source_format"] == "DELTA"
    assert info["storage_location"] == location and info["comment"] == "PI events: it's bronze"
    assert info["properties"] == {"delta.appendOnly": "false", "pistream.version": "1"}
    columns = {c["name"]: c for c in info["columns"]}
    assert list(columns) == ["tag", "timestamp", "value", "state_code", "price", "partition_date"]
    assert columns["tag"]["type_name"] == "STRING" and columns["tag"]["nullable"] is False
    assert columns["price"]["type_text"] == "decimal(10,2)" and columns["price"]["type_name"] == "DECIMAL"
    assert columns["price"]["comment"] == "it's money"
    assert columns["partition_date"]["partition_index"] == 0 and "partition_index" not in columns["tag"]
    assert [c["position"] for c in info["columns"]] == list(range(6))

    # IF NOT EXISTS on an existing table succeeds; a waiting call returns the final state.
    again = api(uc_workspace, "POST", "/api/2.0/sql/statements", json={
        "warehouse_id": uc_workspace.warehouse_id, "statement": CREATE_SQL.format(location=location),
        "wait_timeout": "5s"}).json()
    assert again["status"]["state"] == "SUCCEEDED"


def test_sql_failures(uc_workspace):
    uc_workspace.statement_seconds = 0
    def run(statement: str, warehouse: str | None = None) -> httpx.Response:
        return api(uc_workspace, "POST", "/api/2.0/sql/statements", json={
            "warehouse_id": warehouse or uc_workspace.warehouse_id, "statement": statement, "wait_timeout": "5s"})

    unknown = run("SELECT 1", warehouse="0123456789abcdef")
    assert unknown.status_code == 404 and unknown.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    syntax = run("SELECT 1").json()
    assert syntax["status"]["state"] == "FAILED"
    assert syntax["status"]["error"]["message"].startswith("[PARSE_SYNTAX_ERROR]")
    no_schema = run("CREATE TABLE main.silver.t (a INT) LOCATION 's3://pistream-uc/x'").json()
    assert no_schema["status"]["state"] == "FAILED" and "[SCHEMA_NOT_FOUND]" in no_schema["status"]["error"]["message"]
    uc_workspace.register_table("main.bronze.t")
    exists = run("CREATE TABLE main.bronze.t (a INT) LOCATION 's3://pistream-uc/y'").json()
    assert "[TABLE_OR_VIEW_ALREADY_EXISTS]" in exists["status"]["error"]["message"]
    bad_wait = api(uc_workspace, "POST", "/api/2.0/sql/statements", json={
        "warehouse_id": uc_workspace.warehouse_id, "statement": "SELECT 1", "wait_timeout": "2s"})
    assert bad_wait.status_code == 400
    managed = run("CREATE TABLE main.bronze.m (a INT)").json()
    assert managed["status"]["state"] == "SUCCEEDED"
    assert uc_workspace.table("main.bronze.m")["table_type"] == "MANAGED"


# -- credential vending -----------------------------------------------------------------------------------

def test_vending_refusals(uc_workspace):
    info = uc_workspace.register_table(TABLE)
    path = "/api/2.1/unity-catalog/temporary-table-credentials"
    body = {"table_id": info["table_id"], "operation": "READ_WRITE"}
    uc_workspace.external_use_schema = False
    refused = api(uc_workspace, "POST", path, json=body)
    assert refused.status_code == 403 and refused.json()["error_code"] == "PERMISSION_DENIED"
    assert refused.json()["message"] == "User does not have EXTERNAL USE SCHEMA on Schema 'main.bronze'."
    uc_workspace.external_use_schema = True
    uc_workspace.external_data_access = False
    refused = api(uc_workspace, "POST", path, json=body)
    assert refused.status_code == 403 and refused.json()["error_code"] == "PERMISSION_DENIED"
    assert "External data access is not enabled" in refused.json()["message"]
    uc_workspace.external_data_access = True
    assert api(uc_workspace, "POST", path, json={"table_id": "nope", "operation": "READ"}).status_code == 404
    assert api(uc_workspace, "POST", path, json={**body, "operation": "WRITE"}).status_code == 400
    assert uc_workspace.credential_vends == 0
    assert uc_workspace.calls["temporary_table_credentials"] == 4


def test_vended_credentials_work_only_under_the_table_prefix(uc_workspace):
    info = uc_workspace.register_table(TABLE)
    answer = vend(uc_workspace, info["table_id"])
    assert answer["url"] == info["storage_location"]
    assert answer["aws_temp_credentials"]["access_key_id"].startswith("ASIA")
    assert answer["expiration_time"] / 1000 - time.time() == pytest.approx(3600, abs=5)
    prefix = info["storage_location"].removeprefix(f"s3://{uc_workspace.bucket}/")
    other = uc_workspace.location("other").removeprefix(f"s3://{uc_workspace.bucket}/")
    s3 = s3_client(uc_workspace, answer)
    bucket = uc_workspace.bucket

    s3.put_object(Bucket=bucket, Key=f"{prefix}/a/file", Body=b"hello")
    assert s3.get_object(Bucket=bucket, Key=f"{prefix}/a/file")["Body"].read() == b"hello"
    assert s3.head_object(Bucket=bucket, Key=f"{prefix}/a/file")["ContentLength"] == 5
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")
    assert [o["Key"] for o in listed["Contents"]] == [f"{prefix}/a/file"]
    s3.delete_object(Bucket=bucket, Key=f"{prefix}/a/file")

    admin = uc_workspace.s3.client("s3")
    admin.put_object(Bucket=bucket, Key=f"{other}/secret", Body=b"not yours")
    denied = [
        lambda: s3.put_object(Bucket=bucket, Key=f"{other}/file", Body=b"x"),
        lambda: s3.get_object(Bucket=bucket, Key=f"{other}/secret"),
        lambda: s3.list_objects_v2(Bucket=bucket, Prefix=f"{other}/"),
        lambda: s3.list_objects_v2(Bucket=bucket),
        lambda: s3.put_object(Bucket=bucket, Key=f"{prefix}-sibling/file", Body=b"x"),
    ]
    for call in denied:
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            call()
        assert error_code(caught.value) == "AccessDenied"

    read_only = s3_client(uc_workspace, vend(uc_workspace, info["table_id"], "READ"))
    admin.put_object(Bucket=bucket, Key=f"{prefix}/b", Body=b"b")
    assert read_only.get_object(Bucket=bucket, Key=f"{prefix}/b")["Body"].read() == b"b"
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        read_only.put_object(Bucket=bucket, Key=f"{prefix}/c", Body=b"c")
    assert error_code(caught.value) == "AccessDenied"
    assert uc_workspace.credential_vends == 2
    assert [v.operation for v in uc_workspace.vends] == ["READ_WRITE", "READ"]


def test_vended_credentials_expire_at_the_reported_time(uc_workspace):
    uc_workspace.credential_lifetime = 2
    info = uc_workspace.register_table(TABLE)
    prefix = info["storage_location"].removeprefix(f"s3://{uc_workspace.bucket}/")
    answer = vend(uc_workspace, info["table_id"])
    assert answer["expiration_time"] / 1000 - time.time() == pytest.approx(2, abs=0.5)
    s3 = s3_client(uc_workspace, answer)
    s3.put_object(Bucket=uc_workspace.bucket, Key=f"{prefix}/before", Body=b"1")
    wait_past(answer["expiration_time"])
    for call in (lambda: s3.put_object(Bucket=uc_workspace.bucket, Key=f"{prefix}/after", Body=b"1"),
                 lambda: s3.get_object(Bucket=uc_workspace.bucket, Key=f"{prefix}/before"),
                 lambda: s3.list_objects_v2(Bucket=uc_workspace.bucket, Prefix=f"{prefix}/")):
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            call()
        assert error_code(caught.value) == "ExpiredToken"
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    fresh = s3_client(uc_workspace, vend(uc_workspace, info["table_id"]))
    fresh.put_object(Bucket=uc_workspace.bucket, Key=f"{prefix}/after", Body=b"2")


def test_deltalake_with_vended_credentials(uc_workspace, monkeypatch):
    assert not [name for name in os.environ if name.startswith("AWS_")]
    uc_workspace.credential_lifetime = 3
    info = uc_workspace.register_table(TABLE)
    uri = info["storage_location"]

    answer = vend(uc_workspace, info["table_id"])
    options = uc_workspace.storage_options(answer)
    write_deltalake(uri, small_table(0), storage_options=options)
    write_deltalake(uri, small_table(3), mode="append", storage_options=options)
    assert DeltaTable(uri, storage_options=options).to_pyarrow_table().num_rows == 6

    with pytest.raises(OSError) as denied:  # the same credentials elsewhere in the bucket
        write_deltalake(uc_workspace.location("elsewhere"), small_table(), storage_options=options)
    assert "403 Forbidden" in str(denied.value) and "<Code>AccessDenied</Code>" in str(denied.value)

    wait_past(answer["expiration_time"])
    with pytest.raises(OSError) as expired:
        write_deltalake(uri, small_table(6), mode="append", storage_options=options)
    assert "400 Bad Request" in str(expired.value) and "<Code>ExpiredToken</Code>" in str(expired.value)
    with pytest.raises(OSError):
        DeltaTable(uri, storage_options=options)

    fresh = uc_workspace.storage_options(vend(uc_workspace, info["table_id"]))
    write_deltalake(uri, small_table(6), mode="append", storage_options=fresh)
    table = DeltaTable(uri, storage_options=uc_workspace.admin_storage_options)
    assert sorted(table.to_pyarrow_table().column("id").to_pylist()) == list(range(9))
    assert table.version() == 2


def test_long_lived_delta_table_with_expired_credentials(uc_workspace):
    """What a writer holding one DeltaTable sees once its credentials expire: a DeltaError (not OSError)."""
    uc_workspace.credential_lifetime = 2
    info = uc_workspace.register_table(TABLE)
    uri = info["storage_location"]
    write_deltalake(uri, small_table(0), storage_options=uc_workspace.admin_storage_options)
    answer = vend(uc_workspace, info["table_id"])
    table = DeltaTable(uri, storage_options=uc_workspace.storage_options(answer))
    write_deltalake(table, small_table(3), mode="append")
    wait_past(answer["expiration_time"])
    with pytest.raises(DeltaError) as expired:
        write_deltalake(table, small_table(6), mode="append")
    assert "400 Bad Request" in str(expired.value) and "<Code>ExpiredToken</Code>" in str(expired.value)
    fresh = DeltaTable(uri, storage_options=uc_workspace.storage_options(vend(uc_workspace, info["table_id"])))
    write_deltalake(fresh, small_table(6), mode="append")
    assert sorted(fresh.to_pyarrow_table().column("id").to_pylist()) == list(range(9))


# -- helpers and hygiene ----------------------------------------------------------------------------------

def test_databrickscfg_and_environ(uc_workspace, tmp_path):
    path = uc_workspace.databrickscfg(tmp_path)
    uc_workspace.databrickscfg(tmp_path, profile="m2m", auth="oauth-m2m")
    uc_workspace.databrickscfg(tmp_path, profile="wrong", token="dapi-wrong")
    parser = configparser.ConfigParser(default_section="\0", interpolation=None)
    parser.read(path)
    assert parser["DEFAULT"]["host"] == uc_workspace.host and parser["DEFAULT"]["token"] == uc_workspace.pat
    assert parser["m2m"]["client_id"] == uc_workspace.client_id
    assert parser["m2m"]["client_secret"] == uc_workspace.client_secret
    assert parser["wrong"]["token"] == "dapi-wrong"
    assert uc_workspace.environ() == {"DATABRICKS_HOST": uc_workspace.host, "DATABRICKS_TOKEN": uc_workspace.pat}
    assert set(uc_workspace.environ("oauth-m2m")) == {"DATABRICKS_HOST", "DATABRICKS_CLIENT_ID",
                                                      "DATABRICKS_CLIENT_SECRET"}


def test_request_log_holds_no_secret(uc_workspace):
    info = uc_workspace.register_table(TABLE)
    token = httpx.post(f"{uc_workspace.host}/oidc/v1/token", auth=(uc_workspace.client_id, uc_workspace.client_secret),
                       data={"grant_type": "client_credentials", "scope": "all-apis"}, trust_env=False
                       ).json()["access_token"]
    answer = vend(uc_workspace, info["table_id"])
    api(uc_workspace, "GET", f"/api/2.1/unity-catalog/tables/{TABLE}", token=token)
    api(uc_workspace, "GET", f"/api/2.1/unity-catalog/tables/{TABLE}", token="dapi-bad")
    text = repr(uc_workspace.request_log) + repr(uc_workspace.vends)
    aws = answer["aws_temp_credentials"]
    for secret in (uc_workspace.pat, uc_workspace.client_secret, token, "dapi-bad", aws["secret_access_key"],
                   aws["session_token"]):
        assert secret not in text
    assert [(e["endpoint"], e["status"], e["auth"]) for e in uc_workspace.request_log] == [
        ("oidc_token", 200, "client_credentials"), ("temporary_table_credentials", 200, "pat"),
        ("get_table", 200, "oauth"), ("get_table", 403, "invalid")]


# -- knobs for pistream's own tests: a warehouse that starts slowly, late answers, refused connections ------

def test_a_cold_warehouse_keeps_statements_pending(uc_workspace):
    """The warehouse comes up ``warehouse_start_seconds`` after the first statement; a submission that waits
    (wait_timeout 5s) holds its answer as long, as the real API does: longer than a short read timeout."""
    uc_workspace.warehouse_start_seconds = 1.5
    uc_workspace.statement_seconds = 0
    location = uc_workspace.location("cold")
    statement = CREATE_SQL.format(location=location)
    first = api(uc_workspace, "POST", "/api/2.0/sql/statements", json={
        "warehouse_id": uc_workspace.warehouse_id, "statement": statement, "wait_timeout": "0s"}).json()
    assert first["status"] == {"state": "PENDING"}
    assert poll(uc_workspace, first["statement_id"])["status"] == {"state": "PENDING"}  # still starting
    other = CREATE_SQL.format(location=uc_workspace.location("cold2")).replace("from_sql", "from_sql_2")
    with pytest.raises(httpx.ReadTimeout):  # a client whose read timeout is below the warehouse's start
        api(uc_workspace, "POST", "/api/2.0/sql/statements", timeout=httpx.Timeout(0.5, connect=5), json={
            "warehouse_id": uc_workspace.warehouse_id, "statement": other, "wait_timeout": "5s"})
    deadline = time.monotonic() + 30
    while poll(uc_workspace, first["statement_id"])["status"]["state"] != "SUCCEEDED":
        assert time.monotonic() < deadline, "the warehouse never came up"
        time.sleep(0.1)
    assert uc_workspace.table("main.bronze.from_sql")["storage_location"] == location
    assert [s["wait_timeout"] for s in uc_workspace.statements] == ["0s", "5s"]
    assert uc_workspace.calls["execute_statement"] == 2


def test_slow_answers_failures_by_endpoint_and_refused_connections(uc_workspace):
    """``slow_answers``: the call is carried out and its answer comes late; ``fail_next(..., endpoint=)``
    fails only that endpoint; ``down()`` refuses connections (also to a client with a pooled keep-alive
    connection) until ``up()``; every request's User-Agent is in the log."""
    path = f"/api/2.1/unity-catalog/tables/{TABLE}"
    uc_workspace.slow_answers = {"delete_table": 2.0}
    uc_workspace.register_table(TABLE)
    with pytest.raises(httpx.ReadTimeout):
        api(uc_workspace, "DELETE", path, timeout=httpx.Timeout(0.3, connect=5))
    deadline = time.monotonic() + 30  # the fake carries it out on its own thread: on a busy machine, later
    while uc_workspace.table(TABLE) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uc_workspace.table(TABLE) is None  # carried out all the same
    uc_workspace.fail_next(1, 504, endpoint="list_tables")
    assert api(uc_workspace, "GET", path).status_code == 404  # not list_tables: not failed
    query = {"catalog_name": "main", "schema_name": "bronze"}
    assert api(uc_workspace, "GET", "/api/2.1/unity-catalog/tables", params=query).status_code == 504
    assert api(uc_workspace, "GET", "/api/2.1/unity-catalog/tables", params=query).status_code == 200
    headers = {"Authorization": f"Bearer {uc_workspace.pat}", "User-Agent": "probe/1"}
    with httpx.Client(base_url=uc_workspace.host, timeout=httpx.Timeout(5), trust_env=False) as client:
        assert client.get(path, headers=headers).status_code == 404  # a keep-alive connection now
        uc_workspace.down()
        with pytest.raises(httpx.ConnectError):
            client.get(path, headers=headers)
        uc_workspace.up()
        assert client.get(path, headers=headers).status_code == 404
    assert {e["user_agent"] for e in uc_workspace.request_log} >= {"probe/1", f"python-httpx/{httpx.__version__}"}
