"""Which Databricks workspace and credentials pistream uses (as the Databricks CLI finds them), the mapping
of Unity Catalog's vended credentials to delta-rs storage options (Azure: for real, against Azurite with a
SAS), and when credentials are re-vended."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import structlog
from click.testing import CliRunner
from deltalake import DeltaTable, write_deltalake

from pistream.cli import main
from pistream.config import build_settings
from pistream.errors import ConfigError, TableConflictError
from pistream.lake.databricks import load_workspace_config, normalize_host
from pistream.lake.target import CatalogTarget, TableTarget, make_target
from pistream.lake.unitycatalog import (
    CatalogTable,
    VendedCredentials,
    check_writable,
    create_table_sql,
    is_table_name,
    refresh_margin,
    uc_columns,
    vended_storage_options,
)

CFG = """\
[DEFAULT]
host = https://dbc-default.cloud.databricks.com
token = dapi-default-token

[prod]
host = adb-123.azuredatabricks.net/
client_id = 11111111-2222
client_secret = dose-secret

[cli]
host = https://dbc-cli.cloud.databricks.com
auth_type = databricks-cli
"""


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "databrickscfg"
    path.write_text(CFG)
    return {"DATABRICKS_CONFIG_FILE": str(path)}


def test_default_profile_and_named_profile(cfg):
    default = load_workspace_config(None, cfg)
    assert (default.host, default.auth_kind, default.token) == (
        "https://dbc-default.cloud.databricks.com", "pat", "dapi-default-token")
    prod = load_workspace_config("prod", cfg)
    # DEFAULT's token is not inherited by other profiles (configparser would copy it in).
    assert (prod.host, prod.auth_kind, prod.token) == ("https://adb-123.azuredatabricks.net", "oauth-m2m", None)
    assert load_workspace_config(None, {**cfg, "DATABRICKS_CONFIG_PROFILE": "prod"}).auth_kind == "oauth-m2m"


def test_environment_wins_over_the_file(cfg):
    config = load_workspace_config(None, {**cfg, "DATABRICKS_TOKEN": "dapi-env", "DATABRICKS_HOST": "h.example"})
    assert (config.host, config.token) == ("https://h.example", "dapi-env")
    only_env = load_workspace_config(None, {"DATABRICKS_CONFIG_FILE": "/nonexistent/cfg",
                                            "DATABRICKS_HOST": "https://e.example", "DATABRICKS_TOKEN": "t0ken"})
    assert only_env.source == "the environment"


def test_missing_profile_names_the_fix(cfg):
    with pytest.raises(ConfigError) as info:
        load_workspace_config("staging", cfg)
    text = str(info.value)
    assert "'staging' not found" in text and "cli, DEFAULT, prod" in text
    assert "databricks auth login --profile staging" in text


def test_no_host_or_no_credentials(tmp_path):
    path = tmp_path / "cfg"
    path.write_text("[DEFAULT]\nhost = https://x.example\n")
    with pytest.raises(ConfigError, match="no Databricks credentials"):
        load_workspace_config(None, {"DATABRICKS_CONFIG_FILE": str(path)})
    with pytest.raises(ConfigError, match="no Databricks workspace host"):
        load_workspace_config(None, {"DATABRICKS_CONFIG_FILE": str(tmp_path / "missing")})


def test_secrets_not_in_repr(cfg):
    text = repr(load_workspace_config("prod", cfg)) + repr(load_workspace_config(None, cfg))
    assert "dose-secret" not in text and "dapi-default-token" not in text


def test_plain_http_only_on_loopback():
    assert normalize_host("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    with pytest.raises(ConfigError, match="unencrypted"):
        normalize_host("http://dbc.example.com")


def test_table_names_and_paths():
    assert is_table_name("main.bronze.pi_streaming_timeseries")
    assert is_table_name("`my-cat`.bronze.t")
    for other in ("pistream-data/pi_events", "pi_events", "s3://b/t", "a.b", "./a.b.c", "C:\\x.y.z"):
        assert not is_table_name(other), other
    assert isinstance(make_target("s3://bucket/t"), TableTarget)
    with pytest.raises(ConfigError, match="for Unity Catalog tables"):
        make_target("/data/t", location="s3://b/x")


def test_catalog_target_needs_a_cloud_location(cfg, monkeypatch):
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", cfg["DATABRICKS_CONFIG_FILE"])
    with pytest.raises(ConfigError, match="not a cloud storage URI"):
        CatalogTarget("main.bronze.t", location="/local/folder")


def test_warehouse_wait_setting(cfg, monkeypatch, tmp_path):
    """--warehouse-wait reaches the Unity Catalog target (default 10 minutes); 0 or less is refused."""
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", cfg["DATABRICKS_CONFIG_FILE"])
    base = {"tags": "tags.txt", "simulate": True, "table": "main.bronze.t"}
    settings = build_settings({"warehouse_wait": 90}, base)
    target = make_target(settings.table, warehouse_wait=settings.warehouse_wait)
    assert isinstance(target, CatalogTarget) and target.warehouse_wait == 90
    assert make_target("main.bronze.t").warehouse_wait == build_settings({}, base).warehouse_wait == 600
    with pytest.raises(ConfigError, match="--warehouse-wait: Expected `float` > 0"):
        build_settings({}, {**base, "warehouse_wait": 0})
    logging = structlog.get_config()  # the CLI configures logging (errors only, after a bad setting)
    try:
        result = CliRunner().invoke(main, ["--tags", str(tmp_path / "tags.txt"), "--simulate",
                                           "--warehouse-wait", "-5"])
    finally:
        structlog.configure(**logging)
    assert result.exit_code == 2 and "--warehouse-wait" in result.output


def test_aws_credentials_mapping():
    answer = {"aws_temp_credentials": {"access_key_id": "ASIA1", "secret_access_key": "s3cr3t",
                                       "session_token": "tok"}, "expiration_time": 1, "url": "s3://b/t"}
    assert vended_storage_options(answer, "s3://b/t") == {
        "AWS_ACCESS_KEY_ID": "ASIA1", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "tok"}


def test_gcp_token_is_a_clear_error():
    with pytest.raises(ConfigError, match="google_service_account_key"):
        vended_storage_options({"gcp_oauth_token": {"oauth_token": "ya29.x"}}, "gs://b/t")


def test_azure_sas_mapping_writes_to_azurite(azurite_server, monkeypatch):
    """UC's ``azure_user_delegation_sas`` becomes delta-rs's SAS option: a table is written and read back
    with nothing but the SAS (no account key), and an expired SAS is refused by Azurite."""
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    from tests.storage_servers import AZURE_CONTAINER, AZURITE_ACCOUNT, AZURITE_KEY

    def sas(expiry: datetime) -> str:
        return generate_container_sas(AZURITE_ACCOUNT, AZURE_CONTAINER, account_key=AZURITE_KEY,
                                      permission=ContainerSasPermissions(read=True, write=True, delete=True,
                                                                         list=True, add=True, create=True),
                                      expiry=expiry, start=datetime.now(UTC) - timedelta(minutes=5))

    location = azurite_server.table_uri("uc-sas", azurite_server.extra_prefixes["abfss"])
    answer = {"azure_user_delegation_sas": {"sas_token": sas(datetime.now(UTC) + timedelta(hours=1))},
              "expiration_time": 0, "url": location}
    mapped = vended_storage_options(answer, location)
    assert mapped["azure_storage_account_name"] == AZURITE_ACCOUNT
    options = {"azure_storage_use_emulator": "true", **mapped}
    import pyarrow as pa

    write_deltalake(location, pa.table({"x": [1, 2, 3]}), storage_options=options)
    assert DeltaTable(location, storage_options=options).to_pyarrow_table()["x"].to_pylist() == [1, 2, 3]
    expired = vended_storage_options(
        {"azure_user_delegation_sas": {"sas_token": sas(datetime.now(UTC) - timedelta(minutes=1))}}, location)
    with pytest.raises(Exception, match="(?i)auth|403|forbidden|expired|denied"):
        write_deltalake(location, pa.table({"x": [4]}), mode="append",
                        storage_options={"azure_storage_use_emulator": "true", **expired})


def test_refresh_margin():
    assert refresh_margin(3600) == 720  # 20 % of an hour
    assert refresh_margin(1800) == 600  # at least 10 minutes
    assert refresh_margin(10) == 5  # at most half the lifetime (short-lived test credentials)


class _Catalog:
    """Counts vends; answers like UC with a lifetime of ``lifetime`` seconds from the fake clock."""

    def __init__(self, clock, lifetime=3600.0):
        self.clock, self.lifetime, self.vends, self.down = clock, lifetime, 0, False

    def temporary_credentials(self, table_id, full_name):
        from pistream.lake.databricks import WorkspaceUnavailable

        if self.down:
            raise WorkspaceUnavailable("down")
        self.vends += 1
        return {"aws_temp_credentials": {"access_key_id": f"K{self.vends}", "secret_access_key": "s"},
                "expiration_time": int((self.clock() + self.lifetime) * 1000)}


def test_credentials_revended_before_expiry_and_kept_through_an_outage():
    now = [1_000_000.0]
    catalog = _Catalog(lambda: now[0])
    table = CatalogTable("main.bronze.t", "id", "s3://b/t", "EXTERNAL", "DELTA")
    creds = VendedCredentials(catalog, table, {"AWS_REGION": "us-east-1"}, clock=lambda: now[0])  # type: ignore[arg-type]
    assert creds.storage_options()["AWS_ACCESS_KEY_ID"] == "K1"
    now[0] += 3600 - 721
    assert creds.storage_options()["AWS_ACCESS_KEY_ID"] == "K1" and catalog.vends == 1
    now[0] += 2  # within the 12-minute margin
    catalog.down = True
    assert creds.storage_options()["AWS_ACCESS_KEY_ID"] == "K1"  # UC down: the valid ones are kept
    catalog.down = False
    now[0] += 60
    assert creds.storage_options()["AWS_ACCESS_KEY_ID"] == "K2" and creds.generation == 2
    catalog.down = True
    now[0] += 3600  # expired and UC down: an error (the commit writer backs off and retries)
    with pytest.raises(Exception, match="down"):
        creds.storage_options()


def test_only_external_delta_tables():
    with pytest.raises(TableConflictError, match="MANAGED"):
        check_writable(CatalogTable("m.s.t", "id", "s3://b/t", "MANAGED", "DELTA"))
    with pytest.raises(TableConflictError, match="a view"):
        check_writable(CatalogTable("m.s.v", "id", "", "VIEW", ""))
    check_writable(CatalogTable("m.s.t", "id", "s3://b/t", "EXTERNAL", "DELTA"))


def test_create_statement_and_columns():
    sql = create_table_sql("main.bronze.pi_streaming_timeseries", "s3://b/it's")
    assert sql.startswith("CREATE TABLE IF NOT EXISTS `main`.`bronze`.`pi_streaming_timeseries` (")
    assert "`timestamp` TIMESTAMP NOT NULL" in sql and "PARTITIONED BY (`partition_date`)" in sql
    assert "LOCATION 's3://b/it\\'s'" in sql and "'delta.enableDeletionVectors' = 'false'" in sql
    columns = {c["name"]: c for c in uc_columns()}
    assert columns["partition_date"]["partition_index"] == 0 and columns["value"]["type_name"] == "DOUBLE"
    assert columns["state_code"]["type_text"] == "int" and not columns["tag"]["nullable"]
